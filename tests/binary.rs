//! The `poseidon-lite` binary as an operator runs it: flags, signals and crashes.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::json;
use support::{TIMEOUT, Ws};

/// A server process and the addresses it logged.
struct Process {
    child: Child,
    api: String,
    lines: mpsc::Receiver<String>,
    cgroup_name: String,
}

/// A cgroup name and uid base of this test process's own, so that its servers never use (and
/// leave groups under) the defaults an operator's server uses. A restarted server gets the
/// same ones, as the operator's would.
fn own_sandbox_settings() -> (String, u32) {
    let pid = std::process::id();
    let base = (1u32 << 30) + (pid.wrapping_mul(7) % 256) * 64 * 65536;
    (format!("poseidon-lite-binary-test-{pid}"), base)
}

impl Process {
    fn start(state: &std::path::Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
            .args([
                "--port",
                "0",
                "--websocket-port",
                "0",
                "--log-level",
                "info",
                "--executor",
            ])
            .arg(support::executor_name())
            .arg("--image")
            .arg(format!("{}=host", support::TEST_IMAGE))
            .arg("--state-dir")
            .arg(state)
            .args(["--cgroup-name", &own_sandbox_settings().0])
            .args(["--uid-base", &own_sandbox_settings().1.to_string()])
            .args(["--capacity", "16"])
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut process = Process {
            child,
            api: String::new(),
            lines,
            cgroup_name: own_sandbox_settings().0,
        };
        let line = process.wait_for("HTTP API listening on ");
        process.api = line
            .split("listening on ")
            .nth(1)
            .expect("address")
            .trim()
            .to_owned();
        process
    }

    /// Waits for a log line containing `needle`.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into()
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> (u16, String) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api))
            .body(body.to_string())
            .expect("request");
        let mut response = Self::agent().run(request).expect("request succeeds");
        let status = response.status().as_u16();
        (
            status,
            response.body_mut().read_to_string().unwrap_or_default(),
        )
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
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
        // A clean shutdown removes the runners' groups; a kill would leave them behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &self.child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + TIMEOUT;
            while self.child.try_wait().ok().flatten().is_none()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        support::remove_cgroups(&self.cgroup_name);
    }
}

fn claim(server: &Process) -> String {
    let (status, _) = server.call(
        "PUT",
        "/execution-environments/7",
        support::environment_body(7, 1),
    );
    assert_eq!(status, 201);
    let (status, body) = server.call(
        "POST",
        "/runners",
        json!({"executionEnvironmentId": 7, "inactivityTimeout": 0}),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).expect("json")["runnerId"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[test]
fn help_explains_every_setting() {
    let output = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
        .arg("--help")
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in [
        "server.port",
        "server.token",
        "runner.executor",
        "state.dir",
        "POSEIDON_SERVER_PORT",
    ] {
        assert!(help.contains(setting), "--help lacks {setting}:\n{help}");
    }
}

#[test]
fn sigterm_ends_executions_with_an_error_and_exits_cleanly() {
    let state = tempfile::tempdir().expect("state");
    let mut server = Process::start(state.path());
    let runner = claim(&server);
    let (status, body) = server.call(
        "POST",
        &format!("/runners/{runner}/execute"),
        json!({"command": "echo go; sleep 60"}),
    );
    assert_eq!(status, 200);
    let url: serde_json::Value = serde_json::from_str(&body).expect("json");
    let mut ws = Ws::connect(url["websocketUrl"].as_str().expect("url"), None).expect("connects");
    ws.wait_for_stdout("go");
    server.signal("TERM");
    let transcript = ws.transcript_rest();
    assert_eq!(transcript.end["type"], "error");
    assert!(server.wait().success());
}

#[test]
fn after_a_crash_the_restarted_server_keeps_environments_and_claimed_runners() {
    let state = tempfile::tempdir().expect("state");
    let mut server = Process::start(state.path());
    let runner = claim(&server);
    server.signal("KILL");
    server.wait();
    let server = Process::start(state.path());
    let (status, body) = server.call("GET", "/execution-environments/7", json!(null));
    assert_eq!(status, 200, "{body}");
    let (status, _) = server.call("GET", &format!("/runners/{runner}/files"), json!(null));
    if support::executor_kind() == poseidon_lite::config::ExecutorKind::Process {
        assert_eq!(
            status, 200,
            "the process executor takes claimed runners back"
        );
    } else {
        assert_eq!(status, 410, "sandboxes do not survive the server");
    }
    drop(server);
    let group = std::path::Path::new("/sys/fs/cgroup/pids").join(own_sandbox_settings().0);
    assert!(!group.exists(), "{} is left behind", group.display());
}

#[test]
fn a_uid_base_that_maps_runners_onto_host_users_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the sandbox needs root");
        return;
    }
    let state = tempfile::tempdir().expect("state");
    for base in ["0", "1000"] {
        let output = Command::new(env!("CARGO_BIN_EXE_poseidon-lite"))
            .args([
                "--port",
                "0",
                "--websocket-port",
                "0",
                "--executor",
                "sandbox",
            ])
            .args([
                "--uid-base",
                base,
                "--cgroup-name",
                &own_sandbox_settings().0,
            ])
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("uid_base {base} is below 65536")),
            "{stderr}"
        );
    }
}
