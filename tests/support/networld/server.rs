//! The server binary inside the world's host namespace, and an API client for it (to be
//! called on threads inside that namespace).

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use super::{UPLINK_V4, World};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runners a test server holds at most (unless a test sets `POSEIDON_RUNNER_CAPACITY`).
const CAPACITY: usize = 64;

/// The server binary, running in the host namespace; killed and its cgroups removed on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    seen: std::sync::Mutex<Vec<String>>,
    pub state: PathBuf,
    cgroup: String,
    /// `http://127.0.0.1:7200`, valid inside the host namespace.
    pub base: String,
    /// The server's uid blocks (released after its runners are gone).
    _uids: crate::support::slots::UidBlocks,
}

impl Server {
    /// Starts the server with `--state-dir state`, network settings for this world, and
    /// `extra` environment variables.
    pub fn start(world: &World, state: PathBuf, extra: &[(&str, &str)]) -> Server {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let cgroup = format!("{}-{n}", world.name);
        // Uid ranges no other test process holds: parallel tests never share ids, nor look at
        // each other's processes.
        let capacity = extra
            .iter()
            .find(|(name, _)| *name == "POSEIDON_RUNNER_CAPACITY")
            .map_or(Ok(CAPACITY), |(_, value)| value.parse())
            .expect("a capacity");
        let uids = crate::support::slots::claim_for(capacity);
        let uid_base = uids.base().to_string();
        let capacity = CAPACITY.to_string();
        let mut vars: Vec<(String, String)> = [
            ("POSEIDON_SERVER_PORT", "7200"),
            ("POSEIDON_SERVER_WEBSOCKET_PORT", "7201"),
            ("POSEIDON_RUNNER_EXECUTOR", "sandbox"),
            ("POSEIDON_SANDBOX_CGROUP_NAME", cgroup.as_str()),
            ("POSEIDON_SANDBOX_UID_BASE", uid_base.as_str()),
            ("POSEIDON_RUNNER_CAPACITY", capacity.as_str()),
            ("POSEIDON_SANDBOX_PIDS_LIMIT", "256"),
            (
                "POSEIDON_NETWORK_ALLOWED_RANGES",
                "203.0.113.0/24,2001:db8::/32",
            ),
            ("POSEIDON_NETWORK_DNS", "203.0.113.53"),
            ("POSEIDON_NETWORK_PUBLISH_ADDRESS", UPLINK_V4),
            ("POSEIDON_LOGGER_LEVEL", "info"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let state_dir = state.clone();
        let mut child = world.host.run(move || {
            Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
                .arg("--image")
                .arg("openhpi/co_execenv_python:3.8=host")
                .arg("--state-dir")
                .arg(&state_dir)
                .env_remove("RUST_LOG")
                .envs(vars)
                .stderr(Stdio::piped())
                .spawn()
                .expect("server starts")
        });
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                let _ = tx.send(line);
            }
        });
        let server = Server {
            child: Some(child),
            lines,
            seen: std::sync::Mutex::new(Vec::new()),
            state,
            cgroup,
            base: "http://127.0.0.1:7200".to_owned(),
            _uids: uids,
        };
        server.wait_for("HTTP API listening on ");
        server
    }

    /// Waits for a log line containing `needle` (also one logged before).
    pub fn wait_for(&self, needle: &str) -> String {
        let mut seen = self.seen.lock().unwrap();
        if let Some(line) = seen.iter().find(|line| line.contains(needle)) {
            return line.clone();
        }
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            seen.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // Claimed runners outlive their server (for the next one to take back); nothing will
        // take these back, so what is left in the groups is killed, and the groups go
        // (retried while the last processes exit).
        for _ in 0..50 {
            let mut left = false;
            for controller in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let group = controller.path().join(&self.cgroup);
                for runner in std::fs::read_dir(&group).into_iter().flatten().flatten() {
                    if runner.path().is_dir() {
                        let procs = runner.path().join("cgroup.procs");
                        let procs = std::fs::read_to_string(procs).unwrap_or_default();
                        for pid in procs.lines().filter_map(|pid| pid.trim().parse().ok()) {
                            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                                let signal = rustix::process::Signal::KILL;
                                let _ = rustix::process::kill_process(pid, signal);
                            }
                        }
                        let _ = std::fs::remove_dir(runner.path());
                    }
                }
                if std::fs::remove_dir(&group).is_err() && group.exists() {
                    left = true;
                }
            }
            if !left {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP client for the server; call it on a thread inside the host namespace.
pub fn api(method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let url = format!("http://127.0.0.1:7200/api/v1{path}");
    let response = match (method, body) {
        ("PUT", Some(body)) => agent.put(&url).send_json(body),
        ("POST", Some(body)) => agent.post(&url).send_json(body),
        ("GET", _) => agent.get(&url).call(),
        ("DELETE", _) => agent.delete(&url).call(),
        ("PATCH", Some(body)) => agent.patch(&url).send_json(body),
        other => panic!("unsupported request {other:?}"),
    };
    let mut response = response.unwrap_or_else(|err| panic!("{method} {path}: {err}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// An environment of the host image; call it inside the host namespace.
pub fn environment(id: u64, pool: u32, network: bool, ports: &[u16]) -> u16 {
    let body = serde_json::json!({"id": id, "image": "openhpi/co_execenv_python:3.8",
        "prewarmingPoolSize": pool, "cpuLimit": 0, "memoryLimit": 0,
        "networkAccess": network, "exposedPorts": ports});
    api("PUT", &format!("/execution-environments/{id}"), Some(&body)).0
}

/// Waits until environment `id` has `idle` idle runners; inside the host namespace.
pub fn wait_idle(id: u64, idle: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, stats) = api("GET", "/statistics/execution-environments", None);
        if stats[id.to_string()]["idleRunners"].as_u64() == Some(idle) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {idle} idle runners: {stats}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Claims a runner; returns its id and mapped ports; inside the host namespace.
pub fn claim(env: u64) -> (String, serde_json::Value) {
    let body = serde_json::json!({"executionEnvironmentId": env, "inactivityTimeout": 300});
    let (status, answer) = api("POST", "/runners", Some(&body));
    assert_eq!(status, 200, "claim: {answer}");
    (
        answer["runnerId"].as_str().expect("runnerId").to_owned(),
        answer["mappedPorts"].clone(),
    )
}

/// Runs `script` (bash, uploaded as a file: commands may not hold quotes) in a runner, root
/// inside when `privileged`; returns stdout.
pub fn run(runner: &str, script: &str, privileged: bool) -> String {
    let files = serde_json::json!({"copy": [{"path": "script.sh",
        "content": crate::support::base64(script.as_bytes())}]});
    let (status, answer) = api("PATCH", &format!("/runners/{runner}/files"), Some(&files));
    assert_eq!(status, 204, "copy: {answer}");
    let body = serde_json::json!({"command": "bash script.sh", "timeLimit": 120,
        "privilegedExecution": privileged});
    let (status, answer) = api("POST", &format!("/runners/{runner}/execute"), Some(&body));
    assert_eq!(status, 200, "execute: {answer}");
    let url = answer["websocketUrl"].as_str().expect("websocketUrl");
    let transcript = crate::support::Ws::connect(url, None)
        .unwrap_or_else(|err| panic!("connect {url}: {err}"))
        .transcript();
    transcript.stdout.replace("\r\n", "\n")
}
