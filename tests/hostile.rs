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
    assert_eq!(
        server.get("/execution-environments/1").status,
        404,
        "nothing was created"
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
