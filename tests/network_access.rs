//! Runners with `networkAccess`, driven through the API of a real server inside a world of
//! network namespaces (see `support/networld.rs`): what a runner can and cannot reach.

#[path = "support/networld/mod.rs"]
mod networld;
mod support;

use networld::{PRIVATE, PROBES, PUBLIC, SERVICE_PORT, UPLINK_V4, UPLINK_V6, answers, reached};

#[test]
fn public_targets_work_masqueraded_and_everything_else_is_closed() {
    let Some(world) = networld::world() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let _server = networld::Server::start(&world, state.path().to_owned(), &[]);
    let output = world.host.run(|| {
        assert_eq!(networld::environment(1, 1, true, &[]), 201);
        networld::wait_idle(1, 1);
        let (runner, mapped) = networld::claim(1);
        assert_eq!(mapped, serde_json::json!([]));
        let mut script = String::from(PROBES);
        for target in PUBLIC {
            script += &format!("t {target} {SERVICE_PORT}\nu {target} {SERVICE_PORT}\n");
        }
        for target in PRIVATE {
            script += &format!("t {target} {SERVICE_PORT}\nu {target} {SERVICE_PORT}\n");
        }
        // The host: uplink, LAN, the runner's gateway, over v4 and v6, TCP and UDP; and the
        // runner's own loopback, which is not the host's.
        script += "gw4=$(ip -4 route show default | awk '{print $3}')\n";
        script += "gw6=$(ip -6 route show default | awk '{print $3}')\n";
        for (target, port) in [
            (UPLINK_V4, 7002),
            ("192.168.50.2", 7002),
            ("$gw4", 7002),
            (UPLINK_V6, 7004),
            ("fd50::2", 7004),
            ("$gw6", 7004),
            ("127.0.0.1", 7001),
            ("::1", 7003),
        ] {
            script += &format!("t {target} {port}\n");
        }
        script += &format!("u {UPLINK_V4} 7006\nu 127.0.0.1 7005\n");
        script += "echo interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort)\n";
        script += "cat /etc/resolv.conf\n";
        networld::run(&runner, &script, true)
    });
    eprintln!("{output}");
    let answers = answers(&output);
    assert!(
        answers.len() >= 2 * (PUBLIC.len() + PRIVATE.len()) + 10,
        "{output}"
    );
    for (probe, answer) in &answers {
        let target = probe.split_whitespace().nth(1).unwrap_or_default();
        if PUBLIC.contains(&target) {
            let (local, peer) = reached(answer).unwrap_or_else(|| panic!("{probe}: {answer}"));
            assert_eq!(local, target, "{probe}");
            let uplink = if target.contains(':') {
                UPLINK_V6
            } else {
                UPLINK_V4
            };
            assert_eq!(peer, uplink, "{probe}: not masqueraded");
        } else {
            assert_eq!(reached(answer), None, "{probe} reached: {answer}");
        }
    }
    assert!(output.contains("interfaces eth0 lo\n"), "{output}");
    assert!(output.contains("nameserver 203.0.113.53"), "{output}");
}

#[test]
fn a_private_resolver_is_reachable_on_port_53_only_and_disabled_networking_is_a_400() {
    let Some(world) = networld::world() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut server = networld::Server::start(
        &world,
        state.path().to_owned(),
        &[("POSEIDON_NETWORK_DNS", "10.1.2.3")],
    );
    let output = world.host.run(|| {
        assert_eq!(networld::environment(1, 1, true, &[]), 201);
        networld::wait_idle(1, 1);
        let (runner, _) = networld::claim(1);
        let script = format!("{PROBES}t 10.1.2.3 53\nu 10.1.2.3 53\nt 10.1.2.3 {SERVICE_PORT}\ncat /etc/resolv.conf\n");
        networld::run(&runner, &script, false)
    });
    eprintln!("{output}");
    let answers = answers(&output);
    assert_eq!(answers.len(), 3, "{output}");
    assert!(reached(&answers[0].1).is_some(), "{output}");
    assert!(reached(&answers[1].1).is_some(), "{output}");
    assert_eq!(reached(&answers[2].1), None, "{output}");
    assert!(output.contains("nameserver 10.1.2.3\n"), "{output}");
    server.stop();

    let state = tempfile::tempdir().unwrap();
    let _server = networld::Server::start(
        &world,
        state.path().to_owned(),
        &[("POSEIDON_NETWORK_ENABLED", "false")],
    );
    world.host.run(|| {
        let body = serde_json::json!({"id": 2, "image": "openhpi/co_execenv_python:3.8",
            "prewarmingPoolSize": 0, "cpuLimit": 0, "memoryLimit": 0,
            "networkAccess": true, "exposedPorts": []});
        let (status, answer) = networld::api("PUT", "/execution-environments/2", Some(&body));
        assert_eq!(status, 400, "{answer}");
        assert_eq!(
            answer["message"],
            "networkAccess is disabled on this server (network.enabled = false)"
        );
        assert_eq!(networld::environment(3, 0, false, &[]), 201);
    });
}

#[test]
fn without_an_ipv6_default_route_runners_get_ipv4_only_and_fail_fast_over_ipv6() {
    let Some(world) = networld::world() else {
        return;
    };
    world.host.ip("-6 route del default");
    let state = tempfile::tempdir().unwrap();
    let _server = networld::Server::start(&world, state.path().to_owned(), &[]);
    let output = world.host.run(|| {
        assert_eq!(networld::environment(1, 1, true, &[]), 201);
        networld::wait_idle(1, 1);
        let (runner, _) = networld::claim(1);
        let script = format!(
            "{PROBES}t {} {SERVICE_PORT}\nt {} {SERVICE_PORT}\n\
             echo global6 $(grep -v -e ' lo$' -e '^fe80' /proc/net/if_inet6 | wc -l)\n",
            PUBLIC[0], PUBLIC[2]
        );
        networld::run(&runner, &script, false)
    });
    eprintln!("{output}");
    let answers = answers(&output);
    assert_eq!(answers.len(), 2, "{output}");
    assert!(reached(&answers[0].1).is_some(), "{output}");
    assert!(answers[1].1.contains("Network is unreachable"), "{output}");
    assert!(output.contains("global6 0\n"), "{output}");
}
