//! Durable state, tested by killing, restarting and starving the real server binary: damaged
//! files stop the start-up without deleting anything, answered claims and writes survive a
//! SIGKILL, failed writes on a full disk answer errors and change nothing.

mod support;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{Value, json};
use support::process::Process;

/// A size-limited tmpfs mounted on a fresh directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "tmpfs mounted (the tests run as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system; returns the filler file.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 << 10];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        // Whatever partial pages remain, one byte at a time.
        while std::io::Write::write_all(&mut file, &[0]).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn put_environment(server: &Process, id: u64, pool: u32) {
    let (status, body) = server.call(
        "PUT",
        &format!("/execution-environments/{id}"),
        support::environment_body(id, pool),
    );
    assert!(status == 201 || status == 204, "{status} {body}");
}

fn claim(server: &Process, env: u64) -> (u16, String) {
    let (status, body) = server.call(
        "POST",
        "/runners",
        json!({"executionEnvironmentId": env, "inactivityTimeout": 0}),
    );
    let id = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["runnerId"].as_str().map(str::to_owned));
    (status, id.unwrap_or(body))
}

fn copy(server: &Process, runner: &str, name: &str, content: &[u8]) -> (u16, String) {
    server.call(
        "PATCH",
        &format!("/runners/{runner}/files"),
        json!({"copy": [{"path": name, "content": support::base64(content)}]}),
    )
}

fn read(server: &Process, runner: &str, name: &str) -> (u16, String) {
    server.call(
        "GET",
        &format!("/runners/{runner}/files/raw?path={name}"),
        json!(null),
    )
}

fn used_runners(server: &Process, env: u64) -> u64 {
    let (status, body) = server.call("GET", "/statistics/execution-environments", json!(null));
    assert_eq!(status, 200);
    let figures: Value = serde_json::from_str(&body).expect("json");
    figures[env.to_string()]["usedRunners"]
        .as_u64()
        .unwrap_or(0)
}

fn workspace(state: &Path, runner: &str) -> PathBuf {
    state.join("workspaces").join(runner)
}

/// Every file below `dir` whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.extend(files_named(&path, needle));
        } else if entry.file_name().to_string_lossy().contains(needle) {
            found.push(path);
        }
    }
    found
}

/// Whether a runner's files are a directory of the state directory (`process` executor);
/// a sandbox's are inside the sandbox.
fn records_runners() -> bool {
    support::process_executor()
}

/// The executor's per-runner directories in the state directory.
fn runner_dirs(state: &Path) -> usize {
    let dir = match support::process_executor() {
        true => "workspaces",
        false => "sandbox",
    };
    fs::read_dir(state.join(dir)).map_or(0, Iterator::count)
}

#[test]
fn a_damaged_environment_file_stops_the_start_and_deletes_nothing() {
    let state = tempfile::tempdir().expect("state");
    let server = Process::start(state.path());
    put_environment(&server, 7, 0);
    put_environment(&server, 8, 0);
    let (status, runner) = claim(&server, 7);
    assert_eq!(status, 200, "{runner}");
    if records_runners() {
        assert_eq!(copy(&server, &runner, "work.py", b"print(1)").0, 204);
    }
    server.crash();

    let file = state.path().join("environments/7.json");
    let good = fs::read(&file).expect("environment file");
    fs::write(&file, &good[..good.len() / 2]).expect("truncate");
    let (status, log) = Process::spawn(state.path(), &[]).exit();
    assert!(!status.success(), "the server refuses to start:\n{log}");
    assert!(log.contains(&file.display().to_string()), "{log}");
    assert!(
        log.contains("quarantine"),
        "the message says what to do:\n{log}"
    );
    if records_runners() {
        assert!(workspace(state.path(), &runner).join("work.py").exists());
        assert!(state.path().join(format!("runners/{runner}.json")).exists());
    }

    // The operator moves the file aside: the server starts without that environment, and
    // its runner's record and workspace stay.
    let quarantine = state.path().join("quarantine");
    fs::create_dir_all(&quarantine).expect("quarantine");
    fs::rename(&file, quarantine.join("7.json")).expect("move");
    let server = Process::start(state.path());
    assert_eq!(
        server
            .call("GET", "/execution-environments/8", json!(null))
            .0,
        200
    );
    assert_eq!(
        server
            .call("GET", "/execution-environments/7", json!(null))
            .0,
        404
    );
    if !records_runners() {
        // Dropped, not crashed: what the test started goes with it.
        return;
    }
    server.crash();
    assert!(workspace(state.path(), &runner).join("work.py").exists());

    // Repaired and put back, the environment and its runner are as they were.
    fs::write(&file, &good).expect("repair");
    let server = Process::start(state.path());
    assert_eq!(read(&server, &runner, "work.py"), (200, "print(1)".into()));
}

#[test]
fn a_damaged_runner_record_stops_the_start_and_its_workspace_stays() {
    if !records_runners() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let server = Process::start(state.path());
    put_environment(&server, 7, 0);
    let (_, damaged) = claim(&server, 7);
    let (_, intact) = claim(&server, 7);
    assert_eq!(copy(&server, &damaged, "a.txt", b"keep me").0, 204);
    server.crash();

    let record = state.path().join(format!("runners/{damaged}.json"));
    fs::write(&record, b"{\"id\":").expect("truncate");
    fs::write(state.path().join("runners/leftover.tmp"), b"half").expect("temporary");
    let (status, log) = Process::spawn(state.path(), &[]).exit();
    assert!(!status.success());
    assert!(log.contains(&record.display().to_string()), "{log}");
    assert!(
        state.path().join("runners/leftover.tmp").exists(),
        "nothing changed"
    );

    fs::create_dir_all(state.path().join("quarantine")).expect("quarantine");
    fs::rename(
        &record,
        state.path().join(format!("quarantine/{damaged}.json")),
    )
    .expect("move");
    let server = Process::start(state.path());
    assert_eq!(
        read(&server, &intact, "missing").0,
        424,
        "the other runner is back"
    );
    assert_eq!(read(&server, &damaged, "a.txt").0, 410);
    assert!(
        workspace(state.path(), &damaged).join("a.txt").exists(),
        "a quarantined runner's files are never removed"
    );
    assert!(!state.path().join("runners/leftover.tmp").exists());
}

#[test]
fn every_answered_claim_survives_a_sigkill() {
    answered_claims_survive_a_sigkill(&[]);
}

#[test]
fn with_state_sync_every_answered_claim_survives_a_sigkill() {
    answered_claims_survive_a_sigkill(&["--state-sync", "true"]);
}

/// Claims 20 runners one after another, kills the server, and finds them all back.
fn answered_claims_survive_a_sigkill(flags: &[&str]) {
    let mut args = vec!["--capacity", "24"];
    args.extend_from_slice(flags);
    let state = tempfile::tempdir().expect("state");
    let server = Process::start_with(state.path(), &args);
    put_environment(&server, 3, 0);
    let runners: Vec<String> = (0..20)
        .map(|_| {
            let (status, id) = claim(&server, 3);
            assert_eq!(status, 200, "{id}");
            id
        })
        .collect();
    server.crash();
    let server = Process::start_with(state.path(), &args);
    for runner in &runners {
        assert_eq!(read(&server, runner, "none").0, 424, "{runner} is back");
    }
    assert_eq!(used_runners(&server, 3), 20);
}

#[test]
fn on_a_full_disk_claims_puts_and_copies_fail_and_change_nothing() {
    if !records_runners() {
        return;
    }
    let disk = Tmpfs::mount("8m");
    let state = disk.path().join("state");
    let server = Process::start(&state);
    put_environment(&server, 5, 1);
    let (status, runner) = claim(&server, 5);
    assert_eq!(status, 200, "{runner}");
    assert_eq!(copy(&server, &runner, "main.py", b"old").0, 204);
    // A prewarmed runner is ready, so the next claim needs nothing but its record.
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    while server
        .call("GET", "/statistics/execution-environments", json!(null))
        .1
        .contains("\"idleRunners\":0")
    {
        assert!(std::time::Instant::now() < deadline, "pool refilled");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let filler = disk.fill();

    let (status, body) = claim(&server, 5);
    assert_eq!(status, 500, "a claim that cannot be saved fails: {body}");
    let (status, _) = copy(&server, &runner, "main.py", &vec![b'n'; 1 << 20]);
    assert_eq!(status, 500);
    assert_eq!(read(&server, &runner, "main.py"), (200, "old".into()));
    assert!(files_named(&state.join("workspaces"), "partial").is_empty());
    let (status, _) = server.call(
        "PUT",
        "/execution-environments/5",
        json!({"image": support::TEST_IMAGE, "prewarmingPoolSize": 3, "memoryLimit": 64}),
    );
    assert_eq!(status, 500);
    let (_, body) = server.call("GET", "/execution-environments/5", json!(null));
    let environment: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        environment["prewarmingPoolSize"], 1,
        "a failed PUT is not visible"
    );
    assert_eq!(used_runners(&server, 5), 1);

    fs::remove_file(filler).expect("free the disk");
    server.crash();
    let server = Process::start(&state);
    assert_eq!(read(&server, &runner, "main.py"), (200, "old".into()));
    assert_eq!(
        used_runners(&server, 5),
        1,
        "the failed claim did not come back"
    );
    let (_, body) = server.call("GET", "/execution-environments/5", json!(null));
    assert!(body.contains("\"prewarmingPoolSize\":1"), "{body}");
    assert!(
        files_named(&state, ".tmp").is_empty(),
        "no temporary files stay"
    );
    drop(server);
}

#[test]
fn a_copy_cut_by_sigkill_leaves_the_old_or_the_new_file() {
    if !records_runners() {
        return;
    }
    let state = tempfile::tempdir().expect("state");
    let server = Process::start(state.path());
    put_environment(&server, 2, 0);
    let (_, runner) = claim(&server, 2);
    assert_eq!(copy(&server, &runner, "data.bin", b"old").0, 204);
    let big = vec![b'x'; 30 << 20];
    let body = json!({"copy": [{"path": "data.bin", "content": support::base64(&big)}]});
    let api = server.api.clone();
    let path = format!("/runners/{runner}/files");
    // The copy runs while the server is killed as soon as its temporary file appears.
    let sender = std::thread::spawn(move || {
        let request = ureq::http::Request::builder()
            .method("PATCH")
            .uri(format!("{api}{path}"))
            .body(body.to_string())
            .expect("request");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(support::TIMEOUT))
            .build()
            .into();
        let _ = agent.run(request);
    });
    let dir = workspace(state.path(), &runner);
    // On a slow or full disk the copy may end (or fail) before it is seen: the server is
    // killed then, and the file must still be old or new.
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    while files_named(&dir, "partial").is_empty() && !sender.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the copy began");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    server.crash();
    sender.join().expect("sender");
    let content = fs::read(dir.join("data.bin")).expect("file");
    assert!(
        content == b"old" || content == big,
        "old or new, not {} bytes",
        content.len()
    );
    let _server = Process::start(state.path());
    assert!(
        files_named(&dir, "partial").is_empty(),
        "cleaned up at start"
    );
}

#[test]
fn a_claim_racing_the_deletion_of_its_environment_leaves_no_record() {
    let state = tempfile::tempdir().expect("state");
    let server = Process::start_with(state.path(), &["--capacity", "24"]);
    put_environment(&server, 9, 0);
    let answered: u32 = std::thread::scope(|scope| {
        let claimers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut answered = 0;
                    // Claims until the environment is gone.
                    for _ in 0..500 {
                        match claim(&server, 9).0 {
                            200 => answered += 1,
                            _ => break,
                        }
                    }
                    answered
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + support::TIMEOUT;
        while used_runners(&server, 9) < 8 {
            assert!(std::time::Instant::now() < deadline, "claims succeed");
            std::thread::yield_now();
        }
        let (status, _) = server.call("DELETE", "/execution-environments/9", json!(null));
        assert_eq!(status, 204);
        claimers
            .into_iter()
            .map(|t| t.join().expect("claims"))
            .sum()
    });
    assert!(answered >= 8);
    server.crash();
    let records = fs::read_dir(state.path().join("runners"))
        .expect("runners")
        .count();
    assert_eq!(records, 0, "no record outlives its environment");
    let _server = Process::start(state.path());
    assert_eq!(
        runner_dirs(state.path()),
        0,
        "no runner of the deleted environment is kept"
    );
}

#[test]
fn lists_a_client_sends_are_bounded() {
    let state = tempfile::tempdir().expect("state");
    let server = Process::start(state.path());
    let mut body = support::environment_body(4, 0);
    body["exposedPorts"] = json!((1..=64).collect::<Vec<u16>>());
    assert_eq!(
        server
            .call("PUT", "/execution-environments/4", body.clone())
            .0,
        201
    );
    body["exposedPorts"] = json!((1..=65).collect::<Vec<u16>>());
    let (status, message) = server.call("PUT", "/execution-environments/4", body);
    assert_eq!(status, 400);
    assert!(message.contains("exposedPorts"), "{message}");
}
