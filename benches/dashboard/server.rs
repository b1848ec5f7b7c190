//! The server under test: the release binary as a subprocess on ephemeral ports with a fresh
//! state directory. Its stderr is drained by a thread that remembers the log; memory figures
//! come from `/proc/<pid>` of this process only.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rustix::process::{Pid, Signal};

/// Log lines kept for error messages.
const KEPT_LINES: usize = 200;
/// How long the server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server subprocess.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    log: Arc<Mutex<Log>>,
    /// The HTTP API's base URL (`http://ADDR/api/v1`).
    pub api: String,
    /// The WebSocket listener's address.
    pub websocket: SocketAddr,
}

/// What the server wrote to stderr.
#[derive(Debug, Default)]
struct Log {
    tail: VecDeque<String>,
    errors: Vec<String>,
    panicked: bool,
}

/// Why a server did not come up.
#[derive(Debug)]
pub enum StartError {
    /// It exited before listening; the reason is its last stderr line.
    Exited(String),
    /// Anything else (cannot spawn, never listened).
    Other(String),
}

impl ServerProcess {
    /// Starts `binary` with `args`, waiting for both "listening" log lines.
    pub fn start(binary: &Path, args: &[String]) -> Result<ServerProcess, StartError> {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|err| {
                StartError::Other(format!("cannot start {}: {err}", binary.display()))
            })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Log::default()));
        let (lines_tx, lines_rx) = crossbeam_channel::unbounded();
        let drained = Arc::clone(&log);
        thread::Builder::new()
            .name("server-stderr".into())
            .spawn(move || drain(BufReader::new(stderr), &drained, &lines_tx))
            .map_err(|err| StartError::Other(format!("cannot start a thread: {err}")))?;
        match wait_listening(&lines_rx) {
            Ok((api, websocket)) => Ok(ServerProcess {
                child,
                log,
                api,
                websocket,
            }),
            Err(reason) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let tail = log.lock().expect("log").tail.back().cloned();
                Err(match (status, tail) {
                    (Some(status), Some(line)) if !status.success() => {
                        StartError::Exited(line.trim_start_matches("poseidon-lite: ").to_owned())
                    }
                    _ => StartError::Other(reason),
                })
            }
        }
    }

    /// The subprocess's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the server has exited or panicked.
    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!("the server exited ({status})\n{}", self.tail(30)));
        }
        if self.log.lock().expect("log").panicked {
            return Err(format!("the server panicked\n{}", self.tail(30)));
        }
        Ok(())
    }

    /// The server's resident memory now, in KiB.
    pub fn rss_kib(&self) -> Result<u64, String> {
        self.status_field("VmRSS")
    }

    /// Resets the peak resident memory, so that [`ServerProcess::peak_kib`] covers what follows.
    pub fn reset_peak(&self) -> Result<(), String> {
        let path = format!("/proc/{}/clear_refs", self.pid());
        fs::write(&path, "5").map_err(|err| format!("cannot write {path}: {err}"))
    }

    /// The peak resident memory since the last [`ServerProcess::reset_peak`], in KiB.
    pub fn peak_kib(&self) -> Result<u64, String> {
        self.status_field("VmHWM")
    }

    /// CPU time the server (and the children it waited for) used so far, in seconds.
    pub fn cpu_seconds(&self) -> Result<f64, String> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()), true)
    }

    fn status_field(&self, name: &str) -> Result<u64, String> {
        let path = format!("/proc/{}/status", self.pid());
        let status =
            fs::read_to_string(&path).map_err(|err| format!("cannot read {path}: {err}"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in {path}"))
    }

    /// ERROR lines the server logged so far.
    pub fn errors(&self) -> Vec<String> {
        self.log.lock().expect("log").errors.clone()
    }

    /// The last `n` lines of the server's log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().expect("log");
        let skip = log.tail.len().saturating_sub(n);
        let lines: Vec<&str> = log.tail.iter().skip(skip).map(String::as_str).collect();
        format!(
            "--- last lines of the server's log ---\n{}",
            lines.join("\n")
        )
    }

    /// The last warning or error the server logged, if any (to explain a stalled pool).
    pub fn last_warning(&self) -> Option<String> {
        let log = self.log.lock().expect("log");
        log.tail
            .iter()
            .rev()
            .find(|line| line.contains(" WARN ") || line.contains(" ERROR "))
            .cloned()
    }

    /// Stops the server with SIGTERM; it must exit successfully in time.
    pub fn stop(mut self) -> Result<Duration, String> {
        self.check_alive()?;
        let started = Instant::now();
        rustix::process::kill_process(Pid::from_child(&self.child), Signal::TERM)
            .map_err(|err| format!("cannot send SIGTERM: {err}"))?;
        let status = self.wait_exit(started + STOP_TIMEOUT)?;
        if !status.success() {
            return Err(format!(
                "the server stopped with {status}\n{}",
                self.tail(30)
            ));
        }
        if self.log.lock().expect("log").panicked {
            return Err(format!("the server panicked\n{}", self.tail(30)));
        }
        Ok(started.elapsed())
    }

    fn wait_exit(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "the server did not stop within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                        self.tail(30)
                    ));
                }
                Err(err) => return Err(format!("cannot wait for the server: {err}")),
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Only reached on failure paths: never leave a server behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// User + system time from a `/proc/<pid>/stat` file, in seconds, with or without the times
/// of waited-for children.
pub fn cpu_seconds(path: &str, children: bool) -> Result<f64, String> {
    // /proc reports in USER_HZ, which is 100 on every Linux architecture's ABI that matters.
    const USER_HZ: f64 = 100.0;
    let stat = fs::read_to_string(path).map_err(|err| format!("cannot read {path}: {err}"))?;
    // Fields after the command name (which may contain spaces) start with field 3, `state`;
    // utime, stime, cutime and cstime are fields 14 to 17.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let count = if children { 4 } else { 2 };
    let ticks = fields
        .get(11..11 + count)
        .ok_or_else(|| format!("{path}: too few fields"))?
        .iter()
        .map(|field| field.parse::<u64>().map_err(|err| format!("{path}: {err}")))
        .sum::<Result<u64, String>>()?;
    Ok(ticks as f64 / USER_HZ)
}

/// Reads the server's stderr to its end, keeping the tail and forwarding lines until nobody
/// listens any more.
fn drain(stderr: impl BufRead, log: &Mutex<Log>, lines: &Sender<String>) {
    let mut forward = true;
    for line in stderr.lines() {
        let Ok(line) = line else { break };
        let mut log = log.lock().expect("log");
        if line.contains(" ERROR ") {
            log.errors.push(line.clone());
        }
        if line.contains("panicked") {
            log.panicked = true;
        }
        if log.tail.len() == KEPT_LINES {
            log.tail.pop_front();
        }
        log.tail.push_back(line.clone());
        drop(log);
        forward = forward && lines.send(line).is_ok();
    }
}

/// Waits for the two "listening" lines and returns the API URL and WebSocket address.
fn wait_listening(lines: &Receiver<String>) -> Result<(String, SocketAddr), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let (mut api, mut websocket) = (None, None);
    while api.is_none() || websocket.is_none() {
        let timeout = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => return Err("the server never listened".into()),
            Err(RecvTimeoutError::Disconnected) => return Err("the server exited".into()),
        };
        if let Some((_, url)) = line.split_once("HTTP API listening on ") {
            api = Some(url.trim().to_owned());
        }
        if let Some((_, addr)) = line.split_once("WebSocket executions listening on ws://") {
            let addr = addr
                .trim()
                .parse()
                .map_err(|err| format!("{line}: {err}"))?;
            websocket = Some(addr);
        }
    }
    Ok((api.expect("set"), websocket.expect("set")))
}
