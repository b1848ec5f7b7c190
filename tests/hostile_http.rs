//! Hostile HTTP clients before authentication: endless heads, many connections, stalled bodies,
//! smuggled requests, slow readers of downloads, and requests on the wrong listener. Each gets
//! an answer (or is closed) and the server keeps serving everyone else with bounded threads.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
};

use support::{TIMEOUT, TestServer};

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    stream
}

/// Reads until the server closes the connection (or the timeout); what it sent.
fn read_to_close(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads the status line of one answer.
fn status_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0];
    while stream.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).trim_end().to_owned()
}

/// Threads of this process (the server runs in it).
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("tasks").count()
}

#[test]
fn an_endless_header_line_is_answered_431_and_closed() {
    let server = TestServer::start();
    let mut stream = connect(server.handle().http_addr());
    let mut writer = stream.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let _ = writer.write_all(b"GET /api/v1/version HTTP/1.1\r\nHost: x\r\nX-Endless: ");
        let chunk = [b'a'; 64 << 10];
        // 64 MiB at most: without a bound the server buffers all of it.
        for _ in 0..1024 {
            if writer.write_all(&chunk).is_err() {
                return true;
            }
        }
        false
    });
    let answer = read_to_close(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(sender.join().expect("sender"), "the server read all of it");
    let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
    let mut stream = connect(server.handle().http_addr());
    stream.write_all(long_target.as_bytes()).expect("write");
    assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 414"));
    assert_eq!(server.get("/health").status, 204);
}

#[test]
fn connections_beyond_the_limit_are_refused_and_the_rest_served() {
    let server = TestServer::start_with(|config| config.server.max_connections = 8);
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| connect(server.handle().http_addr()))
        .collect();
    // The front has taken them once a ninth connection is refused.
    let mut refused = connect(server.handle().http_addr());
    assert!(read_to_close(&mut refused).starts_with("HTTP/1.1 503"));
    drop(idle);
    support::eventually("a connection is served again", || {
        let mut stream = connect(server.handle().http_addr());
        let _ = stream.write_all(b"GET /api/v1/health HTTP/1.1\r\nConnection: close\r\n\r\n");
        read_to_close(&mut stream).starts_with("HTTP/1.1 204")
    });
}

#[test]
fn stalled_requests_with_large_bodies_take_no_thread_each() {
    let server = TestServer::start_with(|config| {
        config.server.token = Some(support::TOKEN.into());
        config.server.max_body_bytes = 1 << 20;
    });
    let before = threads();
    let mut stalled = Vec::new();
    for index in 0..300 {
        let mut stream = connect(server.handle().http_addr());
        // Unauthorized (401) and too large (413), both announcing far more than they send.
        let token = if index % 2 == 0 {
            "wrong"
        } else {
            support::TOKEN
        };
        let head = format!(
            "PUT /api/v1/execution-environments/1 HTTP/1.1\r\nHost: x\r\n\
             Poseidon-Token: {token}\r\nContent-Length: 100000000\r\n\r\n{{\"id\""
        );
        stream.write_all(head.as_bytes()).expect("write");
        stalled.push(stream);
    }
    for (index, stream) in stalled.iter_mut().enumerate() {
        let expected = if index % 2 == 0 { "401" } else { "413" };
        let line = status_line(stream);
        assert!(line.contains(expected), "{index}: {line:?}");
    }
    let during = threads();
    assert!(
        during < before + 50,
        "{before} threads before, {during} with 300 stalled requests"
    );
    drop(stalled);
    assert_eq!(server.get("/health").status, 204);
}

#[test]
fn clients_that_do_not_read_downloads_do_not_stall_the_api() {
    let server = TestServer::start_with(|config| config.server.workers = 2);
    let runner = server.ready_runner();
    let made = server.run(&runner, "head -c 60000000 /dev/zero > big && echo made");
    assert_eq!(made.stdout, "made\r\n");
    // More slow readers than there are workers; none of them reads a byte.
    let mut readers = Vec::new();
    for _ in 0..6 {
        let mut stream = connect(server.handle().http_addr());
        let request =
            format!("GET /api/v1/runners/{runner}/files/raw?path=big HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).expect("write");
        readers.push(stream);
    }
    let listing =
        format!("GET /api/v1/runners/{runner}/files?path=/&recursive=true HTTP/1.1\r\n\r\n");
    for _ in 0..4 {
        let mut stream = connect(server.handle().http_addr());
        stream.write_all(listing.as_bytes()).expect("write");
        readers.push(stream);
    }
    assert_eq!(server.get("/health").status, 204);
    assert_eq!(server.get("/version").status, 200);
    let other = server.runner(1, 0);
    assert_eq!(server.run(&other, "echo fine").stdout, "fine\r\n");
    drop(readers);
}

#[test]
fn smuggled_requests_are_refused_and_never_acted_on() {
    let server = TestServer::start();
    let hidden = "PUT /api/v1/execution-environments/77 HTTP/1.1\r\nHost: x\r\n\
                  Content-Length: 120\r\n\r\n{\"id\":77,\"image\":\"openhpi/co_execenv_python:3.8\",\
                  \"prewarmingPoolSize\":0,\"cpuLimit\":20,\"memoryLimit\":64,\"networkAccess\":false}";
    let lengths = [
        "Content-Length: -1\r\n".to_owned(),
        "Content-Length: 99999999999999999999\r\n".to_owned(),
        format!("Content-Length: 0\r\nContent-Length: {}\r\n", hidden.len()),
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            hidden.len()
        ),
    ];
    for length in lengths {
        let mut stream = connect(server.handle().http_addr());
        let request = format!("GET /api/v1/version HTTP/1.1\r\nHost: x\r\n{length}\r\n{hidden}");
        stream.write_all(request.as_bytes()).expect("write");
        let answer = read_to_close(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 400"), "{length:?}: {answer:?}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer:?}");
        assert_eq!(server.get("/execution-environments/77").status, 404);
    }
}

#[test]
fn every_request_gets_an_answer_on_either_listener() {
    let server = TestServer::start();
    let mut plain = connect(server.handle().websocket_addr());
    plain
        .write_all(b"GET /api/v1/runners/1-x/websocket?executionID=y HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let answer = read_to_close(&mut plain);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    for addr in [
        server.handle().http_addr(),
        server.handle().websocket_addr(),
    ] {
        let mut odd = connect(addr);
        odd.write_all("GET /api/v1/vérsion HTTP/1.1\r\nHost: x\r\n\r\n".as_bytes())
            .expect("write");
        let answer = read_to_close(&mut odd);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
}

#[test]
fn websocket_upgrades_are_served_on_the_api_port_too() {
    let server = TestServer::start();
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo over the api port", 10);
    let ws_port = server.handle().websocket_addr().port().to_string();
    let api_port = server.handle().http_addr().port().to_string();
    let url = url.replacen(&format!(":{ws_port}/"), &format!(":{api_port}/"), 1);
    let transcript = server.connect(&url).transcript();
    assert_eq!(transcript.stdout, "over the api port\r\n");
    assert_eq!(transcript.exit_code(), Some(0));
}

#[test]
fn pipelined_and_chunked_requests_are_served_in_order() {
    let server = TestServer::start();
    let mut stream = connect(server.handle().http_addr());
    let body = "{\"id\":5,\"image\":\"openhpi/co_execenv_python:3.8\",\"prewarmingPoolSize\":0,\
                \"cpuLimit\":20,\"memoryLimit\":64,\"networkAccess\":false}";
    let (first, second) = body.split_at(20);
    let request = format!(
        "PUT /api/v1/execution-environments/5 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{first}\r\n{:x}\r\n{second}\r\n0\r\n\r\n\
         GET /api/v1/execution-environments/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        first.len(),
        second.len()
    );
    stream.write_all(request.as_bytes()).expect("write");
    let answer = read_to_close(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer:?}");
    assert!(answer.contains("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("\"memoryLimit\":64"), "{answer:?}");
}

#[test]
fn a_client_that_takes_a_download_too_slowly_is_cut_off() {
    let server = TestServer::start_with(|config| config.server.http_timeout_secs = 1);
    let runner = server.ready_runner();
    let made = server.run(&runner, "head -c 40000000 /dev/zero > big && echo made");
    assert_eq!(made.stdout, "made\r\n");
    let mut stream = connect(server.handle().http_addr());
    let request = format!("GET /api/v1/runners/{runner}/files/raw?path=big HTTP/1.1\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write");
    // 64 KiB every 100 ms: each write of the server makes progress well within its timeout,
    // but the whole answer would take a minute.
    let mut received = 0;
    let mut chunk = vec![0; 64 << 10];
    while received < 20_000_000 {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(read) => received += read,
        }
        thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        received < 20_000_000,
        "the slow client got {received} bytes"
    );
    assert_eq!(server.get("/health").status, 204);
}

#[test]
fn one_listener_serves_the_api_and_websockets_when_the_ports_are_the_same() {
    // A port that was free a moment ago (the server binds it again at once).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let server = TestServer::start_with(|config| {
        config.server.port = port;
        config.server.websocket_port = Some(port);
    });
    assert_eq!(
        server.handle().websocket_addr(),
        server.handle().http_addr()
    );
    let runner = server.ready_runner();
    let url = server.execute(&runner, "echo one port", 10);
    assert!(url.contains(&format!(":{port}/")), "{url}");
    assert_eq!(server.connect(&url).transcript().stdout, "one port\r\n");
}
