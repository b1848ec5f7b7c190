//! Executors turn runner specifications into runners, and runners run commands and file
//! operations. They know nothing about HTTP or WebSockets.
//!
//! Two implementations exist: [`process`] (a private directory per runner, no isolation) and
//! [`sandbox`] (a Linux sandbox per runner). The manager only sees these traits.

pub mod fsview;
pub mod output;
pub mod process;
pub mod pty;
pub mod sandbox;

use std::{
    fmt,
    io::{self, Read},
    os::fd::{BorrowedFd, OwnedFd},
    sync::Arc,
};

use crate::{
    config::{Config, ExecutorKind},
    error::Result,
    id::EnvironmentId,
};

/// `PATH` of commands.
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Open files a command may have. The server raises its own limit far higher, which must not
/// reach learner code (and makes programs that close every possible descriptor slow).
pub const FILE_LIMIT: u64 = 1024;

/// Lowers the calling process's soft and hard limits on open files to [`FILE_LIMIT`] (limits
/// are only ever lowered). The hard limit too: otherwise learner code raises the soft limit
/// back (`ulimit -n 20000`). Only system calls: safe between fork and exec.
pub fn lower_file_limit() -> std::io::Result<()> {
    crate::sys::lower_file_limit(FILE_LIMIT)
}

/// Builds the executor the configuration chooses (`runner.executor`).
pub fn from_config(config: &Config) -> Result<Arc<dyn Executor>> {
    match config.runner.executor {
        ExecutorKind::Process => {
            log::warn!(
                "executor `process`: runners are plain directories and commands run as this \
                 server's user WITHOUT ANY ISOLATION; use it for trusted code only"
            );
            Ok(Arc::new(process::ProcessExecutor::new(&config.state.dir)?))
        }
        ExecutorKind::Sandbox => Ok(Arc::new(sandbox::SandboxExecutor::new(config)?)),
    }
}

/// Everything an executor needs to build a runner for an environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSpec {
    /// The environment the runner belongs to.
    pub environment: EnvironmentId,
    /// The environment's image name as given by the client.
    pub image: String,
    /// CPU limit in MHz (Poseidon's unit); 0 means no limit.
    pub cpu_limit: u32,
    /// Memory limit in MB; 0 means no limit.
    pub memory_limit: u32,
    /// Whether the runner may use the network.
    pub network_access: bool,
    /// Ports inside the runner reachable from outside (only with `network_access`).
    pub exposed_ports: Vec<u16>,
}

/// A command to run in a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The command line, run as `bash -c <command>` (`sh -c` without bash).
    pub command: String,
    /// Extra environment variables (names already validated).
    pub environment: Vec<(String, String)>,
    /// Run as root inside the runner instead of the unprivileged user.
    pub privileged: bool,
}

impl Command {
    /// Bytes of the command line and the variables' names and values: what storing and
    /// sending it costs, and what the API caps.
    pub fn size(&self) -> usize {
        self.command.len()
            + self
                .environment
                .iter()
                .map(|(name, value)| name.len() + value.len())
                .sum::<usize>()
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It exited; signal deaths are mapped to 128 + signal number.
    Exited(u8),
    /// It (or one of its processes) was killed for exceeding the memory limit.
    OomKilled,
    /// It ended without telling how (the runner vanished or it was killed).
    Lost,
}

impl Outcome {
    /// A process killed by `signal`: 128 + the signal number, as shells report it.
    pub fn signaled(signal: i32) -> Outcome {
        Outcome::Exited(signal_exit_code(signal))
    }
}

/// The exit code shells report for a death by `signal`: 128 + the signal number.
pub fn signal_exit_code(signal: i32) -> u8 {
    // Signal numbers are below 128; the clamp only keeps a bogus one from wrapping.
    128 + signal.clamp(0, 127) as u8
}

/// Watches a running process for its end.
pub trait ExitWatch: Send + fmt::Debug {
    /// A descriptor that becomes readable when the process may have ended.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Called when [`ExitWatch::fd`] is readable: `Some` once the process has ended.
    fn outcome(&mut self) -> io::Result<Option<Outcome>>;
}

/// Ends a process and everything it started; callable from any thread, any number of times.
pub trait Kill: Send + Sync + fmt::Debug {
    /// Kills now.
    fn kill(&self);
}

/// A started process: its terminal, its stderr and the means to await and end it.
#[derive(Debug)]
pub struct Process {
    /// Master side of the pseudo-terminal that is the process's stdin and stdout.
    pub pty: OwnedFd,
    /// Read side of the pipe that is the process's stderr.
    pub stderr: OwnedFd,
    /// Reports the end of the process.
    pub exit: Box<dyn ExitWatch>,
    /// Ends the process.
    pub kill: Arc<dyn Kill>,
}

/// One file of a `PATCH /files` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path as given; a trailing `/` denotes a directory.
    pub path: String,
    /// Decoded content (ignored for directories).
    pub content: Vec<u8>,
}

/// A `PATCH /files` request: delete first, then copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileUpdate {
    /// Paths to delete recursively; `./*` is a glob over the workspace.
    pub delete: Vec<String>,
    /// Files and directories to create.
    pub copy: Vec<FileEntry>,
}

/// The content of one file, ready to stream.
pub struct FileContent {
    /// Exact number of bytes `reader` yields.
    pub length: u64,
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
}

impl fmt::Debug for FileContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileContent")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

/// A runner: a workspace in which commands run.
pub trait Runner: Send + Sync + fmt::Debug {
    /// Starts a command under a fresh pseudo-terminal.
    fn execute(&self, command: &Command) -> Result<Process>;
    /// Lists `path`; the reader yields the whole JSON body `{"files": [...]}`.
    /// A missing or unreadable path is [`crate::Error::FileNotFound`].
    fn list_files(
        &self,
        path: &str,
        recursive: bool,
        privileged: bool,
    ) -> Result<Box<dyn Read + Send>>;
    /// Opens a regular file for download.
    fn read_file(&self, path: &str, privileged: bool) -> Result<FileContent>;
    /// Deletes, then copies files, as root inside the runner.
    fn update_files(&self, update: &FileUpdate) -> Result<()>;
    /// Ends every process of the runner and removes all its resources. Idempotent.
    fn destroy(&self);
    /// The runner's exposed ports and where they are reachable (`mappedPorts`).
    fn mapped_ports(&self) -> Vec<crate::network::forward::MappedPort> {
        Vec::new()
    }
    /// At server shutdown: ends the runner's executions but keeps the runner, for
    /// [`Executor::adopt`] to take back after the restart; by default, destroys it.
    fn suspend(&self) {
        self.destroy();
    }
}

/// Builds runners.
pub trait Executor: Send + Sync + fmt::Debug {
    /// The executor's name as configured (`process`, `sandbox`).
    fn name(&self) -> &'static str;
    /// Checks that `image` can be used by `environment` (for a registry image: resolves it and
    /// starts pulling it); [`crate::Error::UnknownImage`] otherwise.
    fn check_image(&self, environment: crate::id::EnvironmentId, image: &str) -> Result<()>;
    /// Whether a runner of `spec` can be created without waiting for its image (prewarming
    /// skips the environment meanwhile); an error if the image cannot be had.
    fn image_ready(&self, _spec: &RunnerSpec) -> Result<bool> {
        Ok(true)
    }
    /// Checks that runners of an environment with `networkAccess` can get it here; a
    /// [`crate::Error::BadRequest`] naming what is missing otherwise.
    fn check_network(&self) -> Result<()> {
        Ok(())
    }
    /// Creates a new runner; may take milliseconds, so it is called off the request path
    /// (or on it, when the pool is empty).
    fn create(&self, id: &crate::id::RunnerId, spec: &RunnerSpec) -> Result<Arc<dyn Runner>>;
    /// Whether [`Executor::adopt`] can take runners back after a restart; only then are
    /// claimed runners recorded in the state directory.
    fn adopts(&self) -> bool {
        false
    }
    /// Takes back a runner that existed before a restart, if its resources survived.
    fn adopt(&self, id: &crate::id::RunnerId, spec: &RunnerSpec) -> Option<Arc<dyn Runner>>;
    /// Removes everything left over by an earlier run except the runners in `keep`.
    fn remove_leftovers(&self, keep: &[crate::id::RunnerId]);
    /// Called once at a clean exit, after every runner has ended: undoes what the executor
    /// changed on the host.
    fn shutdown(&self) {}
    /// Hands the executor the server's metrics, for what only it sees (image pulls).
    fn attach_metrics(&self, _metrics: &Arc<crate::metrics::Metrics>) {}
}
