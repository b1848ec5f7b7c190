//! The runner's root file system, built by its init while still host root in its private mount
//! namespace: a size-capped tmpfs on the runner directory holds the overlay upper and work
//! directories (the writable layer); the image is the overlay's lower layer (directory images
//! through an idmapped mount, so their root-owned files are root-owned inside; the host image
//! not, so host files stay owned by an unmapped uid and e.g. `/etc/shadow` stays unreadable);
//! then `/workspace`, `/tmp`, the user's home, a `/proc` and a minimal read-only `/dev`, and
//! pivot_root, after which nothing of the host is reachable. Paths are relative to the tmpfs.
//! Whatever is read or created inside the image (its `/etc/passwd`, the home, `/workspace`,
//! the mount points) is resolved in-root: an image's symlinks (`/home -> /root-of-host`) can
//! only ever point into the image.

use std::{
    fs, io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::symlink,
    },
    path::Path,
};

use rustix::{
    fs::{CWD, FileType, Mode},
    mount::{MountFlags, MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags},
    process::{Gid, Uid},
};

use crate::executor::sandbox::protocol::{ImageSource, Setup};
use crate::image::{
    inroot::{InPath, Root, kind_at, remove_all},
    passwd,
};
use crate::sys::sandbox as sys;

/// Host directories the `host` image shows (as overlays, or as symlinks where the host has
/// symlinks: Debian's merged `/usr`).
const HOST_DIRECTORIES: &[&str] = &[
    "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32",
];
/// Device nodes of `/dev`: name, major, minor.
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The image's unprivileged user, ids as seen inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

impl User {
    /// The fallback when the image has no `user`.
    fn fallback() -> User {
        User {
            uid: 1000,
            gid: 1000,
            home: "/home/user".to_owned(),
        }
    }
}

/// Builds the root and pivots into it; returns the image's user.
pub(super) fn build(setup: &Setup, userns: BorrowedFd<'_>) -> io::Result<User> {
    let base = setup.uid_base;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    let size = format!("size={}m,mode=0755", setup.disk_limit_mb.max(1));
    let tmpfs_flags = MountFlags::NOSUID | MountFlags::NODEV;
    rustix::mount::mount(
        "tmpfs",
        &setup.runner_dir,
        "tmpfs",
        tmpfs_flags,
        Some(cstr(&size)?.as_c_str()),
    )?;
    std::env::set_current_dir(&setup.runner_dir)?;
    make_dir("upper", 0o755, None)?;
    make_dir("work", 0o755, None)?;
    match &setup.image {
        ImageSource::Host => host_root(base)?,
        ImageSource::Directory(dir) => directory_root(dir, userns)?,
    }
    if let Some(text) = &setup.resolv_conf {
        write_resolv_conf(text, base)?;
    }
    let image = Root::open(Path::new("root"))?;
    let user = read_user(&image);
    make_dir_in(&image, "tmp", 0o1777, (base, base))?;
    make_dir_in(&image, "workspace", 0o1777, (base, base))?;
    // Best effort: an image whose home path leads nowhere (a dangling symlink) still runs.
    let _ = make_home(&image, &user, base);
    mount_point(&image, "proc", 0o555)?;
    mount_point(&image, "dev", 0o755)?;
    let proc_flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    rustix::mount::mount("proc", "root/proc", "proc", proc_flags, None)?;
    build_dev(setup.disk_limit_mb)?;
    pivot("root")?;
    Ok(user)
}

/// Replaces the image's `/etc/resolv.conf` in the writable layer with the runner's resolvers,
/// owned by root inside. Whatever the image has there (often a symlink into `/run`) is removed
/// first, and the new file created exclusively: nothing is followed out of the runner's root.
fn write_resolv_conf(text: &str, base: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match fs::symlink_metadata("root/etc") {
        Err(_) => make_dir("root/etc", 0o755, Some((base, base)))?,
        Ok(meta) if !meta.is_dir() => {
            // A symlink would resolve against the host's root here, before the pivot.
            return Err(io::Error::other("the image's /etc is not a directory"));
        }
        Ok(_) => {}
    }
    match fs::remove_file("root/etc/resolv.conf") {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open("root/etc/resolv.conf")?;
    file.write_all(text.as_bytes())?;
    rustix::fs::fchown(&file, Some(Uid::from_raw(base)), Some(Gid::from_raw(base)))?;
    Ok(())
}

/// The `host` image: a tmpfs directory as root with one overlay per host directory.
fn host_root(base: u32) -> io::Result<()> {
    make_dir("root", 0o755, Some((base, base)))?;
    // pivot_root needs the new root to be a mount point.
    rustix::mount::mount_bind("root", "root")?;
    for name in HOST_DIRECTORIES {
        let host = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            symlink(fs::read_link(&host)?, format!("root/{name}"))?;
        } else if meta.is_dir() {
            make_dir(&format!("upper/{name}"), 0o755, None)?;
            make_dir(&format!("work/{name}"), 0o755, None)?;
            make_dir(&format!("root/{name}"), 0o755, None)?;
            let options = format!("lowerdir=/{name},upperdir=upper/{name},workdir=work/{name}");
            overlay(&format!("root/{name}"), &options)?;
        }
    }
    Ok(())
}

/// A directory image: idmapped into the runner's ids, as the lower layer of one overlay.
fn directory_root(dir: &Path, userns: BorrowedFd<'_>) -> io::Result<()> {
    for name in ["lower", "upper/root", "work/root", "root"] {
        make_dir(name, 0o755, None)?;
    }
    let flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_RECURSIVE;
    let tree = rustix::mount::open_tree(CWD, dir, flags)?;
    // Without idmapped mounts (old kernels, file systems without support) image files show
    // as owned by nobody inside; everything else still works.
    let _ = sys::set_idmap(tree.as_fd(), userns);
    rustix::mount::move_mount(
        &tree,
        "",
        CWD,
        "lower",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    overlay(
        "root",
        "lowerdir=lower,upperdir=upper/root,workdir=work/root",
    )
}

/// Mounts an overlay; option paths are relative (the tmpfs is the working directory), so host
/// paths with `,` or `:` cannot confuse the option parser.
fn overlay(target: &str, options: &str) -> io::Result<()> {
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    Ok(rustix::mount::mount(
        "overlay",
        target,
        "overlay",
        flags,
        Some(cstr(options)?.as_c_str()),
    )?)
}

/// The minimal `/dev`: device nodes, a private devpts, `/dev/shm`, the fd links; read-only.
fn build_dev(disk_limit_mb: u64) -> io::Result<()> {
    let flags = MountFlags::NOSUID | MountFlags::NOEXEC;
    make_dir("root/dev", 0o755, None)?;
    rustix::mount::mount(
        "tmpfs",
        "root/dev",
        "tmpfs",
        flags,
        Some(c"size=64k,mode=0755"),
    )?;
    for &(name, major, minor) in DEVICES {
        let path = format!("root/dev/{name}");
        let dev = rustix::fs::makedev(major, minor);
        rustix::fs::mknodat(
            CWD,
            path.as_str(),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            dev,
        )?;
    }
    make_dir("root/dev/pts", 0o755, None)?;
    let pts_options = c"newinstance,ptmxmode=0666,mode=0620";
    rustix::mount::mount("devpts", "root/dev/pts", "devpts", flags, Some(pts_options))?;
    symlink("pts/ptmx", "root/dev/ptmx")?;
    make_dir("root/dev/shm", 0o1777, None)?;
    let shm = format!("size={}m,mode=1777", disk_limit_mb.max(1));
    rustix::mount::mount(
        "tmpfs",
        "root/dev/shm",
        "tmpfs",
        flags | MountFlags::NODEV,
        Some(cstr(&shm)?.as_c_str()),
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        symlink(target, format!("root/dev/{name}"))?;
    }
    let read_only = MountFlags::BIND | MountFlags::RDONLY | flags;
    Ok(rustix::mount::mount_remount("root/dev", read_only, "")?)
}

/// Makes `new_root` the root and detaches the old one.
fn pivot(new_root: &str) -> io::Result<()> {
    std::env::set_current_dir(new_root)?;
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    std::env::set_current_dir("/")
}

/// The image's `user` from its own `/etc/passwd` (read in-root, a regular file only), or the
/// fallback. Never uid 0: unprivileged commands must not run as root inside.
fn read_user(image: &Root) -> User {
    passwd::lookup(image, passwd::RUNNER_USER)
        .filter(|entry| entry.uid != 0 && entry.uid < 65536 && entry.gid < 65536)
        .map(|entry| User {
            uid: entry.uid,
            gid: entry.gid,
            home: entry.home,
        })
        .unwrap_or_else(User::fallback)
}

/// Creates the user's home (owned by the user, parents by root inside) unless it exists.
fn make_home(image: &Root, user: &User, base: u32) -> io::Result<()> {
    let Ok(home) = InPath::parse(user.home.as_bytes(), 4096) else {
        return Ok(());
    };
    let prefixes: Vec<InPath> = home.prefixes().collect();
    for (index, path) in prefixes.iter().enumerate() {
        let owner = match index + 1 == prefixes.len() {
            true => (base + user.uid, base + user.gid),
            false => (base, base),
        };
        make_dir_at(image, path, 0o755, owner)?;
    }
    Ok(())
}

/// Creates the directory `name` of the image root unless something is there.
fn make_dir_in(image: &Root, name: &str, mode: u32, owner: (u32, u32)) -> io::Result<()> {
    make_dir_at(image, &InPath::parse(name.as_bytes(), 4096)?, mode, owner)
}

/// Creates `path` in its in-root resolved parent with exactly `mode` and `owner` (host ids)
/// unless something exists there (an image's own symlink is left alone: it resolves inside).
fn make_dir_at(image: &Root, path: &InPath, mode: u32, owner: (u32, u32)) -> io::Result<()> {
    let Some((parent, name)) = path.split_last() else {
        return Ok(());
    };
    let dir = image.dir(&parent)?;
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(mode)) {
        Err(rustix::io::Errno::EXIST) => return Ok(()),
        other => other?,
    }
    let flags = rustix::fs::OFlags::RDONLY
        | rustix::fs::OFlags::DIRECTORY
        | rustix::fs::OFlags::NOFOLLOW
        | rustix::fs::OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&dir, name, flags, Mode::empty())?;
    rustix::fs::fchown(&fd, Some(uid(owner.0)), Some(gid(owner.1)))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// Makes `name` in the image root a plain directory to mount on: an image's symlink or file
/// there (e.g. `/dev -> /somewhere`) is replaced in the writable layer, so the mount cannot
/// be misdirected.
fn mount_point(image: &Root, name: &str, mode: u32) -> io::Result<()> {
    let name = std::ffi::OsStr::new(name);
    if kind_at(image.fd(), name)? != Some(FileType::Directory) {
        remove_all(image.fd(), name)?;
        rustix::fs::mkdirat(image.fd(), name, Mode::from_raw_mode(mode))?;
    }
    Ok(())
}

/// Creates a directory with exactly `mode` (and owner) unless something exists there.
fn make_dir(path: &str, mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    match rustix::fs::mkdir(path, Mode::from_raw_mode(mode)) {
        Err(rustix::io::Errno::EXIST) => return Ok(()),
        other => other?,
    }
    rustix::fs::chmod(path, Mode::from_raw_mode(mode))?;
    if let Some((owner_uid, owner_gid)) = owner {
        rustix::fs::chown(path, Some(uid(owner_uid)), Some(gid(owner_gid)))?;
    }
    Ok(())
}

/// Switches the (single-threaded) process to a user and group, dropping supplementary groups.
pub(super) fn become_user(user: u32, group: u32) -> io::Result<()> {
    rustix::thread::set_thread_groups(&[])?;
    rustix::thread::set_thread_res_gid(gid(group), gid(group), gid(group))?;
    rustix::thread::set_thread_res_uid(uid(user), uid(user), uid(user))?;
    Ok(())
}

fn uid(raw: u32) -> Uid {
    Uid::from_raw(raw)
}

fn gid(raw: u32) -> Gid {
    Gid::from_raw(raw)
}

fn cstr(text: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(text).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}
