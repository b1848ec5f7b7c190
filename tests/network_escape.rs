//! Root inside a runner cannot change the host's protection: neither learner code run as root
//! through the API, nor a stand-in runner whose root has every capability over its own network
//! namespace (wired to the host exactly like a runner, by the test).

#[path = "support/networld/mod.rs"]
mod networld;
mod support;

use networld::{Ns, PROBES, PUBLIC, SERVICE_PORT, UPLINK_V4, answers, reached};

/// Targets that must stay closed, and the public one that must keep working.
fn probes() -> String {
    let mut script = String::from(PROBES);
    for (target, port) in [
        ("10.1.2.3", SERVICE_PORT),
        ("192.168.1.5", SERVICE_PORT),
        ("169.254.169.254", SERVICE_PORT),
        ("fd12:3456::5", SERVICE_PORT),
        (UPLINK_V4, 7002),
        ("192.168.50.2", 7002),
        ("127.0.0.1", 7001),
    ] {
        script += &format!("t {target} {port}\n");
    }
    script += &format!("t {} {SERVICE_PORT}\n", PUBLIC[0]);
    script
}

/// Only the public target answered, masqueraded.
#[track_caller]
fn check(output: &str) {
    eprintln!("{output}");
    let answers = answers(output);
    assert_eq!(answers.len(), 8, "{output}");
    for (probe, answer) in answers {
        if probe.contains(PUBLIC[0]) {
            let (_, peer) = reached(&answer).unwrap_or_else(|| panic!("{probe}: {answer}"));
            assert_eq!(peer, UPLINK_V4, "{probe}");
        } else {
            assert_eq!(reached(&answer), None, "{probe} reached: {answer}");
        }
    }
}

/// Packets counted by the rule of the prerouting chain that contains `needle`.
fn dropped(host: &Ns, needle: &str) -> u64 {
    let chain = host.sh("nft list chain inet poseidon_lite pre");
    let line = chain
        .lines()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no rule with {needle:?} in {chain}"));
    let packets = line.split("counter packets ").nth(1).expect("a counter");
    packets.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn root_in_a_runner_cannot_open_the_network() {
    let Some(world) = networld::world() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let _server = networld::Server::start(&world, state.path().to_owned(), &[]);
    // Learner code as root: routes, addresses, its own firewall and sysctls; whatever of
    // that the runner allows, nothing more becomes reachable.
    let output = world.host.run(|| {
        assert_eq!(networld::environment(1, 1, true, &[]), 201);
        networld::wait_idle(1, 1);
        let (runner, _) = networld::claim(1);
        let attempts = "gw=$(ip -4 route show default | awk '{print $3}')
for attempt in \"ip route add 10.0.0.0/8 via $gw\" \"ip route add 192.168.0.0/16 via $gw\" \
  \"ip addr add 10.200.0.9/32 dev eth0\" \"ip route add 127.0.0.0/8 via $gw dev eth0\" \
  \"nft flush ruleset\" \"sysctl -w net.ipv4.conf.all.route_localnet=1\"; do
  $attempt >/dev/null 2>&1 && echo \"allowed: $attempt\" || echo \"refused: $attempt\"
done
";
        networld::run(&runner, &format!("{attempts}{}", probes()), true)
    });
    check(&output);

    // A stand-in runner with every capability, on an interface the table treats like any
    // runner's (plh-*), with addresses from the runner range that the server does not use.
    let fake = Ns::new();
    world.host.veth("plh-32000", &fake, "eth0");
    world.host.ip("addr add 10.200.250.0/31 dev plh-32000");
    fake.ip("addr add 10.200.250.1/31 dev eth0");
    fake.ip("link set eth0 up");
    fake.ip("route add default via 10.200.250.0");
    check(&fake.bash(&probes()));
    // Routes to private ranges and the host: nothing more.
    fake.ip("route add 10.0.0.0/8 via 10.200.250.0");
    fake.ip("route add 192.168.0.0/16 via 10.200.250.0");
    check(&fake.bash(&probes()));
    // Spoofed sources: another runner's address, the host's uplink address. Their answers
    // could not come back to the spoofer anyway: the rule that drops them must have counted.
    for spoofed in ["10.200.0.1", UPLINK_V4] {
        let before = dropped(&world.host, "fib saddr");
        fake.ip(&format!("addr add {spoofed}/32 dev lo"));
        fake.ip(&format!(
            "route replace {}/32 via 10.200.250.0 src {spoofed}",
            PUBLIC[0]
        ));
        let output = fake.bash(&format!("{PROBES}t {} {SERVICE_PORT}", PUBLIC[0]));
        eprintln!("spoofing {spoofed}: {output}");
        let answers = answers(&output);
        assert_eq!(answers.len(), 1);
        assert_eq!(
            reached(&answers[0].1),
            None,
            "spoofed {spoofed} got through"
        );
        assert!(
            dropped(&world.host, "fib saddr") > before,
            "spoofed {spoofed} not dropped"
        );
        fake.ip(&format!("addr del {spoofed}/32 dev lo"));
    }
    // 127.0.0.1 routed out of the runner, also with route_localnet on the host.
    world
        .host
        .sh("sysctl -qw net.ipv4.conf.all.route_localnet=1");
    fake.sh(
        "sysctl -qw net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 \
         && ip route del local 127.0.0.0/8 dev lo table local \
         && ip route del local 127.0.0.1 dev lo table local \
         && ip addr del 127.0.0.1/8 dev lo \
         && ip route add 127.0.0.1/32 via 10.200.250.0 dev eth0",
    );
    let before = dropped(&world.host, "127.0.0.0/8");
    let output = fake.bash(&format!("{PROBES}t 127.0.0.1 7001"));
    eprintln!("127.0.0.1 via the gateway: {output}");
    let answers = answers(&output);
    assert_eq!(answers.len(), 1);
    assert_eq!(
        reached(&answers[0].1),
        None,
        "the host's loopback was reached"
    );
    assert!(
        dropped(&world.host, "127.0.0.0/8") > before,
        "127.0.0.1 did not leave the runner"
    );
}
