//! One execution, served by its reaper: pid 1 of a fresh pid namespace (and mount namespace,
//! for a `/proc` that matches the pids the command sees). The reaper opens a pseudo-terminal of
//! the runner's devpts and a stderr pipe, starts the command, hands the terminal master and the
//! pipe's read end to the server, then waits for either the command's end (it sends the status
//! and exits) or the server shutting the operation socket down (it exits at once). Its exit ends
//! every process the command left behind, daemonized or not.

use std::{
    ffi::CString,
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
};

use rustix::{
    event::{PollFd, PollFlags},
    fs::Mode,
    mount::MountFlags,
    process::{Pid, Resource, Rlimit, WaitOptions},
    pty::OpenptFlags,
};

use super::{Context, rootfs};
use crate::{
    sandbox::protocol::{self, RecordReader, Reply, Request},
    sys::sandbox::{self as sys, Forked},
};

/// Largest execute request (command and environment).
const MAX_REQUEST: u64 = 4 << 20;
/// `PATH` of commands.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Who a command runs as.
struct Identity {
    uid: u32,
    gid: u32,
    name: &'static str,
    home: String,
}

/// Serves an execute operation; returns the reaper's exit code.
pub(super) fn serve(op: OwnedFd, context: &Context) -> i32 {
    sys::ignore_children(false);
    match start(&op, context) {
        // The reaper keeps a descriptor of the terminal's slave side until it has sent the
        // status, so that the server's reader sees end of file (EIO) only after the status
        // is known; had the server closed the master earlier, the hangup would have killed a
        // command that had closed its terminal but not yet exited (status 129 instead of 0).
        Ok((child, _slave)) => wait(&op, child),
        Err(err) => {
            let _ = protocol::send_reply(op.as_fd(), &Reply::Failed(err.to_string()), &[]);
            1
        }
    }
}

/// Reads the request, mounts this pid namespace's /proc, starts the command and hands its
/// terminal and stderr to the server.
fn start(op: &OwnedFd, context: &Context) -> io::Result<(Pid, OwnedFd)> {
    let request = protocol::read_request(&mut RecordReader::new(op, MAX_REQUEST))?;
    let Request::Execute {
        command,
        environment,
        privileged,
    } = request
    else {
        return Err(io::Error::other("not an execute request"));
    };
    let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    rustix::mount::mount("proc", "/proc", "proc", flags, None)?;
    let identity = if privileged {
        Identity {
            uid: 0,
            gid: 0,
            name: "root",
            home: "/root".to_owned(),
        }
    } else {
        let user = &context.user;
        Identity {
            uid: user.uid,
            gid: user.gid,
            name: "user",
            home: user.home.clone(),
        }
    };
    let argv = |shell: &str| -> io::Result<Vec<CString>> {
        [shell, "-c", &command].into_iter().map(cstring).collect()
    };
    let (bash, sh) = (argv("bash")?, argv("sh")?);
    let env = environment_of(&identity, &environment);
    let pty_flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(pty_flags)?;
    rustix::pty::unlockpt(&master)?;
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, pty_flags)?;
    let (err_read, err_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    match sys::fork()? {
        Forked::Child => {
            let err = run_command(&slave, &err_write, &identity, context, &bash, &sh, &env);
            let _ = writeln!(io::stderr(), "cannot start the command: {err}");
            std::process::exit(127)
        }
        Forked::Parent(child) => {
            drop(err_write);
            protocol::send_reply(
                op.as_fd(),
                &Reply::Started,
                &[master.as_fd(), err_read.as_fd()],
            )?;
            Ok((child, slave))
        }
    }
}

/// Waits for the command or the server; returns the reaper's exit code.
fn wait(op: &OwnedFd, child: Pid) -> i32 {
    let Ok(pidfd) = rustix::process::pidfd_open(child, rustix::process::PidfdFlags::empty()) else {
        return 1;
    };
    loop {
        let mut fds = [
            PollFd::new(op, PollFlags::IN),
            PollFd::new(&pidfd, PollFlags::IN),
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
        if fds[1].revents().is_empty() {
            continue;
        }
        let status = match rustix::process::waitpid(Some(child), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => status,
            Ok(None) | Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return 1,
        };
        let reply = match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => Reply::Exited(code),
            (None, Some(signal)) => Reply::Signaled(signal),
            (None, None) => continue,
        };
        let _ = protocol::send_reply(op.as_fd(), &reply, &[]);
        return 0;
    }
}

/// In the command child: terminal, working directory, identity, limits, filter, execve.
/// Returns only on failure.
fn run_command(
    slave: &OwnedFd,
    err_write: &OwnedFd,
    identity: &Identity,
    context: &Context,
    bash: &[CString],
    sh: &[CString],
    env: &[CString],
) -> io::Error {
    match prepare_command(slave, err_write, identity, context) {
        Err(err) => err,
        Ok(()) => match sys::execve(c"/bin/bash", bash, env) {
            err if err.kind() == io::ErrorKind::NotFound => sys::execve(c"/bin/sh", sh, env),
            err => err,
        },
    }
}

fn prepare_command(
    slave: &OwnedFd,
    err_write: &OwnedFd,
    identity: &Identity,
    context: &Context,
) -> io::Result<()> {
    sys::reset_signals();
    rustix::process::setsid()?;
    rustix::process::ioctl_tiocsctty(slave)?;
    // Let the user reopen its terminal (e.g. /dev/stdin); best effort.
    let owner = (
        rustix::process::Uid::from_raw(identity.uid),
        rustix::process::Gid::from_raw(identity.gid),
    );
    let _ = rustix::fs::fchown(slave, Some(owner.0), Some(owner.1));
    rustix::stdio::dup2_stdin(slave)?;
    rustix::stdio::dup2_stdout(slave)?;
    rustix::stdio::dup2_stderr(err_write)?;
    if std::env::set_current_dir("/workspace").is_err() {
        std::env::set_current_dir("/")?;
    }
    let no_core = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    rustix::process::setrlimit(Resource::Core, no_core)?;
    rustix::process::umask(Mode::from_raw_mode(0o022));
    rootfs::become_user(identity.uid, identity.gid)?;
    // Learner processes are what the OOM killer should pick, never the agent. Writing our own
    // oom_score_adj needs a dumpable process (the agent is not); raising needs no privilege.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::Dumpable)?;
    std::fs::write("/proc/self/oom_score_adj", "1000")?;
    rustix::thread::set_no_new_privs(true)?;
    sys::install_seccomp(&context.filter)
}

/// The command's environment: a fixed base, then the request's variables (which override it);
/// nothing of the server's environment.
fn environment_of(identity: &Identity, extra: &[(String, String)]) -> Vec<CString> {
    let mut vars: Vec<(String, String)> = [
        ("HOME", identity.home.as_str()),
        ("USER", identity.name),
        ("LOGNAME", identity.name),
        ("PATH", PATH),
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm"),
        ("CODEOCEAN", "true"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    for (name, value) in extra {
        vars.retain(|(existing, _)| existing != name);
        vars.push((name.clone(), value.clone()));
    }
    vars.into_iter()
        .filter_map(|(name, value)| cstring(&format!("{name}={value}")).ok())
        .collect()
}

fn cstring(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::other("NUL byte in the command or environment"))
}
