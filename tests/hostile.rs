//! Clients that misbehave: they stall, vanish or send garbage. The server cuts them off and
//! keeps serving everyone else.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use support::{TIMEOUT, TestServer};

/// Reads until the server closes the connection; returns what it sent.
fn read_until_closed(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn a_client_that_stalls_mid_request_is_disconnected_and_others_are_served() {
    let server = TestServer::start_with(|config| config.server.http_timeout_secs = 1);
    let mut slow = TcpStream::connect(server.handle().http_addr()).expect("connect");
    slow.write_all(b"PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    assert_eq!(server.get("/health").status, 204);
    let answer = read_until_closed(&mut slow);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer:?}"
    );
}

#[test]
fn the_listener_keeps_accepting_after_idling_longer_than_the_timeout() {
    let server = TestServer::start_with(|config| config.server.http_timeout_secs = 1);
    std::thread::sleep(Duration::from_millis(2500));
    // A fresh connection, not one the client pooled.
    let mut fresh = TcpStream::connect(server.handle().http_addr()).expect("connect");
    fresh
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    assert!(read_until_closed(&mut fresh).starts_with("HTTP/1.1 204"));
}

#[test]
fn a_client_that_stalls_while_sending_a_body_gets_an_error_and_others_are_served() {
    let server = TestServer::start_with(|config| config.server.http_timeout_secs = 1);
    let mut slow = TcpStream::connect(server.handle().http_addr()).expect("connect");
    slow.write_all(
        b"PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{\"image\"",
    )
    .expect("write");
    assert_eq!(server.get("/health").status, 204);
    let answer = read_until_closed(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // A fresh connection: the pooled one idled as long as the timeout and may be closing.
    let mut fresh = TcpStream::connect(server.handle().http_addr()).expect("connect");
    fresh
        .write_all(b"GET /api/v1/execution-environments/1 HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let answer = read_until_closed(&mut fresh);
    assert!(
        answer.starts_with("HTTP/1.1 404"),
        "nothing was created: {answer:?}"
    );
}

#[test]
fn a_websocket_client_that_never_completes_its_handshake_is_disconnected() {
    let server = TestServer::start_with(|config| config.server.websocket_timeout_secs = 1);
    let mut silent = TcpStream::connect(server.handle().websocket_addr()).expect("connect");
    silent
        .write_all(b"GET /api/v1/runners/1-x/websocket HTTP/1.1\r\n")
        .expect("write");
    let answer = read_until_closed(&mut silent);
    assert!(!answer.starts_with("HTTP/1.1 101"), "{answer:?}");
    // The listener still serves executions.
    let runner = server.ready_runner();
    assert_eq!(server.run(&runner, "true").exit_code(), Some(0));
}

#[test]
fn garbage_on_the_websocket_port_is_refused() {
    let server = TestServer::start();
    let mut garbage = TcpStream::connect(server.handle().websocket_addr()).expect("connect");
    garbage
        .write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .expect("write");
    let answer = read_until_closed(&mut garbage);
    assert!(!answer.contains("101"), "{answer:?}");
    let runner = server.ready_runner();
    assert_eq!(server.run(&runner, "true").exit_code(), Some(0));
}

#[test]
fn a_client_that_vanishes_mid_execution_does_not_disturb_the_runner() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo started; while true; do echo spam; done", 30);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("started");
    // Drop the TCP connection without a close frame.
    ws.socket
        .get_mut()
        .shutdown(std::net::Shutdown::Both)
        .expect("shutdown");
    drop(ws);
    std::thread::sleep(Duration::from_millis(100));
    let transcript = server.run(&runner, "echo still here");
    assert_eq!(transcript.stdout, "still here\r\n");
}

#[test]
fn a_client_that_does_not_read_output_slows_the_program_without_growing_the_server() {
    let server = TestServer::start_with(|config| config.server.websocket_timeout_secs = 2);
    let runner = server.ready_runner();
    let marker = format!("unread-{}", std::process::id());
    let url = server.execute(&runner, &format!("exec -a {marker} yes"), 30);
    let ws = server.connect(&url);
    // Never read: the server's writes stall, then time out and the execution is stopped.
    std::thread::sleep(Duration::from_secs(4));
    drop(ws);
    let check = format!(
        "pgrep -f [{}]{} >/dev/null && echo running || echo stopped",
        &marker[..1],
        &marker[1..]
    );
    let transcript = server.run(&runner, &check);
    assert_eq!(transcript.stdout, "stopped\r\n");
}

#[test]
fn a_websocket_client_that_trickles_its_handshake_is_cut_off() {
    let server = TestServer::start_with(|config| config.server.websocket_timeout_secs = 1);
    let stream = TcpStream::connect(server.handle().websocket_addr()).expect("connect");
    let mut trickle = stream.try_clone().expect("clone");
    // One byte well within the read timeout, forever: only an overall deadline ends this.
    std::thread::spawn(move || {
        for byte in b"GET /api/v1/runners/1-x/websocket HTTP/1.1\r\nX-Padding: "
            .iter()
            .cycle()
        {
            if trickle.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut reader = stream;
    reader.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut received = Vec::new();
    let closed = reader.read_to_end(&mut received);
    assert!(closed.is_ok(), "the server kept the connection: {closed:?}");
    assert!(!String::from_utf8_lossy(&received).contains(" 101 "));
}

/// Whether a process whose command line contains `marker` runs on this host (runners'
/// processes included: the sandbox's are host processes too).
fn process_running(marker: &str) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
    })
}

#[test]
fn the_time_limit_ends_the_program_while_the_client_does_not_read() {
    // Writes to the client could wait ten minutes; the time limit is one second.
    let server = TestServer::start_with(|config| config.server.websocket_timeout_secs = 600);
    let runner = server.ready_runner();
    let marker = format!("unread-limit-{}", std::process::id());
    let url = server.execute(&runner, &format!("exec -a {marker} yes"), 1);
    let ws = server.connect(&url);
    support::eventually("the program runs", || process_running(&marker));
    support::eventually("the program ends at its time limit", || {
        !process_running(&marker)
    });
    // The client reads again: the output written so far, then `timeout`.
    let transcript = ws.transcript();
    assert_eq!(transcript.end, serde_json::json!({"type": "timeout"}));
}

#[test]
fn a_close_is_seen_while_the_program_does_not_read_its_input() {
    let server = TestServer::start_with(|config| config.server.websocket_timeout_secs = 600);
    let runner = server.ready_runner();
    let marker = format!("unread-input-{}", std::process::id());
    let command = format!("stty raw -echo; echo ready; exec -a {marker} sleep 600");
    let url = server.execute(&runner, &command, 600);
    let mut ws = server.connect(&url);
    ws.wait_for_stdout("ready");
    support::eventually("the program runs", || process_running(&marker));
    // Far more than a terminal and a pipe hold; the sends must not block.
    let chunk = "x".repeat(60_000);
    for _ in 0..50 {
        ws.send(&chunk);
    }
    ws.socket.close(None).expect("close");
    let _ = ws.socket.flush();
    drop(ws);
    support::eventually("the close ends the program", || !process_running(&marker));
}

#[test]
fn an_oversized_message_is_explained_and_closed_with_1009() {
    use tungstenite::{Message, protocol::frame::coding::CloseCode};
    let server = TestServer::start_with(|config| config.server.max_message_bytes = 1024);
    let runner = server.ready_runner();
    let url = server.execute(&runner, "cat", 30);
    let mut ws = server.connect(&url);
    ws.socket
        .send(Message::text("x".repeat(4096)))
        .expect("send");
    let mut messages = Vec::new();
    let close = loop {
        match ws.socket.read() {
            Ok(Message::Text(text)) => {
                messages.push(serde_json::from_str::<serde_json::Value>(&text).expect("JSON"));
            }
            Ok(Message::Close(frame)) => break frame.map(|frame| frame.code),
            Ok(_) => {}
            Err(err) => panic!("no close frame: {err} after {messages:?}"),
        }
    };
    let last = messages.last().expect("a final message");
    assert_eq!(last["type"], "error", "{messages:?}");
    assert!(
        last["data"].as_str().unwrap_or_default().contains("1024"),
        "{last}"
    );
    assert_eq!(close, Some(CloseCode::Size));
}
