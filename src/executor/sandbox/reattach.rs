//! Taking a runner back after a restart. The launcher listens on `<runner dir>/control` (a
//! `SOCK_SEQPACKET` socket, mode 0600 in the root-owned state directory) before it unshares
//! anything, and the init keeps serving that listener for as long as it lives. When the
//! server's control socket closes without an `end` record (server stopped or crashed), the
//! init detaches and waits there; the next server connects, checks that the peer is this
//! runner's init (host uid of the runner's root, member of the runner's cgroup), sends the
//! secret it shared with the init at creation together with a fresh execution socket, and
//! gets `Ready`.
//!
//! What the next server needs besides the directory is kept in `<runner dir>/runner.json`
//! (0600): the uid slot, the host uid of the runner's root and the secret.

use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use rustix::{
    fs::{Mode, OFlags},
    net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt::Timeout},
};
use serde::{Deserialize, Serialize};

use super::protocol::{self, AgentReply};

/// The listener's name in the runner directory.
pub const CONTROL_SOCKET: &str = "control";
/// What the next server needs to take the runner back, in the runner directory.
pub const RUNNER_FILE: &str = "runner.json";
/// Control record kind (server → init) that ends the runner; closing the socket without it
/// only detaches.
pub const END: &[u8] = b"end";
/// How long either side waits for the other while reattaching.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Length of the shared secret in bytes (hex-encoded twice as long).
const SECRET_BYTES: usize = 32;

/// What a runner directory records about its runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerFile {
    /// The uid range slot.
    pub slot: u32,
    /// Host uid of the runner's root (the init's uid as seen from the host).
    pub uid: u32,
    /// Shared with the init; proves to it that the connecting server is ours.
    pub secret: String,
}

impl RunnerFile {
    /// A fresh record with a new secret.
    pub fn new(slot: u32, uid: u32) -> RunnerFile {
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        debug_assert_eq!(secret.len(), SECRET_BYTES * 2);
        RunnerFile { slot, uid, secret }
    }

    /// Writes it into `dir`, readable by the owner only.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let text = serde_json::to_vec(self).map_err(io::Error::other)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(RUNNER_FILE))?;
        io::Write::write_all(&mut file, &text)
    }

    /// Reads it from `dir`.
    pub fn load(dir: &Path) -> io::Result<RunnerFile> {
        serde_json::from_slice(&fs::read(dir.join(RUNNER_FILE))?).map_err(io::Error::other)
    }
}

/// The address of `<dir>/control` through a descriptor of `dir`, so that long state
/// directory paths do not hit the 108-byte limit of socket addresses.
fn address(dir: &OwnedFd) -> io::Result<SocketAddrUnix> {
    let path = format!("/proc/self/fd/{}/{CONTROL_SOCKET}", dir.as_raw_fd());
    Ok(SocketAddrUnix::new(path)?)
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(dir, flags, Mode::empty())?)
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Launcher side: binds `<dir>/control`, accessible to the owner (host root) only. The init
/// calls [`listen`] once it is the runner's root, so that the peer credentials a connecting
/// server sees are the init's (they are taken at `listen`).
pub fn bind(dir: &Path) -> io::Result<OwnedFd> {
    let dir = open_dir(dir)?;
    let listener = seqpacket()?;
    let _ = rustix::fs::unlinkat(&dir, CONTROL_SOCKET, rustix::fs::AtFlags::empty());
    rustix::net::bind(&listener, &address(&dir)?)?;
    rustix::fs::chmodat(
        &dir,
        CONTROL_SOCKET,
        Mode::from_raw_mode(0o600),
        rustix::fs::AtFlags::empty(),
    )?;
    Ok(listener)
}

/// Init side: starts listening on the socket [`bind`] made.
pub fn listen(listener: &OwnedFd) -> io::Result<()> {
    Ok(rustix::net::listen(listener, 4)?)
}

/// Init side: accepts one connection and, if it brings the secret and an execution socket,
/// answers `Ready` and returns the new control and execution sockets.
pub fn accept(listener: &OwnedFd, secret: &str) -> Option<(OwnedFd, OwnedFd)> {
    let conn = rustix::net::accept_with(listener, SocketFlags::CLOEXEC).ok()?;
    for timeout in [Timeout::Recv, Timeout::Send] {
        rustix::net::sockopt::set_socket_timeout(&conn, timeout, Some(ATTACH_TIMEOUT)).ok()?;
    }
    let mut buf = [0; SECRET_BYTES * 4];
    let (len, mut fds) = protocol::recv_record(conn.as_fd(), &mut buf, 1, false).ok()?;
    let exec = fds.pop()?;
    if !same(&buf[..len], secret.as_bytes()) {
        return None;
    }
    protocol::send_reply(conn.as_fd(), &AgentReply::Ready, &[]).ok()?;
    rustix::net::sockopt::set_socket_timeout(&conn, Timeout::Recv, None).ok()?;
    rustix::net::sockopt::set_socket_timeout(&conn, Timeout::Send, None).ok()?;
    Some((conn, exec))
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: connects to the init of the runner in `dir`, checks that the peer is that
/// init (host uid `file.uid`, a member of a cgroup whose path ends in `cgroup_suffix`), and
/// hands it `exec`. Returns the new control socket.
pub fn connect(
    dir: &Path,
    file: &RunnerFile,
    cgroup_suffix: &str,
    exec: &OwnedFd,
) -> io::Result<OwnedFd> {
    let dir_fd = open_dir(dir)?;
    let conn = seqpacket()?;
    rustix::net::connect(&conn, &address(&dir_fd)?)?;
    let peer = rustix::net::sockopt::socket_peercred(&conn)?;
    if peer.uid.as_raw() != file.uid {
        return Err(io::Error::other(format!(
            "the listener belongs to uid {}, not to the runner's root {}",
            peer.uid.as_raw(),
            file.uid
        )));
    }
    let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", peer.pid.as_raw_nonzero()))?;
    if !cgroups.lines().any(|line| line.ends_with(cgroup_suffix)) {
        return Err(io::Error::other(
            "the listener is not in the runner's cgroup",
        ));
    }
    for timeout in [Timeout::Recv, Timeout::Send] {
        rustix::net::sockopt::set_socket_timeout(&conn, timeout, Some(ATTACH_TIMEOUT))?;
    }
    protocol::send_record(conn.as_fd(), file.secret.as_bytes(), &[exec.as_fd()])?;
    match protocol::recv_reply(conn.as_fd(), 0, false)? {
        Some((AgentReply::Ready, _)) => {}
        other => return Err(io::Error::other(format!("the init answered {other:?}"))),
    }
    rustix::net::sockopt::set_socket_timeout(&conn, Timeout::Recv, None)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab"));
        assert_eq!(RunnerFile::new(1, 2).secret.len(), SECRET_BYTES * 2);
    }

    #[test]
    fn a_runner_file_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = RunnerFile::new(3, 1 << 20);
        file.save(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(RUNNER_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(RunnerFile::load(dir.path()).unwrap(), file);
    }
}
