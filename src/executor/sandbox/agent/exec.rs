//! Executions, each served by its reaper: pid 1 of a fresh pid namespace (and mount namespace,
//! for a `/proc` that matches the pids the command sees), under the seccomp filter that the
//! command inherits. The reaper opens a pseudo-terminal of the runner's devpts and a stderr
//! pipe, starts the command, hands the terminal master and the pipe's read end to the server,
//! then waits for the command's end (it sends the status and exits) or for the server to shut
//! the operation socket down (it exits at once). Its exit ends every process of the execution.
//!
//! The init keeps one [`Spare`] reaper prepared ahead of time, waiting on the execution socket,
//! so that creating the namespaces, mounting `/proc`, installing the filter and opening the
//! terminal stay off the path of a request, and the request reaches its reaper directly.

use std::{
    io::{self, Write},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use rustix::{
    event::{PollFd, PollFlags},
    mount::MountFlags,
    process::{Pid, WaitOptions},
    pty::OpenptFlags,
};

use super::{Context, command::Launch};
use crate::{
    executor::sandbox::protocol::{self, AgentReply, AgentRequest, SocketReader},
    sys::sandbox::{self as sys, Forked},
};

/// Largest execute request (command and environment).
const MAX_REQUEST: u64 = 4 << 20;
/// How long a fork is retried while the runner is at its process limit.
const FORK_RETRY: Duration = Duration::from_secs(3);
/// Namespaces of a reaper.
const REAPER_NAMESPACES: libc::c_int = libc::CLONE_NEWPID | libc::CLONE_NEWNS;

/// A reaper waiting on the execution socket for its execution, linked to the init by a
/// socket pair on which it reports that it took one.
#[derive(Debug)]
pub(super) struct Spare {
    link: OwnedFd,
}

impl Spare {
    /// Forks a reaper that prepares itself and waits for an operation socket on `exec`.
    pub fn start(context: &Context, exec: &OwnedFd) -> io::Result<Spare> {
        let (ours, theirs) = protocol::socketpair()?;
        match sys::fork_into(REAPER_NAMESPACES)? {
            Forked::Child => {
                drop(ours);
                std::process::exit(wait_as_spare(&theirs, exec, context))
            }
            Forked::Parent(_) => Ok(Spare { link: ours }),
        }
    }

    /// The init's end of the link: readable once the spare took an execution or died.
    pub fn link(&self) -> BorrowedFd<'_> {
        self.link.as_fd()
    }

    /// Called when the link is readable: whether the spare took an execution (rather than
    /// dying without one).
    pub fn took_execution(self) -> bool {
        let mut buf = [0; 8];
        matches!(
            protocol::recv_record(self.link.as_fd(), &mut buf, 0, true),
            Ok((1.., _))
        )
    }
}

/// Serves an execution in a freshly forked reaper (when no spare was ready).
pub(super) fn serve_new(op: OwnedFd, context: &Context) {
    match retry_while_at_process_limit(|| sys::fork_into(REAPER_NAMESPACES)) {
        Ok(Forked::Child) => {
            let code = match Prepared::new(context) {
                Ok(prepared) => prepared.serve(op, context, None),
                Err(err) => fail(&op, &err),
            };
            std::process::exit(code)
        }
        Ok(Forked::Parent(_)) => {}
        Err(err) => {
            fail(&op, &err);
        }
    }
}

/// The spare's life: prepare, wait for an execution on the execution socket, tell the init.
fn wait_as_spare(link: &OwnedFd, exec: &OwnedFd, context: &Context) -> i32 {
    let Ok(prepared) = Prepared::new(context) else {
        return 1;
    };
    let mut kind = [0; 16];
    let op = loop {
        match protocol::recv_record(exec.as_fd(), &mut kind, 1, false) {
            Ok((0, _)) => return 0,
            Ok((_, mut fds)) => {
                if let Some(op) = fds.pop() {
                    break op;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return 1,
        }
    };
    prepared.serve(op, context, Some(link))
}

/// Forks, retrying for a short while when the runner is at its process limit (EAGAIN): the
/// processes of an execution that was just ended (a fork bomb's, say) die with its reaper, but
/// the kernel frees their pids only as they are reaped, a moment after the server moved on.
fn retry_while_at_process_limit(
    mut fork: impl FnMut() -> io::Result<Forked>,
) -> io::Result<Forked> {
    let deadline = Instant::now() + FORK_RETRY;
    let mut pause = Duration::from_millis(1);
    loop {
        match fork() {
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn fail(op: &OwnedFd, err: &io::Error) -> i32 {
    let _ = protocol::send_reply(op.as_fd(), &AgentReply::Failed(err.to_string()), &[]);
    1
}

/// What a reaper sets up before its request arrives: its `/proc`, the seccomp filter, the
/// OOM score its command inherits, the terminal, the stderr pipe and a request buffer.
struct Prepared {
    master: OwnedFd,
    slave: OwnedFd,
    err_read: OwnedFd,
    err_write: OwnedFd,
    buffer: Box<[u8]>,
}

impl Prepared {
    fn new(context: &Context) -> io::Result<Prepared> {
        sys::ignore_children(false);
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount("proc", "/proc", "proc", flags, None)?;
        // Installed here, where root inside may do so without no-new-privileges, and
        // inherited by the command.
        sys::install_seccomp(&context.filter)?;
        raise_oom_score()?;
        let pty_flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(pty_flags)?;
        rustix::pty::unlockpt(&master)?;
        // Window size and no output processing, as every executor (the server maps newlines).
        crate::executor::pty::configure(&master)?;
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, pty_flags)?;
        let (err_read, err_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let buffer = protocol::record_buffer();
        Ok(Prepared {
            master,
            slave,
            err_read,
            err_write,
            buffer,
        })
    }

    /// Serves an execute operation; returns the reaper's exit code. A spare tells the init
    /// through `link` once the command runs, so that preparing the next spare does not compete
    /// with starting this command.
    fn serve(self, op: OwnedFd, context: &Context, link: Option<&OwnedFd>) -> i32 {
        // The reaper keeps a descriptor of the terminal's slave side until it has sent the
        // status, so that the server's reader sees end of file (EIO) only after the status
        // is known; had the server closed the master earlier, the hangup would have killed a
        // command that had closed its terminal but not yet exited (status 129 instead of 0).
        match self.start(&op, context, link) {
            Ok((child, _slave)) => wait(&op, child),
            Err(err) => fail(&op, &err),
        }
    }

    /// Reads the request, starts the command and hands its terminal and stderr to the server.
    fn start(
        self,
        op: &OwnedFd,
        context: &Context,
        link: Option<&OwnedFd>,
    ) -> io::Result<(Pid, OwnedFd)> {
        let mut input = SocketReader::with_buffer(op, MAX_REQUEST, self.buffer);
        let AgentRequest::Execute {
            command,
            environment,
            privileged,
        } = protocol::read_request(&mut input)?
        else {
            return Err(io::Error::other("not an execute request"));
        };
        let launch = Launch::new(&command, &environment, privileged, context)?;
        match retry_while_at_process_limit(sys::fork)? {
            Forked::Child => {
                let err = launch.exec(&self.slave, &self.err_write);
                let _ = writeln!(io::stderr(), "cannot start the command: {err}");
                std::process::exit(127)
            }
            Forked::Parent(child) => {
                drop(self.err_write);
                let fds = [self.master.as_fd(), self.err_read.as_fd()];
                protocol::send_reply(op.as_fd(), &AgentReply::Started, &fds)?;
                if let Some(link) = link {
                    let _ = protocol::send_record(link.as_fd(), b"taken", &[]);
                }
                Ok((child, self.slave))
            }
        }
    }
}

/// Makes the reaper, and so its command, what the OOM killer picks first (never the agent).
/// Writing one's own score needs a dumpable process, which the reaper is only for this moment.
fn raise_oom_score() -> io::Result<()> {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    set_dumpable_behavior(DumpableBehavior::Dumpable)?;
    let written = std::fs::write("/proc/self/oom_score_adj", "1000");
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    written
}

/// Waits for the command or the server; returns the reaper's exit code. As pid 1 of the
/// execution's pid namespace the reaper inherits every orphan of the command, and reaps them
/// too: left as zombies they would fill the runner's process limit.
fn wait(op: &OwnedFd, child: Pid) -> i32 {
    let Ok(children) = sys::child_signals() else {
        return 1;
    };
    loop {
        // Children that ended before SIGCHLD was blocked are found here as well.
        match reap(child) {
            Ok(Some(reply)) => {
                let _ = protocol::send_reply(op.as_fd(), &reply, &[]);
                return 0;
            }
            Ok(None) => {}
            Err(_) => return 1,
        }
        let mut fds = [
            PollFd::new(op, PollFlags::IN),
            PollFd::new(&children, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return 1,
            Ok(_) => {}
        }
        // Anything from the server (only end of file is expected) means: stop now.
        if !fds[0].revents().is_empty() {
            return 1;
        }
        let mut info = [0u8; 128];
        while rustix::io::read(&children, &mut info).is_ok_and(|n| n > 0) {}
    }
}

/// Reaps every ended child; the command's end as a reply, once it has ended.
fn reap(command: Pid) -> io::Result<Option<AgentReply>> {
    loop {
        let (pid, status) = match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some(ended)) => ended,
            Ok(None) | Err(rustix::io::Errno::CHILD) => return Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        if pid != command {
            continue;
        }
        return Ok(match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => Some(AgentReply::Exited(code)),
            (None, Some(signal)) => Some(AgentReply::Signaled(signal)),
            (None, None) => continue,
        });
    }
}
