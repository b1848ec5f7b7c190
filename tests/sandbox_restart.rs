//! Claimed sandbox runners outlive their server: a clean stop (SIGTERM), a crash (SIGKILL) and
//! an upgrade (another binary) are each followed by a server that takes them back with their
//! files, limits and ids, re-arms their timers and reconciles the idle pools. Needs root.

mod support;

use std::{path::Path, time::Instant};

use serde_json::{Value, json};
use support::{
    TIMEOUT, Ws,
    process::{Process, own_cgroup_name},
};

const SANDBOX: [&str; 2] = ["--executor", "sandbox"];

fn root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped: the sandbox needs root");
    }
    root
}

fn start(state: &Path) -> Process {
    Process::start_with(state, &SANDBOX)
}

/// A runner of environment 7 (pool of 1, 256 MB), claimed with `timeout`, holding a file.
fn claimed_runner(server: &Process, timeout: u64) -> String {
    let runner = server.claimed_runner(7, timeout);
    let content = support::base64(b"kept across restarts");
    let (status, body) = server.call(
        "PATCH",
        &format!("/runners/{runner}/files"),
        json!({"copy": [{"path": "work/notes.txt", "content": content}]}),
    );
    assert_eq!(status, 204, "{body}");
    runner
}

/// The runner's memory limit as its cgroup holds it.
fn memory_limit(runner: &str) -> String {
    let group = Path::new("/sys/fs/cgroup/memory")
        .join(own_cgroup_name())
        .join(runner);
    std::fs::read_to_string(group.join("memory.limit_in_bytes")).unwrap_or_default()
}

/// Runs `command` in the runner; its stdout.
fn run(server: &Process, runner: &str, command: &str) -> String {
    let (status, body) = server.call(
        "POST",
        &format!("/runners/{runner}/execute"),
        json!({"command": command}),
    );
    assert_eq!(status, 200, "{body}");
    let url: Value = serde_json::from_str(&body).expect("json");
    let ws = Ws::connect(url["websocketUrl"].as_str().expect("url"), None).expect("connects");
    ws.transcript_rest().stdout
}

fn statistic(server: &Process, name: &str) -> u64 {
    let (_, body) = server.call("GET", "/statistics/execution-environments", json!(null));
    let figures: Value = serde_json::from_str(&body).expect("json");
    figures["7"][name].as_u64().unwrap_or(0)
}

fn idle_runners(server: &Process) -> u64 {
    statistic(server, "idleRunners")
}

fn used_runners(server: &Process) -> u64 {
    statistic(server, "usedRunners")
}

/// Waits until the pool of environment 7 holds its one idle runner; then the state holds that
/// one and the claimed runner, nothing a predecessor left.
fn assert_pool_reconciled(server: &Process, state: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while idle_runners(server) < 1 {
        assert!(Instant::now() < deadline, "the pool refills");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let runners = std::fs::read_dir(state.join("sandbox"))
        .expect("sandbox")
        .count();
    assert_eq!(runners, 2, "one claimed and one idle runner, no leftovers");
}

/// After the restart: same id, same file, same limit, commands run.
fn assert_taken_back(server: &Process, runner: &str, limit: &str) {
    let (status, body) = server.call(
        "GET",
        &format!("/runners/{runner}/files/raw?path=work/notes.txt"),
        json!(null),
    );
    assert_eq!((status, body.as_str()), (200, "kept across restarts"));
    assert_eq!(memory_limit(runner), limit, "limits unchanged");
    assert_eq!(
        run(server, runner, "cat work/notes.txt"),
        "kept across restarts"
    );
}

#[test]
fn after_sigterm_claimed_runners_are_taken_back_and_running_executions_got_an_error() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let mut server = start(state.path());
    let runner = claimed_runner(&server, 0);
    let limit = memory_limit(&runner);
    assert!(!limit.is_empty(), "the runner has a memory group");
    let (_, body) = server.call(
        "POST",
        &format!("/runners/{runner}/execute"),
        json!({"command": "echo go; sleep 60"}),
    );
    let url: Value = serde_json::from_str(&body).expect("json");
    let mut ws = Ws::connect(url["websocketUrl"].as_str().expect("url"), None).expect("connects");
    ws.wait_for_stdout("go");
    server.signal("TERM");
    assert_eq!(ws.transcript_rest().end["type"], "error");
    assert!(server.wait().success());

    let server = start(state.path());
    assert_taken_back(&server, &runner, &limit);
    assert_eq!(
        run(&server, &runner, "pgrep -c sleep || true").trim(),
        "0",
        "the interrupted execution's processes are gone"
    );
    assert_pool_reconciled(&server, state.path());
}

#[test]
fn after_sigkill_claimed_runners_are_taken_back_and_idle_leftovers_removed() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let server = start(state.path());
    let runner = claimed_runner(&server, 0);
    let limit = memory_limit(&runner);
    let deadline = Instant::now() + TIMEOUT;
    while idle_runners(&server) < 1 {
        assert!(Instant::now() < deadline, "the pool fills");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.crash();

    let server = start(state.path());
    assert_taken_back(&server, &runner, &limit);
    assert_pool_reconciled(&server, state.path());
}

#[test]
fn another_binary_takes_the_runners_back_and_their_timers_run_again() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let server = start(state.path());
    let kept = claimed_runner(&server, 0);
    let (_, body) = server.call(
        "POST",
        "/runners",
        json!({"executionEnvironmentId": 7, "inactivityTimeout": 1}),
    );
    let expiring = serde_json::from_str::<Value>(&body).expect("json")["runnerId"]
        .as_str()
        .expect("id")
        .to_owned();
    let limit = memory_limit(&kept);
    server.crash();

    // The upgrade: another executable file, as after a package update.
    let dir = tempfile::tempdir().expect("binary dir");
    let next = dir.path().join("poseidon-lite-next");
    std::fs::copy(env!("CARGO_BIN_EXE_poseidon-lite"), &next).expect("copy");
    let server = Process::listening(Process::spawn_binary(
        &next,
        state.path(),
        &["--executor", "sandbox", "--release", "next"],
    ));
    assert_eq!(server.call("GET", "/version", json!(null)).1, "\"next\"");
    assert_taken_back(&server, &kept, &limit);
    // Watched through the statistics: the file routes would restart the timer.
    let deadline = Instant::now() + TIMEOUT;
    while used_runners(&server) > 1 {
        assert!(
            Instant::now() < deadline,
            "the re-armed timer expires the runner"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let path = format!("/runners/{expiring}/files");
    assert_eq!(server.call("GET", &path, json!(null)).0, 410);
    assert_eq!(
        server
            .call("GET", &format!("/runners/{kept}/files"), json!(null))
            .0,
        200
    );
}

#[test]
fn destroy_runners_ends_every_runner_the_server_left() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let mut server = start(state.path());
    let runner = claimed_runner(&server, 0);
    server.signal("TERM");
    assert!(server.wait().success());
    assert!(
        !memory_limit(&runner).is_empty(),
        "the runner outlived its server"
    );

    let (status, log) = Process::spawn(
        state.path(),
        &["--executor", "sandbox", "--destroy-runners"],
    )
    .exit();
    assert!(status.success(), "{log}");
    assert_eq!(
        std::fs::read_dir(state.path().join("sandbox"))
            .expect("dir")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(state.path().join("runners"))
            .expect("dir")
            .count(),
        0
    );
    assert!(memory_limit(&runner).is_empty(), "its cgroup is gone");
    let server = start(state.path());
    let path = format!("/runners/{runner}/files");
    assert_eq!(server.call("GET", &path, json!(null)).0, 410);
}

#[test]
fn a_damaged_runner_file_stops_the_start_and_the_runner_lives_on() {
    if !root() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let mut server = start(state.path());
    let runner = claimed_runner(&server, 0);
    let limit = memory_limit(&runner);
    server.signal("TERM");
    assert!(server.wait().success());

    let file = state
        .path()
        .join("sandbox")
        .join(&runner)
        .join("runner.json");
    let good = std::fs::read(&file).expect("runner file");
    std::fs::write(&file, &good[..good.len() / 2]).expect("truncate");
    let (status, log) = Process::spawn(state.path(), &SANDBOX).exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains(&file.display().to_string()), "{log}");
    assert_eq!(memory_limit(&runner), limit, "the runner still runs");

    std::fs::write(&file, &good).expect("repair");
    let server = start(state.path());
    assert_taken_back(&server, &runner, &limit);
}
