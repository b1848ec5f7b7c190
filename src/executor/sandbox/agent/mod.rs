//! The sandbox agent: the process the server starts (as `<binary> __sandbox-agent <pid>`) for
//! each runner, talking to it over the control socket on its stdin.
//!
//! It runs in two stages, both single-threaded. The launcher (host root) reads the setup,
//! joins the runner's cgroups, prepares the runner's user namespace, unshares the mount, uts,
//! ipc, net, pid and cgroup namespaces, forks the runner's init and waits for it. The init
//! (pid 1 of the runner) builds the root file system, enters the user namespace as root inside,
//! reports ready and then serves operations: one forked child per operation socket received,
//! so concurrent operations need no lock. On an `end` record the init exits and the kernel
//! ends every process of the runner. When the control socket closes without one (the server
//! stopped or died), the init detaches: running executions end with their operation sockets,
//! and the runner waits on its listener for the next server (see `reattach`).

mod command;
mod exec;
mod files;
mod rootfs;

use std::{
    fs,
    os::fd::{AsFd, OwnedFd},
    process,
};

use rustix::{
    event::{PollFd, PollFlags},
    fs::{Mode, OFlags},
    process::{Pid, Signal, WaitOptions},
};

use super::{
    protocol::{self, AgentReply, Setup},
    seccomp,
};
use crate::sys::sandbox::{self as sys, Forked};

/// Control record kinds (server → init), each carrying one operation socket.
pub(super) const EXECUTE: &[u8] = b"execute";
/// See [`EXECUTE`].
pub(super) const FILES: &[u8] = b"files";

/// What every operation child needs to know about its runner.
#[derive(Debug)]
struct Context {
    /// The unprivileged user of the image.
    user: rootfs::User,
    /// The image's `Env`, as name and value.
    image_env: Vec<(String, String)>,
    /// The seccomp program for commands.
    filter: Vec<libc::sock_filter>,
}

/// Runs the agent. Returns the exit code.
///
/// The runner ends when the server sends `end` or kills its cgroup; it outlives the server
/// otherwise. The launcher has no parent death signal: the runner must not die with the
/// server (nor with, say, a short-lived thread of a test harness that spawned it).
pub(super) fn main() -> i32 {
    let Ok(control) = take_control_socket() else {
        return 1;
    };
    let fail = |message: String| {
        let _ = protocol::send_reply(control.as_fd(), &AgentReply::Failed(message), &[]);
        1
    };
    let (setup, userns, exec, listener) = match launch(&control) {
        Ok(launched) => launched,
        Err(message) => return fail(message),
    };
    match sys::fork() {
        Err(err) => fail(format!("cannot fork the init: {err}")),
        Ok(Forked::Child) => init(control, exec, &listener, &setup, userns),
        Ok(Forked::Parent(pid)) => {
            // The launcher only waits: the init alone holds the runner's ends of the sockets,
            // and no process of a runner stays host root (the runner's base uid is unused on
            // the host).
            drop((control, userns, exec, listener));
            let _ = rootfs::become_user(setup.uid_base, setup.uid_base);
            wait_for(pid);
            0
        }
    }
}

/// Closes every inherited descriptor, moves the control socket (stdin) to a close-on-exec
/// descriptor and points stdin at `/dev/null`.
fn take_control_socket() -> std::io::Result<OwnedFd> {
    sys::close_descriptors_from(3)?;
    let control = rustix::io::fcntl_dupfd_cloexec(rustix::stdio::stdin(), 3)?;
    let null = rustix::fs::open("/dev/null", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    rustix::stdio::dup2_stdin(&null)?;
    Ok(control)
}

/// The launcher stage up to forking the init: reads the setup (with the execution socket),
/// listens for later servers, joins the cgroups, creates the user namespace and unshares the
/// others (the init will be pid 1 of the new pid namespace).
fn launch(control: &OwnedFd) -> Result<(Setup, OwnedFd, OwnedFd, OwnedFd), String> {
    let mut buf = vec![0; protocol::MAX_RECORD];
    let (len, mut fds) = protocol::recv_record(control.as_fd(), &mut buf, 1, false)
        .map_err(|err| format!("cannot read the setup: {err}"))?;
    let exec = fds
        .pop()
        .ok_or("the setup came without the execution socket")?;
    let setup: Setup =
        serde_json::from_slice(&buf[..len]).map_err(|err| format!("invalid setup: {err}"))?;
    let listener = super::reattach::bind(&setup.runner_dir)
        .map_err(|err| format!("cannot listen in {}: {err}", setup.runner_dir.display()))?;
    let me = rustix::process::getpid().as_raw_nonzero().to_string();
    for procs in &setup.cgroup_procs {
        fs::write(procs, &me).map_err(|err| format!("cannot join {}: {err}", procs.display()))?;
    }
    let userns = user_namespace(setup.uid_base)?;
    let namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWCGROUP;
    sys::unshare_namespaces(namespaces).map_err(|err| format!("cannot unshare: {err}"))?;
    Ok((setup, userns, exec, listener))
}

/// Creates the runner's user namespace, mapping uids and gids 0..65536 inside to
/// `base..base+65536` on the host, and returns a descriptor of it. A helper child is cloned
/// into a new user namespace only to have the map written and the namespace opened.
fn user_namespace(base: u32) -> Result<OwnedFd, String> {
    let helper = match sys::fork_into(libc::CLONE_NEWUSER) {
        Err(err) => return Err(format!("cannot create a user namespace: {err}")),
        Ok(Forked::Child) => {
            let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
            loop {
                let _ = rustix::event::poll(&mut [], None);
            }
        }
        Ok(Forked::Parent(pid)) => pid,
    };
    let proc = format!("/proc/{}", helper.as_raw_nonzero());
    let map = format!("0 {base} 65536\n");
    let result = fs::write(format!("{proc}/uid_map"), &map)
        .and_then(|()| fs::write(format!("{proc}/gid_map"), &map))
        .and_then(|()| {
            let flags = OFlags::RDONLY | OFlags::CLOEXEC;
            Ok(rustix::fs::open(
                format!("{proc}/ns/user"),
                flags,
                Mode::empty(),
            )?)
        })
        .map_err(|err| format!("cannot map the user namespace: {err}"));
    let _ = rustix::process::kill_process(helper, Signal::KILL);
    wait_for(helper);
    result
}

/// Waits until `pid` has ended.
fn wait_for(pid: Pid) {
    while let Err(rustix::io::Errno::INTR) =
        rustix::process::waitpid(Some(pid), WaitOptions::empty())
    {}
}

/// The init stage: pid 1 of the runner. Returns the exit code.
fn init(
    control: OwnedFd,
    exec: OwnedFd,
    listener: &OwnedFd,
    setup: &Setup,
    userns: OwnedFd,
) -> i32 {
    // The launcher waits for us; if it is killed, so are we (and with us the runner).
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    let context = match prepare(setup, userns) {
        Ok(context) => context,
        Err(message) => {
            let _ = protocol::send_reply(control.as_fd(), &AgentReply::Failed(message), &[]);
            return 1;
        }
    };
    if let Err(err) = super::reattach::listen(listener) {
        let message = format!("cannot listen for later servers: {err}");
        let _ = protocol::send_reply(control.as_fd(), &AgentReply::Failed(message), &[]);
        return 1;
    }
    if protocol::send_reply(control.as_fd(), &AgentReply::Ready, &[]).is_err() {
        return 1;
    }
    serve(Some((control, exec)), listener, &setup.secret, &context)
}

/// Builds the runner and becomes root inside its user namespace.
fn prepare(setup: &Setup, userns: OwnedFd) -> Result<Context, String> {
    // Nobody else in the runner may read our memory or descriptors through /proc or ptrace:
    // learner code running as root inside has the same uid.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    rustix::process::umask(Mode::empty());
    let hostname = &setup.hostname.as_bytes()[..setup.hostname.len().min(64)];
    rustix::system::sethostname(hostname)
        .map_err(|err| format!("cannot set the hostname: {err}"))?;
    sys::loopback_up().map_err(|err| format!("cannot bring up lo: {err}"))?;
    let user = rootfs::build(setup, userns.as_fd())
        .map_err(|err| format!("cannot build the root: {err}"))?;
    let user_type = Some(rustix::thread::LinkNameSpaceType::User);
    rustix::thread::move_into_link_name_space(userns.as_fd(), user_type)
        .map_err(|err| format!("cannot enter the user namespace: {err}"))?;
    drop(userns);
    rootfs::become_user(0, 0).map_err(|err| format!("cannot become root inside: {err}"))?;
    // Changing ids cleared the parent death signal.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    let image_env = setup
        .env
        .iter()
        .filter_map(|var| var.split_once('='))
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    Ok(Context {
        user,
        image_env,
        filter: seccomp::program(),
    })
}

/// Serves operations until the server sends `end`. File operations arrive on the control
/// socket; executions on the execution socket, where the spare reaper waits and takes them
/// itself (one process wake-up less on the way to a command). The init watches the spare: when
/// it reports that it took an execution, the next spare is prepared; when it died without, the
/// init serves executions itself until the next one has been served. While no server is
/// attached, only the listener is watched.
fn serve(
    mut attached: Option<(OwnedFd, OwnedFd)>,
    listener: &OwnedFd,
    secret: &str,
    context: &Context,
) -> i32 {
    // Operation children are reaped by the kernel; the init never waits for them.
    sys::ignore_children(true);
    let mut spare = attached
        .as_ref()
        .and_then(|(_, exec)| exec::Spare::start(context, exec).ok());
    loop {
        let (control_ready, watched_ready, listener_ready) =
            match wait(attached.as_ref(), spare.as_ref(), listener) {
                Ok(ready) => ready,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return 1,
            };
        if listener_ready && let Some(new) = super::reattach::accept(listener, secret) {
            // A server took the runner (back): its sockets replace any old ones.
            spare = exec::Spare::start(context, &new.1).ok();
            attached = Some(new);
            continue;
        }
        let Some((control, exec)) = attached.as_ref() else {
            continue;
        };
        if control_ready {
            match receive(control) {
                Incoming::End => return 0,
                Incoming::Detached => {
                    attached = None;
                    spare = None;
                    continue;
                }
                Incoming::Operation(op) => files(op, context),
                Incoming::Nothing => {}
            }
        }
        if !watched_ready {
            continue;
        }
        match spare.take() {
            Some(taken) => {
                spare = taken
                    .took_execution()
                    .then(|| exec::Spare::start(context, exec).ok())
                    .flatten()
            }
            None => match receive(exec) {
                Incoming::End | Incoming::Detached => {
                    attached = None;
                }
                Incoming::Operation(op) => {
                    exec::serve_new(op, context);
                    spare = exec::Spare::start(context, exec).ok();
                }
                Incoming::Nothing => {}
            },
        }
    }
}

/// Polls the attached server's sockets (the control socket and the spare's link or the
/// execution socket) and the listener: which of them are ready.
fn wait(
    attached: Option<&(OwnedFd, OwnedFd)>,
    spare: Option<&exec::Spare>,
    listener: &OwnedFd,
) -> rustix::io::Result<(bool, bool, bool)> {
    let mut fds = vec![PollFd::new(listener, PollFlags::IN)];
    let watched;
    if let Some((control, exec)) = attached {
        watched = spare.map_or(exec.as_fd(), exec::Spare::link);
        fds.push(PollFd::new(control, PollFlags::IN));
        fds.push(PollFd::new(&watched, PollFlags::IN));
    }
    rustix::event::poll(&mut fds, None)?;
    let ready = |i: usize| fds.get(i).is_some_and(|fd| !fd.revents().is_empty());
    Ok((ready(1), ready(2), ready(0)))
}

/// What a socket of the server delivered.
enum Incoming {
    /// An operation socket.
    Operation(OwnedFd),
    /// The server asked the runner to end.
    End,
    /// End of file: the server closed the socket (it stopped or died).
    Detached,
    /// A record without a descriptor, or one that was refused.
    Nothing,
}

fn receive(socket: &OwnedFd) -> Incoming {
    let mut kind = [0; 16];
    match protocol::recv_record(socket.as_fd(), &mut kind, 1, false) {
        Ok((0, _)) => Incoming::Detached,
        Ok((len, _)) if &kind[..len] == super::reattach::END => Incoming::End,
        Ok((_, mut fds)) => fds.pop().map_or(Incoming::Nothing, Incoming::Operation),
        Err(err) if err.kind() == std::io::ErrorKind::Other => Incoming::Nothing,
        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => Incoming::Nothing,
        Err(_) => Incoming::Detached,
    }
}

/// Serves a file operation in a forked child.
fn files(op: OwnedFd, context: &Context) {
    match sys::fork() {
        Ok(Forked::Child) => process::exit(files::serve(op, context)),
        Ok(Forked::Parent(_)) => {}
        Err(err) => {
            let reply = AgentReply::Failed(format!("cannot fork: {err}"));
            let _ = protocol::send_reply(op.as_fd(), &reply, &[]);
        }
    }
}
