//! Pseudo-terminals for executions: the command gets the slave as stdin and stdout, the server
//! keeps the master. Echo, `\n` → `\r\n` and `^C` → SIGINT come from the kernel's defaults.

use std::{io, os::fd::OwnedFd};

use rustix::{
    fs::{Mode, OFlags},
    pty::OpenptFlags,
    termios::Winsize,
};

/// Window size reported to programs that ask.
const SIZE: Winsize = Winsize {
    ws_row: 24,
    ws_col: 80,
    ws_xpixel: 0,
    ws_ypixel: 0,
};

/// Opens a pseudo-terminal pair `(master, slave)` from the `/dev/ptmx` the process sees.
pub fn open() -> io::Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::termios::tcsetwinsize(&master, SIZE)?;
    Ok((master, slave))
}
