//! Taking over descriptors a parent left open for us (systemd's socket activation).

use std::{
    io,
    net::TcpListener,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use rustix::{
    io::{FdFlags, fcntl_getfd, fcntl_setfd},
    net::{SocketType, sockopt},
};

/// Takes ownership of the inherited descriptor `fd`, which must be a listening TCP socket,
/// and marks it close-on-exec so that no command started later inherits it.
///
/// Each descriptor may be taken at most once per process; the caller (the one place that
/// reads `LISTEN_FDS`) guarantees that.
pub fn inherited_listener(fd: RawFd) -> io::Result<TcpListener> {
    if fd < 3 {
        return Err(io::Error::other(format!(
            "descriptor {fd} is not inherited"
        )));
    }
    // SAFETY: the descriptor number comes from `LISTEN_FDS`, which a parent sets for the
    // descriptors it passes; we check below that it is open (fcntl fails otherwise) before
    // anything else uses it, and the caller takes each number once, so this `OwnedFd` is its
    // only owner and closes it exactly once.
    let owned = unsafe {
        let borrowed = std::os::fd::BorrowedFd::borrow_raw(fd);
        let flags = fcntl_getfd(borrowed)?;
        fcntl_setfd(borrowed, flags | FdFlags::CLOEXEC)?;
        OwnedFd::from_raw_fd(fd)
    };
    if sockopt::socket_type(&owned)? != SocketType::STREAM || !sockopt::socket_acceptconn(&owned)? {
        // Do not close what is not ours to use: leave it open, as it was.
        std::mem::forget(owned);
        return Err(io::Error::other(format!(
            "descriptor {fd} is not a listening stream socket"
        )));
    }
    Ok(TcpListener::from(owned))
}
