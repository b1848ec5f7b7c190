//! Runner networking, measured inside network namespaces this bench creates (nothing touches
//! the host's own network): the release server runs in a "host" namespace whose uplink leads
//! to a "world" namespace. Measured: prewarm time per runner without and with network access
//! (same server, same pool size), and TCP throughput from a runner's service through its
//! mapped port (client in the world) beside a direct connection from the host namespace to
//! the runner's address in the same run.

use std::{
    io::Read,
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{Value, json};

use crate::{client::Client, server::ServerProcess};

/// Runners per pool for the prewarm figures.
const POOL: u32 = 20;
/// Bytes the runner's service sends per connection.
const TRANSFER: u64 = 512 << 20;
/// Connections per path (direct, mapped), interleaved.
const ROUNDS: usize = 2;

/// The figures.
#[derive(Debug)]
pub struct Figures {
    /// Wall time to fill a pool of [`POOL`], per runner, without network access.
    pub prewarm_offline_ms: f64,
    /// The same with network access.
    pub prewarm_online_ms: f64,
    /// Median and largest in-server wiring time (veth, addresses, routes) of one runner, ms.
    pub wiring_ms: (f64, f64),
    /// Best of [`ROUNDS`] direct host → runner transfers, Gbit/s.
    pub direct_gbit: f64,
    /// Best of [`ROUNDS`] world → mapped port → runner transfers, Gbit/s.
    pub mapped_gbit: f64,
}

impl Figures {
    /// The table section.
    pub fn show(&self) -> String {
        format!(
            "\nnetwork (namespaces; pool of {POOL}, 2 prewarm threads)\n  \
             prewarm per runner   offline {:.1} ms   networkAccess {:.1} ms\n  \
             wiring one runner (veth, addresses, routes)   median {:.2} ms   max {:.2} ms\n  \
             TCP {} MiB from a runner   direct {:.2} Gbit/s   through the mapped port {:.2} Gbit/s\n",
            self.prewarm_offline_ms,
            self.prewarm_online_ms,
            self.wiring_ms.0,
            self.wiring_ms.1,
            TRANSFER >> 20,
            self.direct_gbit,
            self.mapped_gbit
        )
    }

    /// The JSON figures.
    pub fn json(&self) -> Value {
        json!({"pool": POOL, "prewarm_per_runner_ms": {"offline": self.prewarm_offline_ms,
            "network_access": self.prewarm_online_ms},
            "wiring_ms": {"median": self.wiring_ms.0, "max": self.wiring_ms.1},
            "transfer_bytes": TRANSFER,
            "tcp_gbit_s": {"direct": self.direct_gbit, "mapped_port": self.mapped_gbit}})
    }
}

/// A network namespace held by a descriptor (gone with the bench process).
struct Ns {
    fd: OwnedFd,
}

impl Ns {
    fn new() -> Result<Ns, String> {
        let fd = std::thread::spawn(|| {
            // SAFETY: only this short-lived thread's network namespace changes.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!("unshare: {}", std::io::Error::last_os_error()));
            }
            rustix::fs::open(
                "/proc/thread-self/ns/net",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|err| err.to_string())
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_owned())??;
        let ns = Ns { fd };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let fd = self.fd.try_clone().map_err(|err| err.to_string())?;
        std::thread::spawn(move || {
            let kind = Some(rustix::thread::LinkNameSpaceType::Network);
            rustix::thread::move_into_link_name_space(fd.as_fd(), kind)
                .map_err(|err| format!("setns: {err}"))?;
            f()
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_owned())?
    }

    fn sh(&self, command: &str) -> Result<String, String> {
        let command = command.to_owned();
        self.run(move || {
            let output = Command::new("sh")
                .args(["-c", &command])
                .output()
                .map_err(|err| err.to_string())?;
            if !output.status.success() {
                return Err(format!(
                    "{command}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        })
    }
}

/// Measures, or says why not (not root, no `ip`/`nft`, the server refused).
pub fn measure(binary: &Path) -> Result<Result<Figures, String>, String> {
    if !rustix::process::geteuid().is_root() {
        return Ok(Err("needs root".into()));
    }
    for tool in ["ip -V", "nft --version"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("{tool} >/dev/null 2>&1")])
            .status()
            .is_ok_and(|status| status.success());
        if !ok {
            return Ok(Err(format!("needs `{tool}` (iproute2, nftables)")));
        }
    }
    let host = Ns::new()?;
    let world = Ns::new()?;
    let world_fd = world.fd.try_clone().map_err(|err| err.to_string())?;
    host.run(move || {
        let mut netlink =
            poseidon_lite::network::netlink::Netlink::open().map_err(|err| err.to_string())?;
        netlink
            .create_veth("up0", "wl0", world_fd.as_fd(), 1500)
            .map_err(|err| format!("veth: {err}"))
    })?;
    host.sh("ip addr add 198.51.100.2/24 dev up0 && ip link set up0 up \
         && ip route add default via 198.51.100.1")?;
    world.sh("ip addr add 198.51.100.1/24 dev wl0 && ip link set wl0 up")?;
    let state = tempfile::Builder::new()
        .prefix("poseidon-lite-bench-network-")
        .tempdir()
        .map_err(|err| err.to_string())?;
    let cgroup = format!("poseidon-lite-bench-net-{}", std::process::id());
    let args: Vec<String> = [
        "--port",
        "0",
        "--websocket-port",
        "0",
        "--executor",
        "sandbox",
        "--log-level",
        // The wiring time of each runner is logged at debug level.
        "info,poseidon_lite::network=debug",
        "--image",
        "openhpi/co_execenv_python:3.8=host",
        "--cgroup-name",
        &cgroup,
        "--network-publish-address",
        "198.51.100.2",
        "--state-dir",
        &state.path().display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let binary = binary.to_owned();
    let server = host.run(move || {
        ServerProcess::start(&binary, &args).map_err(|err| format!("server: {err:?}"))
    });
    let server = match server {
        Ok(server) => server,
        Err(reason) => return Ok(Err(reason)),
    };
    let (api, websocket) = (server.api.clone(), server.websocket);
    let result = host.run(move || prewarm(&Client::new(&api, websocket)));
    let (offline, online) = match result {
        Ok(times) => times,
        Err(err) => return Err(format!("{err}\n{}", server.tail(30))),
    };
    let mut wiring: Vec<f64> = server
        .tail(200)
        .lines()
        .filter_map(|line| line.split(" wired in ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    wiring.sort_by(f64::total_cmp);
    let wiring_ms = match wiring.as_slice() {
        [] => return Err("the server logged no wiring times".into()),
        all => (all[all.len() / 2], all[all.len() - 1]),
    };
    let (direct, mapped) =
        throughput(&host, &world, &server).map_err(|err| format!("{err}\n{}", server.tail(30)))?;
    eprint!("[network] stopping the server… ");
    host.run(move || server.stop().map(|_| ()))?;
    eprintln!("done");
    for controller in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::remove_dir(controller.path().join(&cgroup));
    }
    Ok(Ok(Figures {
        prewarm_offline_ms: offline,
        prewarm_online_ms: online,
        wiring_ms,
        direct_gbit: direct,
        mapped_gbit: mapped,
    }))
}

/// Milliseconds per runner to fill a pool of [`POOL`]: offline, then with network access.
fn prewarm(client: &Client) -> Result<(f64, f64), String> {
    let mut times = Vec::new();
    for (id, network) in [(1u32, false), (2, true)] {
        eprintln!("[network] prewarming {POOL} runners, networkAccess {network}");
        let body = json!({"id": id, "image": "openhpi/co_execenv_python:3.8",
            "prewarmingPoolSize": POOL, "cpuLimit": 0, "memoryLimit": 0,
            "networkAccess": network, "exposedPorts": []});
        let path = format!("/execution-environments/{id}");
        let started = Instant::now();
        client.expect("PUT", &path, body.to_string().as_bytes(), &[201])?;
        wait_idle(client, id, u64::from(POOL))?;
        times.push(started.elapsed().as_secs_f64() * 1000.0 / f64::from(POOL));
        client.delete_environment(id)?;
    }
    Ok((times[0], times[1]))
}

fn wait_idle(client: &Client, id: u32, idle: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while client.idle(id)? < idle {
        if Instant::now() > deadline {
            return Err(format!("environment {id} never had {idle} idle runners"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A service on port 9000 sending [`TRANSFER`] bytes to each of `2 * ROUNDS` connections.
fn service() -> String {
    format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind((\"0.0.0.0\", 9000))\n\
         s.listen(4)\n\
         chunk = memoryview(bytes(1 << 20))\n\
         for _ in range({}):\n\
         \x20   c, _ = s.accept()\n\
         \x20   for _ in range({}):\n\
         \x20       c.sendall(chunk)\n\
         \x20   c.close()\n",
        2 * ROUNDS,
        TRANSFER >> 20
    )
}

/// Best direct and mapped-port throughput in Gbit/s.
fn throughput(host: &Ns, world: &Ns, server: &ServerProcess) -> Result<(f64, f64), String> {
    eprintln!("[network] TCP throughput: direct and through the mapped port");
    let (api, websocket) = (server.api.clone(), server.websocket);
    let (runner, mapped) = host.run(move || {
        let client = Client::new(&api, websocket);
        let body = json!({"id": 3, "image": "openhpi/co_execenv_python:3.8",
            "prewarmingPoolSize": 1, "cpuLimit": 0, "memoryLimit": 0,
            "networkAccess": true, "exposedPorts": [9000]});
        client.expect(
            "PUT",
            "/execution-environments/3",
            body.to_string().as_bytes(),
            &[201],
        )?;
        wait_idle(&client, 3, 1)?;
        let body = json!({"executionEnvironmentId": 3, "inactivityTimeout": 600});
        let answer = client.expect("POST", "/runners", body.to_string().as_bytes(), &[200])?;
        let answer: Value = serde_json::from_slice(&answer).map_err(|err| err.to_string())?;
        let runner = answer["runnerId"].as_str().unwrap_or_default().to_owned();
        let mapped: SocketAddr = answer["mappedPorts"][0]["hostAddress"]
            .as_str()
            .and_then(|address| address.parse().ok())
            .ok_or_else(|| format!("no mapped port in {answer}"))?;
        let content = base64::engine::general_purpose::STANDARD.encode(service());
        let files = json!({"copy": [{"path": "service.py", "content": content}]});
        let path = format!("/runners/{runner}/files");
        client.expect("PATCH", &path, files.to_string().as_bytes(), &[204])?;
        let background = client.fresh();
        let id = runner.clone();
        std::thread::spawn(move || background.run(&id, "python3 service.py"));
        Ok((runner, mapped))
    })?;
    // The runner is the host end of the only runner interface plus one.
    let addresses = host.sh("ip -4 -o addr show")?;
    let gateway = addresses
        .lines()
        .find(|line| line.contains(" plh-"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
        .ok_or_else(|| format!("no runner interface in {addresses}"))?;
    let direct: SocketAddr = (std::net::Ipv4Addr::from(u32::from(gateway) + 1), 9000).into();
    let (mut best_direct, mut best_mapped) = (0f64, 0f64);
    for _ in 0..ROUNDS {
        best_direct = best_direct.max(host.run(move || receive(direct))?);
        best_mapped = best_mapped.max(world.run(move || receive(mapped))?);
    }
    let _ = runner;
    Ok((best_direct, best_mapped))
}

/// Reads everything the service sends; Gbit/s.
fn receive(address: SocketAddr) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(2)) {
            Ok(stream) => break stream,
            // The service may still be starting.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(err) => return Err(format!("connect {address}: {err}")),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|err| err.to_string())?;
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(err) => return Err(format!("reading from {address}: {err}")),
        }
    }
    if total != TRANSFER {
        return Err(format!("{address} sent {total} bytes, expected {TRANSFER}"));
    }
    Ok(total as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}
