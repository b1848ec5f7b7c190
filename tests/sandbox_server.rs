//! The sandbox executor behind the real server, driven over HTTP and WebSocket: what a
//! CodeOcean user sees of the isolation (the executor-level tests are in `sandbox_*.rs`).

mod support;

use poseidon_lite::config::ExecutorKind;
use serde_json::json;
use support::TestServer;

/// A server with the sandbox executor, or `None` (with a message) when not root.
fn sandbox_server(adjust: impl FnOnce(&mut poseidon_lite::Config)) -> Option<TestServer> {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the sandbox needs root");
        return None;
    }
    Some(TestServer::start_with(|config| {
        config.runner.executor = ExecutorKind::Sandbox;
        adjust(config);
    }))
}

fn environment(server: &TestServer, id: u64, memory: u32) {
    let body = json!({"id": id, "image": support::TEST_IMAGE, "prewarmingPoolSize": 1,
                      "cpuLimit": 20, "memoryLimit": memory, "networkAccess": false, "exposedPorts": []});
    let answer = server.send("PUT", &format!("/execution-environments/{id}"), &body);
    assert_eq!(answer.status, 201, "{}", answer.text());
}

#[test]
fn exceeding_the_memory_limit_ends_with_codeoceans_oom_message() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 64);
    let runner = server.runner(1, 0);
    let transcript = server.run(&runner, "head -c 512m /dev/zero | tail");
    assert_eq!(
        transcript.end,
        json!({"type": "error", "data": "the allocation was OOM Killed"})
    );
    assert_eq!(server.run(&runner, "echo alive").stdout, "alive\r\n");
}

#[test]
fn code_runs_unprivileged_unless_privileged_execution_is_asked_for() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 256);
    let runner = server.runner(1, 0);
    assert_ne!(server.run(&runner, "id -u").stdout, "0\r\n");
    let url = server.execute_with(
        &runner,
        &json!({"command": "id -u", "privilegedExecution": true}),
    );
    assert_eq!(server.connect(&url).transcript().stdout, "0\r\n");
}

#[test]
fn copied_files_belong_to_root_and_the_learner_cannot_change_them() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 256);
    let runner = server.runner(1, 0);
    server.copy(&runner, &[("src/", ""), ("src/main.py", "print(1)\n")]);
    let listing = server
        .get(&format!("/runners/{runner}/files?path=./&recursive=true"))
        .json();
    let file = |name: &str| {
        listing["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        (
            file("./src")["permissions"].clone(),
            file("./src")["owner"].clone()
        ),
        (json!("rwxrwxrwt"), json!("root"))
    );
    assert_eq!(
        (
            file("./src/main.py")["permissions"].clone(),
            file("./src/main.py")["owner"].clone()
        ),
        (json!("rwxr--r--"), json!("root"))
    );
    let attempt = server.run(
        &runner,
        "echo x > src/main.py; rm -f src/main.py; cat src/main.py",
    );
    assert_eq!(attempt.stdout, "print(1)\r\n", "{attempt:?}");
    // The learner may still create files next to them.
    assert_eq!(
        server.run(&runner, "touch src/out.txt && echo made").stdout,
        "made\r\n"
    );
}

#[test]
fn a_fork_bomb_is_contained_and_the_api_keeps_working() {
    let Some(server) = sandbox_server(|config| config.sandbox.pids_limit = 64) else {
        return;
    };
    environment(&server, 1, 256);
    let bombed = server.runner(1, 0);
    let other = server.runner(1, 0);
    let url = server.execute(&bombed, "bomb() { bomb & bomb; }; echo bombed; bomb", 5);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("bombed");
    assert_eq!(server.get("/health").status, 204);
    assert_eq!(server.run(&other, "echo fine").stdout, "fine\r\n");
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.end, json!({"type": "timeout"}));
    // The bomb's processes ended with its execution: the runner works again.
    let recovered = server.run(&bombed, "echo recovered");
    assert_eq!(recovered.stdout, "recovered\r\n", "{recovered:?}");
}

#[test]
fn the_network_and_the_servers_own_ports_are_unreachable() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 256);
    let runner = server.runner(1, 0);
    let port = server.handle().http_addr().port();
    let probe = format!(
        "(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo reached || echo unreachable"
    );
    assert_eq!(server.run(&runner, &probe).stdout, "unreachable\r\n");
}

#[test]
fn runners_do_not_share_files_outside_the_workspace() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 256);
    let first = server.runner(1, 0);
    let second = server.runner(1, 0);
    let marker = format!("/tmp/marker-{}", std::process::id());
    assert_eq!(
        server
            .run(&first, &format!("echo mine > {marker} && echo written"))
            .stdout,
        "written\r\n"
    );
    assert_eq!(
        server.run(&first, &format!("cat {marker}")).stdout,
        "mine\r\n"
    );
    assert_eq!(
        server
            .run(
                &second,
                &format!("test -e {marker} && echo seen || echo absent")
            )
            .stdout,
        "absent\r\n"
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the write reached the host"
    );
}

#[test]
fn the_file_api_stays_out_of_proc() {
    let Some(server) = sandbox_server(|_| {}) else {
        return;
    };
    environment(&server, 1, 256);
    let runner = server.runner(1, 0);
    let linked = server.run(
        &runner,
        "ln -s /proc/self/maps maps && ln -s /proc proc && echo ok",
    );
    assert_eq!(linked.stdout, "ok\r\n");
    for path in [
        "/proc/self/maps",
        "/proc/self/status",
        "maps",
        "proc/self/maps",
    ] {
        let raw = server.get(&format!("/runners/{runner}/files/raw?path={path}"));
        assert_eq!(raw.status, 424, "{path}: {}", raw.text());
    }
    for path in ["/proc", "/proc/self", "proc/"] {
        let listing = server.get(&format!("/runners/{runner}/files?path={path}"));
        assert_eq!(listing.status, 424, "{path}: {}", listing.text());
    }
    // A recursive listing of the root shows /proc but does not descend into it.
    let root = server
        .get(&format!("/runners/{runner}/files?path=/&recursive=true"))
        .json();
    let names: Vec<&str> = root["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|file| file["name"].as_str())
        .collect();
    assert!(names.contains(&"/proc"), "{names:?}");
    assert!(
        !names.iter().any(|name| name.starts_with("/proc/")),
        "{names:?}"
    );
    // The privileged API may not write there either.
    let patch = json!({"copy": [{"path": "/proc/self/comm", "content": "eA=="}]});
    let answer = server.send("PATCH", &format!("/runners/{runner}/files"), &patch);
    assert_ne!(answer.status, 204, "{}", answer.text());
}
