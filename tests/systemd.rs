//! systemd integration of the binary: the test plays the service manager. It receives the
//! notifications on a socket of its own (`NOTIFY_SOCKET`), asks for a watchdog, and passes
//! listening sockets as systemd does (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`).

mod support;

use std::{
    net::TcpListener,
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::json;
use support::{TIMEOUT, Ws};

/// A server process started by the test, stopped with SIGTERM when dropped.
struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    _state: tempfile::TempDir,
}

impl Process {
    fn start(mut command: Command) -> Process {
        let state = tempfile::tempdir().expect("state directory");
        let mut child = command
            .args([
                "--executor",
                "process",
                "--log-level",
                "info",
                "--state-dir",
            ])
            .arg(state.path())
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let lines = support::process::stderr_lines(&mut child);
        Process {
            child,
            lines,
            _state: state,
        }
    }

    /// Waits for a log line containing `needle`; returns what follows it.
    fn wait_for(&self, needle: &str) -> String {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no log line with {needle:?} in {seen:#?}"));
            seen.push(line.clone());
            if let Some((_, rest)) = line.split_once(needle) {
                return rest.trim().to_owned();
            }
        }
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        assert!(status.expect("kill runs").success());
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.terminate();
            let _ = self.wait();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .into()
}

fn get(url: &str) -> (u16, String) {
    let mut response = agent().get(url).call().expect("request succeeds");
    let status = response.status().as_u16();
    (
        status,
        response.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// The next notification, as text.
fn next(socket: &UnixDatagram) -> String {
    let mut buffer = [0; 4096];
    let length = socket.recv(&mut buffer).expect("a notification in time");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[test]
fn readiness_watchdog_and_stopping_are_notified() {
    let dir = tempfile::tempdir().expect("directory");
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut command = binary();
    command
        .args(["--port", "0", "--websocket-port", "0"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "200000");
    let mut server = Process::start(command);
    assert_eq!(next(&socket), "READY=1");
    // Ready means listening: the API answers now.
    let api = server.wait_for("HTTP API listening on ");
    assert_eq!(get(&format!("{api}/version")).0, 200);
    for _ in 0..3 {
        assert_eq!(next(&socket), "WATCHDOG=1");
    }
    // Each WATCHDOG=1 followed a real request to the server's own listener: the test itself
    // never asked for /health.
    let (status, metrics) = get(&format!("{api}/metrics"));
    assert_eq!(status, 200);
    let checks: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("poseidon_http_requests_total{route=\"health\",status=\"204\"} ")
        })
        .expect("health requests counted")
        .parse()
        .expect("a number");
    assert!(checks >= 3.0, "{checks} self-checks");
    server.terminate();
    loop {
        if next(&socket) == "STOPPING=1" {
            break;
        }
    }
    assert!(server.wait().success());
}

#[test]
fn an_abstract_notify_socket_is_used() {
    let name = format!("poseidon-lite-test-notify-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .expect("abstract address");
    let socket = UnixDatagram::bind_addr(&address).expect("notify socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut command = binary();
    command
        .args(["--port", "0", "--websocket-port", "0"])
        .env("NOTIFY_SOCKET", format!("@{name}"));
    let _server = Process::start(command);
    assert_eq!(next(&socket), "READY=1");
}

/// A listening socket and a copy of it, numbered 20 or higher (so never 3 or 4), that a child
/// process inherits.
fn inheritable_listener() -> (TcpListener, std::os::fd::OwnedFd) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let copy = rustix::io::fcntl_dupfd_cloexec(&listener, 20).expect("copy");
    rustix::io::fcntl_setfd(&copy, rustix::io::FdFlags::empty()).expect("inheritable");
    (listener, copy)
}

#[test]
fn socket_activation_serves_on_the_inherited_sockets() {
    use std::os::fd::AsRawFd;
    let (http, http_fd) = inheritable_listener();
    let (websocket, ws_fd) = inheritable_listener();
    let (http_port, ws_port) = (
        http.local_addr().expect("address").port(),
        websocket.local_addr().expect("address").port(),
    );
    // As systemd does: the sockets become descriptors 3 and 4 of a process whose own pid is
    // in LISTEN_PID (bash's pid is kept by exec; bash, unlike dash, takes descriptors above 9).
    let script = format!(
        "exec 3<&{http} 4<&{ws} {http}<&- {ws}<&-; LISTEN_PID=$$ exec \"$0\" \"$@\"",
        http = http_fd.as_raw_fd(),
        ws = ws_fd.as_raw_fd()
    );
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_poseidon-lite"))
        // Ports that are taken would fail a bind: the server must not bind them.
        .args(["--port", &http_port.to_string()])
        .args(["--systemd-socket-activation", "true"])
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "http:websocket");
    let server = Process::start(command);
    drop((http, websocket, http_fd, ws_fd));
    let api = server.wait_for("HTTP API listening on ");
    assert_eq!(api, format!("http://127.0.0.1:{http_port}/api/v1"));
    let put = agent()
        .put(format!("{api}/execution-environments/3"))
        .send(support::environment_body(3, 1).to_string())
        .expect("PUT");
    assert_eq!(put.status().as_u16(), 201);
    let mut claimed = agent()
        .post(format!("{api}/runners"))
        .send(json!({"executionEnvironmentId": 3, "inactivityTimeout": 0}).to_string())
        .expect("claim");
    let runner: serde_json::Value =
        serde_json::from_str(&claimed.body_mut().read_to_string().expect("body")).expect("json");
    let runner = runner["runnerId"].as_str().expect("runnerId");
    let mut executed = agent()
        .post(format!("{api}/runners/{runner}/execute"))
        .send(json!({"command": "echo activated", "timeLimit": 10}).to_string())
        .expect("execute");
    let url: serde_json::Value =
        serde_json::from_str(&executed.body_mut().read_to_string().expect("body")).expect("json");
    let url = url["websocketUrl"].as_str().expect("websocketUrl");
    assert!(
        url.starts_with(&format!("ws://127.0.0.1:{ws_port}/")),
        "{url}"
    );
    let transcript = Ws::connect(url, None).expect("connect").transcript();
    assert_eq!(transcript.stdout, "activated\r\n");
}

#[test]
fn socket_activation_without_sockets_is_an_error() {
    let mut command = binary();
    command.args(["--systemd-socket-activation", "true"]);
    let mut server = Process::start(command);
    let message = server.wait_for("poseidon-lite: ");
    assert!(message.contains("LISTEN_FDS"), "{message}");
    assert!(!server.wait().success());
}
