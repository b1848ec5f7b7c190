//! The `poseidon-lite` binary as an operator runs it, in a process of its own: for tests of
//! signals, crashes and restarts. The process is killed when the value is dropped.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use super::{TIMEOUT, slots::UidBlocks};

/// A server process and the addresses it logged.
pub struct Process {
    pub child: Child,
    pub api: String,
    lines: std::sync::Mutex<mpsc::Receiver<String>>,
    /// Removed (with every runner left in them) when dropped; `None` after a crash, whose
    /// runners are left for the next server on the same state directory.
    cgroup_name: Option<String>,
}

/// A cgroup name of this test process's own, so that its servers never use (and leave groups
/// under) the default an operator's server uses. A restarted server gets the same one, as the
/// operator's would.
pub fn own_cgroup_name() -> String {
    let name = format!("poseidon-lite-binary-test-{}", std::process::id());
    remove_at_exit(&name);
    name
}

/// Removes the groups named `name`, and whatever runners are still in them, once this test
/// process has ended, however it ended: a test whose last server crashed or exited leaves its
/// runners for a next server that never comes. A child shell waits for the end of a pipe that
/// only this process holds (the kernel closes it at exit), then kills what is left and
/// removes the groups, retrying while the last processes exit.
fn remove_at_exit(name: &str) {
    static WATCHER: std::sync::OnceLock<Option<std::process::ChildStdin>> =
        std::sync::OnceLock::new();
    const SCRIPT: &str = r#"cat >/dev/null
for attempt in $(seq 100); do
  left=
  for group in /sys/fs/cgroup/*/"$1"; do
    [ -d "$group" ] || continue
    for runner in "$group"/*/; do
      [ -d "$runner" ] || continue
      while read -r pid; do kill -9 "$pid" 2>/dev/null; done < "$runner/cgroup.procs"
      rmdir "$runner" 2>/dev/null
    done
    rmdir "$group" 2>/dev/null || left=1
  done
  [ -z "$left" ] && exit 0
  sleep 0.1
done"#;
    WATCHER.get_or_init(|| {
        Command::new("sh")
            .args(["-c", SCRIPT, "sh", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .and_then(|mut child| child.stdin.take())
    });
}

/// The uid base of servers on `state`: the same for every server on it (a restarted one takes
/// back the runners of the last), from uid blocks of this process's own, enough for
/// `capacity` runners and held until the process ends (a crashed server's runners outlive it).
pub fn uid_base(state: &Path, capacity: usize) -> u32 {
    static CLAIMED: Mutex<BTreeMap<PathBuf, (usize, UidBlocks)>> = Mutex::new(BTreeMap::new());
    let mut claimed = CLAIMED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let (claimed_for, uids) = claimed
        .entry(state.to_owned())
        .or_insert_with(|| (capacity, super::slots::claim_for(capacity)));
    assert!(
        capacity <= *claimed_for,
        "uid ranges on {} were claimed for {claimed_for} runners, not {capacity}",
        state.display()
    );
    uids.base()
}

/// The lines `child` writes to its (piped) stderr, read on a thread of their own so that the
/// child never blocks on a full pipe.
pub fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    lines
}

impl Process {
    /// Starts the server on `state` and waits until it listens.
    pub fn start(state: &Path) -> Process {
        Self::start_with(state, &[])
    }

    /// Like [`Process::start`] with extra flags.
    pub fn start_with(state: &Path, args: &[&str]) -> Process {
        Self::listening(Self::spawn(state, args))
    }

    /// Waits until a spawned server listens.
    pub fn listening(mut process: Process) -> Process {
        let line = process.wait_for("HTTP API listening on ");
        process.api = line
            .split("listening on ")
            .nth(1)
            .expect("address")
            .trim()
            .to_owned();
        process
    }

    /// Starts the server on `state` without waiting for anything.
    pub fn spawn(state: &Path, args: &[&str]) -> Process {
        Self::spawn_binary(Path::new(env!("CARGO_BIN_EXE_poseidon-lite")), state, args)
    }

    /// Like [`Process::spawn`] with another server binary (an upgrade, say).
    pub fn spawn_binary(binary: &Path, state: &Path, args: &[&str]) -> Process {
        let executor = ["--executor", super::executor_name()];
        let capacity = args
            .iter()
            .position(|arg| *arg == "--capacity")
            .and_then(|at| args.get(at + 1)?.parse().ok())
            .unwrap_or(16);
        let mut child = Command::new(binary)
            .args([
                "--port",
                "0",
                "--websocket-port",
                "0",
                "--log-level",
                "info",
            ])
            .args(match args.contains(&"--executor") {
                true => &[][..],
                false => &executor[..],
            })
            .arg("--image")
            .arg(format!("{}=host", super::TEST_IMAGE))
            .arg("--state-dir")
            .arg(state)
            .args(["--cgroup-name", &own_cgroup_name()])
            .args(["--uid-base", &uid_base(state, capacity).to_string()])
            .args(match args.contains(&"--capacity") {
                true => &[][..],
                false => &["--capacity", "16"][..],
            })
            .args(args)
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .expect("server starts");
        let lines = stderr_lines(&mut child);
        Process {
            child,
            api: String::new(),
            lines: std::sync::Mutex::new(lines),
            cgroup_name: Some(own_cgroup_name()),
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        let lines = self.lines.lock().expect("log lines");
        loop {
            let line = lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Waits for the process to exit; its status and the whole log. What it leaves stays for
    /// the next server on the same state directory.
    pub fn exit(mut self) -> (std::process::ExitStatus, String) {
        let status = self.wait();
        self.cgroup_name = None;
        let mut log = String::new();
        let lines = self.lines.lock().expect("log lines");
        while let Ok(line) = lines.recv_timeout(TIMEOUT) {
            log.push_str(&line);
            log.push('\n');
        }
        (status, log)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build()
            .into()
    }

    /// Creates environment `environment` (a pool of 1, as CodeOcean sends it) and claims a
    /// runner of it with `inactivity_timeout`; the runner's id.
    #[track_caller]
    pub fn claimed_runner(&self, environment: u64, inactivity_timeout: u64) -> String {
        let path = format!("/execution-environments/{environment}");
        let (status, body) = self.call("PUT", &path, super::environment_body(environment, 1));
        assert_eq!(status, 201, "{body}");
        let (status, body) = self.call(
            "POST",
            "/runners",
            serde_json::json!({"executionEnvironmentId": environment,
                               "inactivityTimeout": inactivity_timeout}),
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["runnerId"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    /// Sends a request; the status and the body as text.
    pub fn call(&self, method: &str, path: &str, body: serde_json::Value) -> (u16, String) {
        self.call_raw(method, path, body.to_string().into_bytes())
    }

    /// Sends a request with a body as is; `(0, error)` if no answer came.
    pub fn call_raw(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, String) {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api))
            .body(body)
            .expect("request");
        match Self::agent().run(request) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                let body = response.body_mut().read_to_string().unwrap_or_default();
                (status, body)
            }
            Err(err) => (0, err.to_string()),
        }
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status();
        assert!(status.expect("kill runs").success());
    }

    /// Waits (with the harness timeout) for the process to end.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then waits for the end; what it leaves (runners included) stays for the next
    /// server on the same state directory.
    pub fn crash(mut self) {
        self.signal("KILL");
        self.wait();
        self.cgroup_name = None;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A clean shutdown removes the runners' groups; a kill would leave them behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + TIMEOUT;
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(name) = &self.cgroup_name {
            super::remove_cgroups(name);
        }
    }
}
