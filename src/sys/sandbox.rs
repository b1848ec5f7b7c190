//! System calls of the sandbox agent that neither std nor rustix offer safely: fork and
//! fork-like clone with namespace flags, unshare, closing inherited descriptors, signal
//! dispositions, bringing up loopback, idmapped mounts, seccomp and execve.
//!
//! Everything here is called only by the sandbox agent, a single-threaded process (it never
//! starts a thread); that is what makes the process-creating calls sound.

use std::{
    ffi::{CStr, CString},
    io,
    os::fd::{AsRawFd, BorrowedFd},
    os::fd::{FromRawFd, OwnedFd},
    ptr,
};

use rustix::{
    net::{AddressFamily, SocketType},
    process::Pid,
    thread::UnshareFlags,
};

/// Which side of a process creation the caller is on.
#[derive(Debug)]
pub(crate) enum Forked {
    /// The new process.
    Child,
    /// The caller, with the new process's id.
    Parent(Pid),
}

/// `fork()`. Only for the single-threaded agent.
pub(crate) fn fork() -> io::Result<Forked> {
    // SAFETY: the agent is single-threaded, so the child's copy of the address space holds no
    // lock owned by a thread that does not exist in the child; the child only runs this
    // program's own code afterwards.
    let pid = unsafe { libc::fork() };
    forked(i64::from(pid))
}

/// `clone(namespaces | SIGCHLD)` without a new stack: fork(), but with the child in new
/// namespaces (`CLONE_NEW*`). Only for the single-threaded agent.
pub(crate) fn fork_into(namespaces: libc::c_int) -> io::Result<Forked> {
    let flags = (namespaces | libc::SIGCHLD) as libc::c_ulong;
    // SAFETY: with a null stack, clone continues the child on a copy-on-write copy of the
    // caller's stack, exactly like fork. The caller is single-threaded, so no lock is held by
    // another thread. What glibc's fork does besides (atfork handlers: this program registers
    // none; refreshing the cached thread id, which glibc only uses to signal its own thread
    // group) cannot affect another process.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    forked(ret)
}

fn forked(ret: i64) -> io::Result<Forked> {
    match ret {
        0 => Ok(Forked::Child),
        pid if pid > 0 => Pid::from_raw(pid as i32)
            .map(Forked::Parent)
            .ok_or_else(|| io::Error::other("invalid pid")),
        _ => Err(io::Error::last_os_error()),
    }
}

/// `unshare(flags)` for namespace flags only.
pub(crate) fn unshare_namespaces(flags: libc::c_int) -> io::Result<()> {
    let flags = UnshareFlags::from_bits_retain(flags as u32);
    if flags.contains(UnshareFlags::FILES) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: the danger of unshare is CLONE_FILES (descriptors of other threads becoming
    // invalid), which is refused above; namespace flags do not affect memory safety.
    unsafe { rustix::thread::unshare_unsafe(flags) }.map_err(Into::into)
}

/// Closes every descriptor numbered `first` or higher.
pub(crate) fn close_descriptors_from(first: u32) -> io::Result<()> {
    // SAFETY: called first thing by the agent, before any of its code owns a descriptor of
    // that range, so no `OwnedFd` is invalidated; inherited descriptors have no owner here.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `SIGCHLD` to be ignored (children are reaped by the kernel) or back to default.
pub(crate) fn ignore_children(ignore: bool) {
    let handler = if ignore { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: installing SIG_IGN or SIG_DFL runs no code of ours in signal context.
    unsafe { libc::signal(libc::SIGCHLD, handler) };
}

/// Blocks `SIGCHLD` and returns a non-blocking signalfd that becomes readable when a child
/// changes state, so that a process can wait for children and other descriptors together.
pub(crate) fn child_signals() -> io::Result<OwnedFd> {
    // SAFETY: the sigset is initialised by sigemptyset before sigaddset, sigprocmask and
    // signalfd read it; signalfd returns a new descriptor that nothing else owns.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Restores what a freshly started program expects: default `SIGPIPE` and `SIGCHLD` (the
/// Rust runtime and the agent ignore them, and ignored signals survive execve) and an empty
/// signal mask.
pub(crate) fn reset_signals() {
    // SAFETY: SIG_DFL runs no code; the sigset is initialised by sigemptyset before use.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
    }
}

/// Brings the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> io::Result<()> {
    let sock = rustix::net::socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads an ifreq, which `req` is, for the call's duration.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes a detached mount tree (from `open_tree`) show file owners through the id mapping of
/// the user namespace `userns`.
pub(crate) fn set_idmap(tree: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let flags = libc::AT_EMPTY_PATH | libc::AT_RECURSIVE;
    // SAFETY: the path is a valid empty C string and `attr` a valid mount_attr of the size
    // passed; the kernel only reads both during the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Installs a seccomp filter on the calling thread (no-new-privileges must be set).
pub(crate) fn install_seccomp(filter: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::other("filter too long"))?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `len` valid instructions that outlive the call; the kernel
    // copies the program and never writes through the pointer.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const _,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `execve(path, argv, envp)`; returns only on failure.
pub(crate) fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let argv: Vec<*const libc::c_char> = argv
        .iter()
        .map(|arg| arg.as_ptr())
        .chain([ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = envp
        .iter()
        .map(|var| var.as_ptr())
        .chain([ptr::null()])
        .collect();
    // SAFETY: both arrays are null-terminated and point to NUL-terminated strings that live
    // until the call returns (it only returns on failure).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}
