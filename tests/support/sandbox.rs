//! Helpers for the sandbox tests: an executor of its own per test (state directory, cgroup
//! name and uid range), running commands with timeouts, and cleanup. Tests skip (with a
//! message) when not run as root.

use serde_json::Value;
use std::{
    fs::File,
    io::{Read, Write},
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use poseidon_lite::{
    Config, Error,
    executor::sandbox::SandboxExecutor,
    executor::{Command, Executor, Outcome, Runner, RunnerSpec},
    id::{EnvironmentId, RunnerId},
};

/// How long any single step of a test may block.
pub const TIMEOUT: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// An executor with its own state directory, cgroup name and uid range; cleans up on drop.
#[derive(Debug)]
pub struct TestExecutor {
    /// The executor under test.
    pub executor: SandboxExecutor,
    /// Its configuration.
    pub config: Config,
    /// Its state directory.
    pub state: PathBuf,
    /// The uid blocks its runners' ranges lie in.
    uids: super::slots::UidBlocks,
}

impl TestExecutor {
    /// A fresh executor, or `None` (with a message) when not root.
    pub fn new() -> Option<TestExecutor> {
        Self::with(|_| {})
    }

    /// A fresh executor with a modified configuration.
    pub fn with(modify: impl FnOnce(&mut Config)) -> Option<TestExecutor> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: the sandbox tests need root");
            return None;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("poseidon-lite-test-{}-{n}", std::process::id());
        let state = std::env::temp_dir().join(&name);
        let mut config = Config::ephemeral(&state);
        config.sandbox.agent = Some(PathBuf::from(env!("CARGO_BIN_EXE_poseidon-lite")));
        config.sandbox.cgroup_name = name;
        config.sandbox.pids_limit = 128;
        // As many runners as one uid block holds ranges for (the executor uses 2 × 24 + 16).
        config.runner.capacity = 24;
        modify(&mut config);
        // Uid ranges of its own, so parallel tests (nextest runs each in a process of its
        // own) neither share ids nor see each other's processes.
        let uids = super::slots::claim_for(config.runner.capacity);
        config.sandbox.uid_base = uids.base();
        let executor = SandboxExecutor::new(&config).expect("sandbox executor");
        Some(TestExecutor {
            executor,
            config,
            state,
            uids,
        })
    }

    /// A runner of the host image without limits.
    pub fn runner(&self) -> Arc<dyn Runner> {
        self.runner_with(|_| {})
    }

    /// A runner with a modified specification.
    pub fn runner_with(&self, modify: impl FnOnce(&mut RunnerSpec)) -> Arc<dyn Runner> {
        let mut spec = RunnerSpec {
            environment: EnvironmentId(1),
            image: "host".into(),
            cpu_limit: 0,
            memory_limit: 0,
            network_access: false,
            exposed_ports: Vec::new(),
        };
        modify(&mut spec);
        let id = RunnerId::new(spec.environment);
        self.executor.create(&id, &spec).expect("runner")
    }

    /// Host pids of every process in the executor's runner cgroups.
    pub fn runner_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for dir in self.cgroup_dirs().into_iter().take(1) {
            for group in std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
            {
                let procs =
                    std::fs::read_to_string(group.path().join("cgroup.procs")).unwrap_or_default();
                pids.extend(procs.lines().filter_map(|line| line.parse::<u32>().ok()));
            }
        }
        pids
    }

    /// Host pids of every process whose real, effective, saved or file-system uid lies in the
    /// executor's ranges.
    pub fn processes_in_uid_ranges(&self) -> Vec<u32> {
        self.uids.pids()
    }

    /// The executor's cgroup directories (one per hierarchy).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let name = &self.config.sandbox.cgroup_name;
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let dir = entry.path().join(name);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
        if Path::new("/sys/fs/cgroup").join(name).is_dir() {
            dirs.push(Path::new("/sys/fs/cgroup").join(name));
        }
        dirs
    }

    /// Names of the runner groups and directories that exist now.
    pub fn leftovers(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in self
            .cgroup_dirs()
            .into_iter()
            .chain([self.state.join("sandbox")])
        {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().unwrap().is_dir() {
                    names.push(entry.path().display().to_string());
                }
            }
        }
        names
    }
}

impl Drop for TestExecutor {
    fn drop(&mut self) {
        self.executor.remove_leftovers(&[]);
        for dir in self.cgroup_dirs() {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// What a finished command produced.
#[derive(Debug)]
pub struct Run {
    /// What the terminal showed (stdout and echoed input).
    pub stdout: String,
    /// What went to stderr.
    pub stderr: String,
    /// How it ended.
    pub outcome: Outcome,
}

/// Runs a command as the user.
#[track_caller]
pub fn run(runner: &dyn Runner, command: &str) -> Run {
    run_with(runner, command, false, b"")
}

/// Runs a command as root inside.
#[track_caller]
pub fn run_root(runner: &dyn Runner, command: &str) -> Run {
    run_with(runner, command, true, b"")
}

/// Runs a command, feeding `stdin` to its terminal, and waits (bounded) for its end.
#[track_caller]
pub fn run_with(runner: &dyn Runner, command: &str, privileged: bool, stdin: &[u8]) -> Run {
    let command = Command {
        command: command.into(),
        environment: vec![],
        privileged,
    };
    let mut process = runner.execute(&command).expect("execute");
    let mut pty = File::from(process.pty);
    if !stdin.is_empty() {
        pty.write_all(stdin).unwrap();
    }
    let stdout = read_all(pty);
    let stderr = read_all(File::from(process.stderr));
    let outcome = loop {
        if !wait_readable(process.exit.fd(), TIMEOUT) {
            process.kill.kill();
            panic!("command {:?} did not end in time", command.command);
        }
        if let Some(outcome) = process.exit.outcome().unwrap() {
            break outcome;
        }
    };
    let stdout = stdout.recv_timeout(TIMEOUT).expect("stdout to end");
    let stderr = stderr.recv_timeout(TIMEOUT).expect("stderr to end");
    Run {
        stdout,
        stderr,
        outcome,
    }
}

/// Reads a descriptor to its end (EIO for a terminal) on a thread.
pub fn read_all(mut file: File) -> crossbeam_channel::Receiver<String> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0; 4096];
        while let Ok(n @ 1..) = file.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
    });
    rx
}

/// Waits until `fd` is readable; false on timeout.
pub fn wait_readable(fd: impl AsFd, timeout: Duration) -> bool {
    let timeout = rustix::event::Timespec::try_from(timeout).unwrap();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap() > 0
}

/// Host uids (real, effective, saved, fs) of a process.
pub fn host_uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let uids = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .unwrap_or("");
    uids.split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect()
}

/// Repeats `check` until it holds or [`TIMEOUT`] passes (for effects the kernel completes
/// asynchronously, like the end of killed processes); false on timeout.
pub fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    false
}

/// A started command whose output is collected in the background.
pub struct Started {
    /// The process (exit watch and kill switch).
    pub process_exit: Box<dyn poseidon_lite::executor::ExitWatch>,
    /// Ends the process.
    pub kill: Arc<dyn poseidon_lite::executor::Kill>,
    /// The terminal (read by [`Started::wait_for_output`]).
    pub pty: File,
    /// Everything written to stderr, once the command's processes are gone.
    pub stderr: crossbeam_channel::Receiver<String>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started").finish_non_exhaustive()
    }
}

/// Starts a command without waiting for it.
#[track_caller]
pub fn start(runner: &dyn Runner, command: &str, privileged: bool) -> Started {
    let command = Command {
        command: command.into(),
        environment: vec![],
        privileged,
    };
    let process = runner.execute(&command).expect("execute");
    // Keep stderr drained (a closed pipe would kill the command with SIGPIPE).
    let stderr = read_all(File::from(process.stderr));
    Started {
        process_exit: process.exit,
        kill: process.kill,
        pty: File::from(process.pty),
        stderr,
    }
}

impl Started {
    /// Waits (bounded) for the outcome.
    #[track_caller]
    pub fn wait(&mut self) -> Outcome {
        loop {
            assert!(
                wait_readable(self.process_exit.fd(), TIMEOUT),
                "command did not end in time"
            );
            if let Some(outcome) = self.process_exit.outcome().unwrap() {
                return outcome;
            }
        }
    }

    /// Waits (bounded) until the terminal shows `text`.
    #[track_caller]
    pub fn wait_for_output(&mut self, text: &str) -> String {
        let mut seen = String::new();
        let mut buf = [0; 4096];
        let pty = &mut self.pty;
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !seen.contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} in {seen:?}"
            );
            if wait_readable(&*pty, Duration::from_millis(100)) {
                let n = pty.read(&mut buf).unwrap_or(0);
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        seen
    }
}

/// Keeps an owned descriptor alive for the length of a test.
pub fn keep(_fd: OwnedFd) {}

/// A name no other test (or host file) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A recursive listing's entries.
pub fn listing(runner: &dyn Runner, path: &str, privileged: bool) -> Vec<Value> {
    listing_with(runner, path, true, privileged)
}

/// A listing's entries.
pub fn listing_with(
    runner: &dyn Runner,
    path: &str,
    recursive: bool,
    privileged: bool,
) -> Vec<Value> {
    let mut body = String::new();
    runner
        .list_files(path, recursive, privileged)
        .unwrap()
        .read_to_string(&mut body)
        .unwrap();
    let value: Value = serde_json::from_str(&body).unwrap();
    value["files"].as_array().unwrap().clone()
}

/// Downloads a file as text, checking its announced length.
pub fn read(runner: &dyn Runner, path: &str, privileged: bool) -> Result<String, Error> {
    let mut content = runner.read_file(path, privileged)?;
    let mut text = String::new();
    content.reader.read_to_string(&mut text).unwrap();
    assert_eq!(text.len() as u64, content.length);
    Ok(text)
}
