//! Runner lifecycle around executions: deletion, inactivity, shutdown and restart.

mod support;

use serde_json::json;
use support::TestServer;

#[test]
fn deleting_the_runner_ends_its_executions_with_an_error() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo started; sleep 60", 60);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("started");
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 204);
    let transcript = ws.transcript_rest();
    assert_eq!(
        transcript.end,
        json!({"type": "error", "data": "the allocation stopped as expected"})
    );
    assert_eq!(server.delete(&format!("/runners/{runner}")).status, 410);
}

#[test]
fn deleting_the_environment_ends_the_executions_of_its_runners() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo started; sleep 60", 60);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("started");
    assert_eq!(server.delete("/execution-environments/1").status, 204);
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.end["type"], "error");
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
}

#[test]
fn the_inactivity_timeout_destroys_the_runner_even_during_an_execution() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 1);
    // Longer than the client's read timeout: without the expiry the test fails.
    let url = server.execute(&runner, "sleep 60", 0);
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.end, json!({"type": "timeout"}));
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
}

#[test]
fn connecting_an_execution_restarts_the_inactivity_timeout() {
    let server = TestServer::start();
    server.environment(1, 0);
    let runner = server.runner(1, 2);
    // Three short executions spread over more than the 2 s timeout keep the runner alive.
    for _ in 0..3 {
        let url = server.execute(&runner, "sleep 0.9", 5);
        assert_eq!(server.connect(&url).transcript().exit_code(), Some(0));
    }
    assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 200);
}

#[test]
fn shutting_down_ends_running_executions_with_an_error_and_leaves_no_process() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let marker = format!("shutdown-marker-{}", std::process::id());
    let url = server.execute(
        &runner,
        &format!("echo started; exec -a {marker} sleep 60"),
        60,
    );
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("started");
    let stopping = std::thread::spawn(move || server.stop());
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.end["type"], "error", "{transcript:?}");
    drop(stopping.join().expect("shutdown"));
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "left behind: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

#[test]
fn a_claimed_runner_and_its_files_survive_a_restart() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    server.copy(&runner, &[("main.py", "print(42)\n")]);
    let stored = server.execute(&runner, "true", 5);
    let state = server.stop();
    let server = TestServer::start_in(state, |_| {});
    if !support::process_executor() {
        // Sandboxes end with the server that ran them; the environment and its pool are back.
        assert_eq!(server.get(&format!("/runners/{runner}/files")).status, 410);
        server.wait_idle(1, 1);
        return;
    }
    let listing = server.get(&format!("/runners/{runner}/files"));
    assert_eq!(listing.status, 200, "{}", listing.text());
    assert_eq!(listing.json()["files"][0]["name"], "./main.py");
    assert_eq!(server.run(&runner, "cat main.py").stdout, "print(42)\r\n");
    // Executions stored before the restart are gone (404 on the new listener).
    let path = &stored[stored.find("/api/v1/").expect("path")..];
    let moved = format!("ws://{}{path}", server.handle().websocket_addr());
    let err = support::Ws::connect(&moved, None).err().expect("refused");
    assert!(err.contains("404"), "{err}");
}
