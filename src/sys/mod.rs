//! The only place with `unsafe` code: thin wrappers around what the safe APIs (std, rustix) do
//! not offer. Every block carries a `SAFETY:` comment.

use std::{
    io,
    os::{fd::BorrowedFd, unix::process::CommandExt},
    process::{Child, Command},
};

/// Spawns `command` as the leader of a new session whose controlling terminal is its stdin
/// (which must be the slave side of a pseudo-terminal), so that `^C` reaches it as SIGINT and
/// its whole process group can be signalled at once.
pub fn spawn_with_controlling_terminal(command: &mut Command) -> io::Result<Child> {
    // SAFETY: the closure runs in the child between fork and exec. It only makes two system
    // calls (setsid, ioctl), which are async-signal-safe; it allocates nothing and takes no
    // locks, so the state of other threads of the parent at fork time cannot affect it.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            // SAFETY: fd 0 is open in the child: std set up stdin before running this hook.
            let stdin = BorrowedFd::borrow_raw(0);
            rustix::process::ioctl_tiocsctty(stdin)?;
            Ok(())
        });
    }
    command.spawn()
}
