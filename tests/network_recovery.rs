//! After a crash (SIGKILL) the next start leaves nothing of the dead runners' networking
//! behind; a clean exit removes the table and puts forwarding back.

#[path = "support/networld/mod.rs"]
mod networld;
mod support;

use std::collections::BTreeSet;

/// Index and name of every `plh-*` interface of the host namespace.
fn runner_links(world: &networld::World) -> BTreeSet<(String, String)> {
    world
        .host
        .sh("ip -o link show")
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(": ");
            let index = fields.next()?.trim().to_owned();
            let name = fields.next()?.split('@').next()?.to_owned();
            name.starts_with("plh-").then_some((index, name))
        })
        .collect()
}

fn tables(world: &networld::World) -> String {
    world.host.sh("nft list tables")
}

#[test]
fn a_restart_after_a_crash_removes_what_dead_runners_had_and_a_clean_exit_everything() {
    let Some(world) = networld::world() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let forwarding = world.host.sh("cat /proc/sys/net/ipv4/ip_forward");
    let mut server = networld::Server::start(&world, state.path().to_owned(), &[]);
    world.host.run(|| {
        assert_eq!(networld::environment(1, 2, true, &[8080]), 201);
        networld::wait_idle(1, 2);
    });
    let before = runner_links(&world);
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(tables(&world).matches("poseidon_lite").count(), 1);
    assert_eq!(
        world.host.sh("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "1"
    );

    server.kill();
    // An interface the kernel would not clean up by itself (as when something pinned a dead
    // runner's namespace).
    world
        .host
        .ip("link add plh-777 type veth peer name plh-778");
    let mut server = networld::Server::start(&world, state.path().to_owned(), &[]);
    server.wait_for("reloading");
    world.host.run(|| networld::wait_idle(1, 2));
    let after = runner_links(&world);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.is_disjoint(&before), "{before:?} survived: {after:?}");
    assert_eq!(tables(&world).matches("poseidon_lite").count(), 1);

    server.stop();
    assert_eq!(runner_links(&world), BTreeSet::new());
    assert!(
        !tables(&world).contains("poseidon_lite"),
        "{}",
        tables(&world)
    );
    assert_eq!(
        world.host.sh("cat /proc/sys/net/ipv4/ip_forward"),
        forwarding,
        "forwarding not restored"
    );
}
