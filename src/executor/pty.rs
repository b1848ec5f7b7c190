//! Pseudo-terminals for executions: the command gets the slave as stdin and stdout, the server
//! keeps the master. Echo, line editing and `^C` → SIGINT come from the kernel's defaults;
//! output post-processing (`\n` → `\r\n`) is switched off here and done by the server
//! ([`crate::executor::output::onlcr`]): the kernel does it character by character, which makes
//! line-heavy output several times slower.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use rustix::{
    fs::{Mode, OFlags},
    pty::OpenptFlags,
    termios::{OptionalActions, OutputModes, Winsize},
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
    configure(&master)?;
    Ok((master, slave))
}

/// Sets the window size and switches the kernel's output processing off (see the module docs).
pub fn configure(master: &impl AsFd) -> io::Result<()> {
    rustix::termios::tcsetwinsize(master, SIZE)?;
    let mut termios = rustix::termios::tcgetattr(master)?;
    termios.output_modes.remove(OutputModes::OPOST);
    rustix::termios::tcsetattr(master, OptionalActions::Now, &termios)?;
    Ok(())
}
