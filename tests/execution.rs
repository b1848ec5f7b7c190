//! Executions over the WebSocket: protocol, terminal, stdin, stderr, exit codes and limits.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{TestServer, Ws};

#[test]
fn a_command_streams_output_and_exits_with_its_code() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let transcript = server.run(&runner, "echo hello; echo oops >&2; exit 3");
    assert_eq!(transcript.stdout, "hello\r\n");
    assert_eq!(transcript.stderr, "oops\n");
    assert_eq!(transcript.end, json!({"type": "exit", "data": 3}));
}

#[test]
fn the_terminal_echoes_stdin_and_the_program_reads_it() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "head -n 1", 20);
    let mut ws = server.connect(&url);
    assert_eq!(ws.next(), Some(json!({"type": "start"})));
    ws.send("Hello World!\n");
    let transcript = ws.transcript_rest();
    assert_eq!(
        transcript.stdout.matches("Hello World!\r\n").count(),
        2,
        "{transcript:?}"
    );
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn the_time_limit_ends_the_execution_with_timeout() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let started = Instant::now();
    let url = server.execute(&runner, "sleep 30", 1);
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.end, json!({"type": "timeout"}));
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn an_execution_id_is_single_use() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "true", 5);
    server.connect(&url).transcript();
    let err = Ws::connect(&url, None)
        .err()
        .expect("second connect refused");
    assert!(err.contains("404"), "{err}");
}
