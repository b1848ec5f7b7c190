//! The sandbox executor: every runner a long-lived Linux sandbox, created while prewarming —
//! its own user (an unprivileged host uid range), mount, pid, net, ipc, uts and cgroup
//! namespaces, a cgroup with the environment's limits and a root file system from its image
//! with a size-capped writable layer. Executions are forked inside the existing sandbox by the
//! runner's agent (this same binary, started with [`AGENT_ARG`]), in about a millisecond.
//!
//! Server side: [`SandboxExecutor`] (`executor`, `runner`, `operation`, `cgroup`, `image`).
//! Runner side: `agent`. Between them: `protocol`. System calls needing `unsafe` live in
//! `crate::sys::sandbox`.

mod agent;
mod cgroup;
mod executor;
mod image;
mod operation;
mod protocol;
mod reattach;
mod runner;
mod seccomp;
mod shared;

pub use executor::SandboxExecutor;
pub use runner::SandboxRunner;

/// The hidden first argument that makes the binary run as a sandbox agent.
pub const AGENT_ARG: &str = "__sandbox-agent";

/// Runs the sandbox agent and exits if the process was started as one (first argument
/// [`AGENT_ARG`]); returns otherwise. Call it first thing in `main`, before any thread starts:
/// the agent must be single-threaded.
pub fn run_agent_if_requested() {
    if std::env::args_os().nth(1).as_deref() != Some(std::ffi::OsStr::new(AGENT_ARG)) {
        return;
    }
    std::process::exit(agent::main());
}
