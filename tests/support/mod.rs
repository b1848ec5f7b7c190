//! Test harness: a real server on ephemeral loopback ports with a fresh state directory, an
//! HTTP client that returns every status, and a WebSocket client for executions. Every
//! blocking call has a timeout, so a hang fails the test instead of the CI run.
#![allow(dead_code)]

pub mod process;
pub mod sandbox;
pub mod slots;

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use poseidon_lite::{Config, Server, ServerHandle, config::ExecutorKind};
use serde_json::{Value, json};
use tungstenite::{
    Message, WebSocket, client::IntoClientRequest, protocol::frame::coding::CloseCode,
};

/// The server's allocator, as the binary installs it.
#[global_allocator]
static ALLOCATOR: poseidon_lite::Allocator = poseidon_lite::Allocator;

/// Timeout of every client call.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Test servers started by this process.
static SERVERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The image of the test environments.
pub const TEST_IMAGE: &str = "openhpi/co_execenv_python:3.8";

/// The token used by servers started with authentication.
pub const TOKEN: &str = "s3cr3t-t0ken";

/// Whether the process executor runs the tests (it takes claimed runners back after a restart
/// and its file system view is the workspace).
pub fn process_executor() -> bool {
    executor_kind() == ExecutorKind::Process
}

/// Which executor a test server uses: `POSEIDON_TEST_EXECUTOR` (`process` by default).
pub fn executor_kind() -> ExecutorKind {
    match std::env::var("POSEIDON_TEST_EXECUTOR").as_deref() {
        Ok("sandbox") => ExecutorKind::Sandbox,
        _ => ExecutorKind::Process,
    }
}

/// The executor's name as the `--executor` flag takes it.
pub fn executor_name() -> &'static str {
    match executor_kind() {
        ExecutorKind::Sandbox => "sandbox",
        ExecutorKind::Process => "process",
    }
}

/// A running server and a client for it.
pub struct TestServer {
    handle: Option<ServerHandle>,
    pub state: tempfile::TempDir,
    pub base: String,
    agent: ureq::Agent,
    pub token: Option<String>,
    cgroup_name: String,
    /// The sandbox executor's uid blocks (released after the server's runners are gone).
    _uids: Option<slots::UidBlocks>,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("body is not JSON ({err}): {:?}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `message` of a JSON error body.
    #[track_caller]
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl TestServer {
    /// A server with the default test configuration.
    pub fn start() -> TestServer {
        Self::start_with(|_| {})
    }

    /// A server whose configuration `adjust` may change first.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let state = tempfile::tempdir().expect("temporary state directory");
        Self::start_in(state, adjust)
    }

    /// A server on an existing state directory (to test restarts).
    pub fn start_in(state: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::ephemeral(state.path());
        config.runner.executor = executor_kind();
        config.sandbox.agent = Some(env!("CARGO_BIN_EXE_poseidon-lite").into());
        // The image CodeOcean's environments name, served by the host's file system.
        config
            .sandbox
            .images
            .insert(TEST_IMAGE.into(), "host".into());
        // Parallel test servers (nextest runs each test in a process of its own) get cgroups
        // and uid ranges of their own: 64 runners' worth each.
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        config.sandbox.cgroup_name =
            format!("poseidon-lite-server-test-{}-{n}", std::process::id());
        config.runner.capacity = 64;
        config.runner.prewarm_threads = 2;
        adjust(&mut config);
        let uids = (config.runner.executor == ExecutorKind::Sandbox).then(|| {
            let uids = slots::claim_for(config.runner.capacity);
            config.sandbox.uid_base = uids.base();
            uids
        });
        let token = config.server.token.clone();
        let cgroup_name = config.sandbox.cgroup_name.clone();
        let handle = Server::bind(config)
            .expect("server binds")
            .spawn()
            .expect("server starts");
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into();
        let base = handle.url();
        TestServer {
            handle: Some(handle),
            state,
            base,
            agent,
            token,
            cgroup_name,
            _uids: uids,
        }
    }

    /// Ids of the runners that exist (idle or claimed), from the executor's per-runner
    /// directories in the state directory.
    pub fn runner_dirs(&self) -> std::collections::BTreeSet<String> {
        let dir = match executor_kind() {
            ExecutorKind::Process => "workspaces",
            ExecutorKind::Sandbox => "sandbox",
        };
        match std::fs::read_dir(self.state.path().join(dir)) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Default::default(),
        }
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().expect("server running")
    }

    /// Stops the server and returns its state directory (for restarts).
    pub fn stop(mut self) -> tempfile::TempDir {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
        let dir = tempfile::tempdir().expect("placeholder");
        std::mem::replace(&mut self.state, dir)
    }

    /// Sends a request; `body` is sent as is.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
        self.request_with(method, path, body, self.token.as_deref())
    }

    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        builder = builder.header("Content-Type", "application/json");
        if let Some(token) = token {
            builder = builder.header("Poseidon-Token", token);
        }
        let request = builder
            .body(body.map(<[u8]>::to_vec).unwrap_or_default())
            .expect("request");
        let mut response = self
            .agent
            .run(request)
            .unwrap_or_else(|err| panic!("{method} {path} failed: {err}"));
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap_or_else(|err| panic!("reading {method} {path} failed: {err}"));
        Answer {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.request("GET", path, None)
    }

    pub fn delete(&self, path: &str) -> Answer {
        self.request("DELETE", path, None)
    }

    pub fn send(&self, method: &str, path: &str, body: &Value) -> Answer {
        self.request(method, path, Some(body.to_string().as_bytes()))
    }

    /// Creates an environment with a pool of `pool` runners.
    #[track_caller]
    pub fn environment(&self, id: u64, pool: u32) {
        let answer = self.send(
            "PUT",
            &format!("/execution-environments/{id}"),
            &environment_body(id, pool),
        );
        assert!(
            matches!(answer.status, 201 | 204),
            "PUT environment: {answer:?}"
        );
    }

    /// Waits until the environment's pool has `idle` runners.
    #[track_caller]
    pub fn wait_idle(&self, id: u64, idle: u64) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let stats = self.get("/statistics/execution-environments").json();
            if stats[id.to_string()]["idleRunners"] == json!(idle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pool of {id} never reached {idle}: {stats}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Claims a runner of `env`.
    #[track_caller]
    pub fn runner(&self, env: u64, inactivity: u64) -> String {
        let answer = self.send(
            "POST",
            "/runners",
            &json!({"executionEnvironmentId": env, "inactivityTimeout": inactivity}),
        );
        assert_eq!(answer.status, 200, "claim: {}", answer.text());
        answer.json()["runnerId"]
            .as_str()
            .expect("runnerId")
            .to_owned()
    }

    /// An environment and a runner of it, ready to use.
    #[track_caller]
    pub fn ready_runner(&self) -> String {
        self.environment(1, 1);
        self.runner(1, 0)
    }

    /// Copies files (path, content) after deleting `./*`, like CodeOcean.
    #[track_caller]
    pub fn copy(&self, runner: &str, files: &[(&str, &str)]) {
        let copy: Vec<Value> = files
            .iter()
            .map(|(path, content)| {
                if path.ends_with('/') {
                    json!({"path": path})
                } else {
                    json!({"path": path, "content": base64(content.as_bytes())})
                }
            })
            .collect();
        let answer = self.send(
            "PATCH",
            &format!("/runners/{runner}/files"),
            &json!({"delete": ["./*"], "copy": copy}),
        );
        assert_eq!(answer.status, 204, "copy: {}", answer.text());
    }

    /// Stores an execution and returns its WebSocket URL.
    #[track_caller]
    pub fn execute(&self, runner: &str, command: &str, time_limit: u64) -> String {
        self.execute_with(
            runner,
            &json!({"command": command, "timeLimit": time_limit}),
        )
    }

    #[track_caller]
    pub fn execute_with(&self, runner: &str, body: &Value) -> String {
        let answer = self.send("POST", &format!("/runners/{runner}/execute"), body);
        assert_eq!(answer.status, 200, "execute: {}", answer.text());
        answer.json()["websocketUrl"]
            .as_str()
            .expect("websocketUrl")
            .to_owned()
    }

    /// Connects to an execution.
    #[track_caller]
    pub fn connect(&self, url: &str) -> Ws {
        Ws::connect(url, self.token.as_deref()).unwrap_or_else(|err| panic!("connect {url}: {err}"))
    }

    /// Runs a command to its end and returns the transcript.
    #[track_caller]
    pub fn run(&self, runner: &str, command: &str) -> Transcript {
        let url = self.execute(runner, command, 20);
        self.connect(&url).transcript()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
        remove_cgroups(&self.cgroup_name);
    }
}

/// Removes the cgroups named `name` under every controller, with their children. Claimed
/// sandbox runners outlive their server (for the next one to take back), so what is still in
/// a child group is killed first: the test's state directory, and with it any server that
/// could take them back, is gone.
pub fn remove_cgroups(name: &str) {
    let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for controller in controllers.flatten() {
        let group = controller.path().join(name);
        if let Ok(children) = std::fs::read_dir(&group) {
            for child in children.flatten().filter(|c| c.path().is_dir()) {
                remove_group(&child.path());
            }
        }
        let _ = std::fs::remove_dir(&group);
    }
}

/// Kills every process of a cgroup and removes it; killed processes leave it only once they
/// have exited, so removal is retried for a while.
fn remove_group(group: &std::path::Path) {
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::remove_dir(group).is_err() && group.exists() && Instant::now() < deadline {
        let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|pid| pid.trim().parse::<i32>().ok())
        {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A PUT body as CodeOcean sends it.
pub fn environment_body(id: u64, pool: u32) -> Value {
    json!({"id": id, "image": "openhpi/co_execenv_python:3.8", "prewarmingPoolSize": pool,
           "cpuLimit": 20, "memoryLimit": 256, "networkAccess": false, "exposedPorts": []})
}

pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A WebSocket client for one execution.
pub struct Ws {
    pub socket: WebSocket<TcpStream>,
}

/// Everything an execution sent.
#[derive(Debug, Default)]
pub struct Transcript {
    pub messages: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
    /// The final message (`exit`, `timeout` or `error`).
    pub end: Value,
    pub close: Option<CloseCode>,
}

impl Transcript {
    pub fn exit_code(&self) -> Option<i64> {
        (self.end["type"] == "exit")
            .then(|| self.end["data"].as_i64())
            .flatten()
    }
}

impl Ws {
    pub fn connect(url: &str, token: Option<&str>) -> Result<Ws, String> {
        let mut request = url.into_client_request().map_err(|err| err.to_string())?;
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("Poseidon-Token", token.parse().expect("header"));
        }
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let stream = TcpStream::connect((host.as_str(), port)).map_err(|err| err.to_string())?;
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
        let (socket, _) = tungstenite::client(request, stream).map_err(|err| err.to_string())?;
        Ok(Ws { socket })
    }

    /// The next server message; `None` once the server closed.
    #[track_caller]
    pub fn next(&mut self) -> Option<Value> {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    return Some(serde_json::from_str(&text).expect("text frames hold JSON"));
                }
                Ok(Message::Close(_)) => return None,
                Ok(Message::Binary(_)) => panic!("the server must not send binary frames"),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return None;
                }
                Err(err) => panic!("websocket read failed: {err}"),
            }
        }
    }

    /// Sends stdin.
    pub fn send(&mut self, text: &str) {
        self.socket.send(Message::text(text)).expect("send stdin");
    }

    /// Reads messages until one whose stdout contains `needle` (or panics at the end).
    #[track_caller]
    pub fn wait_for_stdout(&mut self, needle: &str) -> String {
        let mut seen = String::new();
        while let Some(message) = self.next() {
            if message["type"] == "stdout" {
                seen.push_str(message["data"].as_str().unwrap_or_default());
                if seen.contains(needle) {
                    return seen;
                }
            }
            assert!(
                !["exit", "timeout", "error"].contains(&message["type"].as_str().unwrap_or("")),
                "ended before {needle:?}: {message} after {seen:?}"
            );
        }
        panic!("connection closed before {needle:?}; saw {seen:?}");
    }

    /// Reads everything up to the close and checks the protocol on the way: `start` first,
    /// output chunks, exactly one final message, then the close frame.
    #[track_caller]
    pub fn transcript(self) -> Transcript {
        self.read_transcript(Transcript::default())
    }

    /// Like [`Ws::transcript`] after `start` was already read.
    #[track_caller]
    pub fn transcript_rest(self) -> Transcript {
        let started = Transcript {
            messages: vec![json!({"type": "start"})],
            ..Transcript::default()
        };
        self.read_transcript(started)
    }

    #[track_caller]
    fn read_transcript(mut self, mut transcript: Transcript) -> Transcript {
        loop {
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    let message: Value = serde_json::from_str(&text).expect("JSON");
                    check_schema(&message);
                    if transcript.messages.is_empty() {
                        assert_eq!(message, json!({"type": "start"}), "first message");
                    }
                    assert!(
                        transcript.end.is_null(),
                        "message after the final one: {message}"
                    );
                    match message["type"].as_str() {
                        Some("stdout") => transcript
                            .stdout
                            .push_str(message["data"].as_str().unwrap()),
                        Some("stderr") => transcript
                            .stderr
                            .push_str(message["data"].as_str().unwrap()),
                        Some("exit" | "timeout" | "error") => transcript.end = message.clone(),
                        _ => {}
                    }
                    transcript.messages.push(message);
                }
                Ok(Message::Close(frame)) => {
                    transcript.close = frame.map(|frame| frame.code);
                    break;
                }
                Ok(Message::Binary(_)) => panic!("binary frame"),
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    break;
                }
                Err(err) => panic!("websocket read failed: {err} after {transcript:?}"),
            }
        }
        assert!(
            !transcript.end.is_null(),
            "no final message: {transcript:?}"
        );
        assert_eq!(transcript.close, Some(CloseCode::Normal), "close code");
        transcript
    }
}

/// Checks a message against Poseidon's `websocket.schema.json`.
#[track_caller]
pub fn check_schema(message: &Value) {
    let object = message.as_object().expect("object");
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    match object.get("type").and_then(Value::as_str) {
        Some("start" | "timeout") => assert_eq!(keys, ["type"], "{message}"),
        Some("stdout" | "stderr" | "error") => {
            assert!(object["data"].is_string(), "{message}");
            assert_eq!(keys.len(), 2, "{message}");
        }
        Some("exit") => {
            let code = object["data"].as_u64().expect("integer exit code");
            assert!(code <= 255, "{message}");
            assert_eq!(keys.len(), 2, "{message}");
        }
        _ => panic!("unknown message {message}"),
    }
}

/// Waits until `check` holds or the timeout passes.
#[track_caller]
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The keys of a JSON object in the order they were sent (to check Poseidon's field order).
#[derive(Debug)]
pub struct KeyOrder(pub Vec<String>);

impl<'de> serde::Deserialize<'de> for KeyOrder {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeyOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeyOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some((key, serde::de::IgnoredAny)) =
                    map.next_entry::<String, serde::de::IgnoredAny>()?
                {
                    keys.push(key);
                }
                Ok(KeyOrder(keys))
            }
        }
        deserializer.deserialize_map(Keys)
    }
}
