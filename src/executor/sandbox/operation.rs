//! The server's side of one operation on a runner: the operation socket, the started process
//! (its exit watch and kill switch), and readers of the data the agent streams back. The agent
//! is untrusted: replies are bounded, descriptors checked, and a missing status is `Lost`.

use std::{
    io::{self, Read},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use rustix::{
    fs::FileType,
    net::{Shutdown, sockopt::Timeout},
};

use super::{
    cgroup::Group,
    protocol::{self, AgentReply},
};
use crate::{
    error::{Error, Result},
    executor::{ExitWatch, Kill, Outcome, Process, signal_exit_code},
};

/// How long the server waits for the agent to start an operation, accept a chunk or reply.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// The signal number of SIGKILL, and the exit code a shell reports for it.
const SIGKILL: i32 = 9;

/// Opens an operation: a fresh socket pair, one end sent to the agent over `control`.
pub(super) fn open(control: BorrowedFd<'_>, kind: &[u8]) -> Result<OwnedFd> {
    let (ours, theirs) = protocol::socketpair()?;
    for timeout in [Timeout::Recv, Timeout::Send] {
        rustix::net::sockopt::set_socket_timeout(&ours, timeout, Some(OPERATION_TIMEOUT))
            .map_err(io::Error::from)?;
    }
    protocol::send_record(control, kind, &[theirs.as_fd()])
        .map_err(|err| Error::internal("sandbox agent unreachable", err))?;
    Ok(ours)
}

/// Waits for the agent's reply to an operation.
pub(super) fn reply(op: &OwnedFd, max_fds: usize) -> Result<(AgentReply, Vec<OwnedFd>)> {
    match protocol::recv_reply(op.as_fd(), max_fds, false) {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(Error::Internal("sandbox agent ended the operation".into())),
        Err(err) => Err(Error::internal("sandbox agent reply", err)),
    }
}

/// The error an unexpected or failing reply becomes.
pub(super) fn failure(reply: AgentReply) -> Error {
    match reply {
        AgentReply::Failed(message) => Error::Internal(format!("sandbox: {}", bounded(&message))),
        AgentReply::FileCopy(detail) => Error::FileCopy(bounded(&detail)),
        other => Error::Internal(format!("sandbox: unexpected reply {other:?}")),
    }
}

/// Text from the agent, cut to a size fit for a log line or an error message.
fn bounded(text: &str) -> String {
    text.chars().take(4096).collect()
}

/// Turns a `Started` reply's descriptors into a [`Process`], checking they are what they
/// claim: a terminal (character device) and a pipe.
pub(super) fn process(
    op: OwnedFd,
    mut fds: Vec<OwnedFd>,
    group: Arc<Group>,
    oom_before: u64,
) -> Result<Process> {
    let (Some(stderr), Some(pty)) = (fds.pop(), fds.pop()) else {
        return Err(Error::Internal(
            "sandbox: the agent sent no terminal".into(),
        ));
    };
    let kind = |fd: &OwnedFd| -> io::Result<FileType> {
        Ok(FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode))
    };
    if kind(&pty)? != FileType::CharacterDevice || kind(&stderr)? != FileType::Fifo {
        return Err(Error::Internal(
            "sandbox: the agent sent unexpected descriptors".into(),
        ));
    }
    let op = Arc::new(op);
    Ok(Process {
        pty,
        stderr,
        exit: Box::new(SandboxExit {
            op: op.clone(),
            group,
            oom_before,
            outcome: None,
        }),
        kill: Arc::new(SandboxKill { op }),
    })
}

/// Watches an execution's operation socket for the exit status.
#[derive(Debug)]
struct SandboxExit {
    op: Arc<OwnedFd>,
    group: Arc<Group>,
    oom_before: u64,
    outcome: Option<Outcome>,
}

impl ExitWatch for SandboxExit {
    fn fd(&self) -> BorrowedFd<'_> {
        self.op.as_fd()
    }

    fn outcome(&mut self) -> io::Result<Option<Outcome>> {
        if self.outcome.is_some() {
            return Ok(self.outcome);
        }
        let reply = match protocol::recv_reply(self.op.as_fd(), 0, true) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(_) | Ok(None) => None,
            Ok(Some((reply, _))) => Some(reply),
        };
        let oom = || self.group.oom_kills() > self.oom_before;
        let outcome = match reply {
            Some(AgentReply::Exited(code))
                if code == i32::from(signal_exit_code(SIGKILL)) && oom() =>
            {
                Outcome::OomKilled
            }
            Some(AgentReply::Exited(code)) => Outcome::Exited(code as u8),
            Some(AgentReply::Signaled(SIGKILL)) if oom() => Outcome::OomKilled,
            Some(AgentReply::Signaled(signal)) => Outcome::signaled(signal),
            // The reaper shares its command's OOM score, so the OOM killer may pick it.
            None if oom() => Outcome::OomKilled,
            _ => Outcome::Lost,
        };
        self.outcome = Some(outcome);
        Ok(self.outcome)
    }
}

/// Ends an execution: the reaper exits when its operation socket is shut down, and with it
/// every process of the execution. Works while other threads hold the same socket.
#[derive(Debug)]
struct SandboxKill {
    op: Arc<OwnedFd>,
}

impl Kill for SandboxKill {
    fn kill(&self) {
        let _ = rustix::net::shutdown(&*self.op, Shutdown::Both);
    }
}

/// Waits until `fd` is readable or `timeout` passes; true if readable.
pub(super) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let timeout = rustix::event::Timespec::try_from(timeout).unwrap_or_default();
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(ready) => return ready > 0,
            Err(_) => return false,
        }
    }
}

/// Yields exactly `remaining` bytes of `inner`; ending early is an error, not a short file.
#[derive(Debug)]
pub(super) struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> ExactReader<R> {
    /// A reader of exactly `length` bytes.
    pub fn new(inner: R, length: u64) -> Self {
        ExactReader {
            inner,
            remaining: length,
        }
    }
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let limit = out
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut out[..limit])?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining -= read as u64;
        Ok(read)
    }
}
