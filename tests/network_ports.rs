//! Exposed ports, other runners, inbound connections, the connection limit and runners without
//! network access, through the API of a real server in a world of namespaces.

#[path = "support/networld/mod.rs"]
mod networld;
mod support;

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use networld::{HOLD_PORT, PROBES, PUBLIC, answers, reached};

/// A service on port 8080 (v4 and v6) answering `hello <peer>` to each connection.
const SERVICE: &str = r#"
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 8080))
s.listen(16)
while True:
    c, peer = s.accept()
    c.sendall(("hello " + peer[0] + "\n").encode())
    c.close()
"#;

/// The first line a TCP service at `address` sends, from the world namespace.
fn line_from(world: &networld::World, address: SocketAddr) -> Result<String, String> {
    world.world.run(move || {
        let stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))
            .map_err(|err| err.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|err| err.to_string())?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|err| err.to_string())?;
        Ok(line.trim().to_owned())
    })
}

/// Retries `check` for up to 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mapped_ports_reach_the_runner_and_end_with_it_while_everything_else_stays_closed() {
    let Some(world) = networld::world() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let limit = 8;
    let _server = networld::Server::start(
        &world,
        state.path().to_owned(),
        &[("POSEIDON_NETWORK_CONNECTION_LIMIT", "8")],
    );
    let (a, b, mapped_b) = world.host.run(|| {
        assert_eq!(networld::environment(1, 2, true, &[8080]), 201);
        assert_eq!(networld::environment(2, 1, false, &[8080]), 201);
        networld::wait_idle(1, 2);
        networld::wait_idle(2, 1);
        let (a, mapped_a) = networld::claim(1);
        let (b, mapped_b) = networld::claim(1);
        for mapped in [&mapped_a, &mapped_b] {
            let ports = mapped.as_array().expect("mappedPorts is an array");
            assert_eq!(ports.len(), 1, "{mapped}");
            assert_eq!(ports[0]["exposedPort"], 8080);
            let address = ports[0]["hostAddress"].as_str().unwrap();
            assert!(address.starts_with("198.51.100.2:"), "{address}");
        }
        assert_ne!(mapped_a, mapped_b);
        // Without network access: no ports, only loopback.
        let (offline, mapped) = networld::claim(2);
        assert_eq!(mapped, serde_json::json!([]));
        let interfaces = networld::run(
            &offline,
            "echo $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ')",
            false,
        );
        assert_eq!(interfaces.trim(), "lo");
        (a, b, mapped_b)
    });
    let address: SocketAddr = mapped_b[0]["hostAddress"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Runner b serves on 8080 until it is deleted.
    let service = {
        let b = b.clone();
        let script = format!("cat > service.py <<EOF\n{SERVICE}\nEOF\npython3 service.py\n");
        world
            .host
            .run(move || std::thread::spawn(move || networld::run(&b, &script, false)))
    };
    // From the world, through the mapped port: the service answers; it sees the host's side.
    let mut answer = String::new();
    eventually("the mapped port answers", || {
        answer = line_from(&world, address).unwrap_or_default();
        answer.starts_with("hello ")
    });
    eprintln!("through the mapped port: {answer}");
    // From runner a: b's addresses (both slots' v4 and v6; one of them is a's own, where
    // nothing listens) are closed; the per-runner connection limit holds.
    let output = world.host.run(move || {
        let mut script = String::from(PROBES);
        for target in ["10.200.0.1", "10.200.0.3", "fd00:200::2", "fd00:200:0:1::2"] {
            script += &format!("t {target} 8080\n");
        }
        script += &format!(
            "ok=0; for i in $(seq 20); do exec {{fd}}<>/dev/tcp/{}/{HOLD_PORT} && ok=$((ok+1)); done 2>/dev/null; echo held $ok\n",
            PUBLIC[0]
        );
        networld::run(&a, &script, false)
    });
    eprintln!("{output}");
    for (probe, answer) in answers(&output) {
        assert!(
            !answer.starts_with("hello"),
            "{probe} reached another runner"
        );
        assert_eq!(reached(&answer), None, "{probe}: {answer}");
    }
    assert!(output.contains(&format!("held {limit}\n")), "{output}");
    // From the world straight to the runners' addresses (routed to the host): dropped.
    world.world.ip("route add 10.200.0.0/16 via 198.51.100.2");
    for target in ["10.200.0.1:8080", "10.200.0.3:8080"] {
        let result = line_from(&world, target.parse().unwrap());
        assert!(result.is_err(), "inbound to {target}: {result:?}");
    }
    // The mapping ends with the runner.
    world.host.run(move || {
        let (status, _) = networld::api("DELETE", &format!("/runners/{b}"), None);
        assert_eq!(status, 204);
    });
    eventually("the mapped port is closed", || {
        line_from(&world, address).is_err_and(|err| err.contains("refused"))
    });
    let _ = service.join();
}
