//! The `poseidon-lite` binary as an operator runs it: flags, signals and crashes.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Ws, process::Process};

fn claim(server: &Process) -> String {
    server.claimed_runner(7, 0)
}

#[test]
fn help_explains_every_setting() {
    let output = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
        .arg("--help")
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in [
        "server.port",
        "server.token",
        "runner.executor",
        "state.dir",
        "POSEIDON_SERVER_PORT",
    ] {
        assert!(help.contains(setting), "--help lacks {setting}:\n{help}");
    }
}

#[test]
fn sigterm_ends_executions_with_an_error_and_exits_cleanly() {
    let state = tempfile::tempdir().expect("state");
    let mut server = Process::start(state.path());
    let runner = claim(&server);
    let (status, body) = server.call(
        "POST",
        &format!("/runners/{runner}/execute"),
        json!({"command": "echo go; sleep 60"}),
    );
    assert_eq!(status, 200);
    let url: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ws = Ws::connect(url["websocketUrl"].as_str().expect("url"), None).expect("connects");
    ws.wait_for_stdout("go");
    server.signal("TERM");
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.end["type"], "error");
    assert!(server.wait().success());
}

#[test]
fn after_a_crash_the_restarted_server_keeps_environments_and_claimed_runners() {
    let state = tempfile::tempdir().expect("state");
    let mut server = Process::start(state.path());
    let runner = claim(&server);
    server.signal("KILL");
    server.wait();
    let server = Process::start(state.path());
    let (status, body) = server.call("GET", "/execution-environments/7", json!(null));
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.call("GET", &format!("/runners/{runner}/files"), json!(null));
    assert_eq!(status, 200, "both executors take claimed runners back");
    drop(server);
    let group =
        std::path::Path::new("/sys/fs/cgroup/pids").join(support::process::own_cgroup_name());
    assert!(!group.exists(), "{} is left behind", group.display());
}

#[test]
fn a_uid_base_that_maps_runners_onto_host_users_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the sandbox needs root");
        return;
    }
    let state = tempfile::tempdir().expect("state");
    for base in ["0", "1000"] {
        let output = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
            .args([
                "--port",
                "0",
                "--websocket-port",
                "0",
                "--executor",
                "sandbox",
            ])
            .args([
                "--uid-base",
                base,
                "--cgroup-name",
                &support::process::own_cgroup_name(),
            ])
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("uid_base {base} is below 65536")),
            "{stderr}"
        );
    }
}
