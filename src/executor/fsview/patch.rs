//! `PATCH /files`: delete (like `rm -rf`, with `./*` as a glob over the workspace that keeps
//! dotfiles), then copy (like Poseidon's `tar` extraction: files 0744, `dir/` entries 01777,
//! missing parents 0755). Nothing here follows a symlink out of the root.
//!
//! Every copied file is written to a temporary file next to it, synced, and renamed over
//! it: after a failure (full disk) or a crash it holds its old or its complete new content,
//! never a part. Each file's own data is synced (not the whole file system, whose other
//! writers would make a copy's time unpredictable).

use std::{
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::{Root, clean, split_parent};
use crate::{
    error::{Error, Result},
    executor::{FileEntry, FileUpdate},
};

/// Deeper trees are not removed entirely (each level holds a descriptor).
const MAX_DEPTH: usize = 128;
/// Mode of copied files: `rwxr--r--`.
const FILE_MODE: u32 = 0o744;
/// Mode of directories named in the request: `rwxrwxrwt`.
const DIRECTORY_MODE: u32 = 0o1777;
/// Mode of parent directories created on the way.
const PARENT_MODE: u32 = 0o755;

pub(super) fn apply(root: &Root, update: &FileUpdate) -> Result<()> {
    for path in &update.delete {
        delete(root, path);
    }
    let mut failures: Vec<String> = Vec::new();
    for entry in &update.copy {
        let result = if entry.path.ends_with('/') {
            make_directory(root, entry)
        } else {
            copy_file(root, entry)
        };
        if let Err(err) = result {
            failures.push(format!("{}: {err}", entry.path));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::FileCopy(failures.join("; ")))
    }
}

/// Marks the temporary files of copies; what a crash left behind is removed by
/// [`remove_partial_files`].
pub const PARTIAL_SUFFIX: &str = ".poseidon-partial";

/// Creates a directory of the request.
fn make_directory(root: &Root, entry: &FileEntry) -> io::Result<()> {
    let view = clean(&root.view_path(&entry.path));
    let dir = make_dirs(root, &view)?;
    // The walk yields O_PATH descriptors, which cannot be chmod-ed; reopen the directory.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let dir = rustix::fs::openat(&dir, ".", flags, Mode::empty())?;
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(DIRECTORY_MODE)).map_err(Into::into)
}

/// Writes a file of the request under a temporary name in its directory, syncs it and
/// renames it over the destination; on failure nothing is left behind.
fn copy_file(root: &Root, entry: &FileEntry) -> io::Result<()> {
    let view = clean(&root.view_path(&entry.path));
    let (parent, name) =
        split_parent(&view).ok_or_else(|| cannot_open(rustix::io::Errno::ISDIR))?;
    let parent = make_dirs(root, parent)?;
    // A directory is not replaced by a file (tar refuses as well); a symlink is replaced,
    // not followed.
    if let Ok(stat) = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
        && FileType::from_raw_mode(stat.st_mode) == FileType::Directory
    {
        return Err(cannot_open(rustix::io::Errno::ISDIR));
    }
    let temporary = format!(".{}{PARTIAL_SUFFIX}", uuid::Uuid::new_v4().simple());
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&parent, &temporary, flags, Mode::from_raw_mode(FILE_MODE))
        .map_err(cannot_open)?;
    let written = rustix::fs::fchmod(&fd, Mode::from_raw_mode(FILE_MODE))
        .map_err(io::Error::from)
        .and_then(|()| {
            let mut file = std::fs::File::from(fd);
            file.write_all(&entry.content)?;
            file.sync_data()
        })
        .and_then(|()| {
            rustix::fs::renameat(&parent, &temporary, &parent, name).map_err(cannot_open)
        });
    if written.is_err() {
        let _ = rustix::fs::unlinkat(&parent, &temporary, AtFlags::empty());
    }
    written
}

/// Removes the temporary files of copies a crash interrupted, anywhere below `dir` (not
/// following symlinks).
pub fn remove_partial_files(dir: &std::path::Path) {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if let Ok(dir) = rustix::fs::open(dir, flags, Mode::empty()) {
        remove_partial_below(&dir, 0);
    }
}

fn remove_partial_below(dir: &OwnedFd, depth: usize) {
    for name in entry_names(dir) {
        let Ok(stat) = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory if depth < MAX_DEPTH => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                if let Ok(child) = rustix::fs::openat(dir, name.as_slice(), flags, Mode::empty()) {
                    remove_partial_below(&child, depth + 1);
                }
            }
            FileType::RegularFile if name.ends_with(PARTIAL_SUFFIX.as_bytes()) => {
                let _ = rustix::fs::unlinkat(dir, name.as_slice(), AtFlags::empty());
            }
            _ => {}
        }
    }
}

/// Removes a path recursively; like `rm --force`, failures are ignored.
fn delete(root: &Root, path: &str) {
    if path == "./*" {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY;
        if let Ok(workspace) = root.open_to_change(&root.view_path(""), flags) {
            for name in entry_names(&workspace)
                .into_iter()
                .filter(|name| !name.starts_with(b"."))
            {
                remove_tree(&workspace, &name, 0);
            }
        }
        return;
    }
    let view = clean(&root.view_path(path));
    // Like rm, refuse to remove the root itself.
    let Some((parent, name)) = split_parent(&view) else {
        return;
    };
    if let Ok(parent) = root.open_to_change(parent, OFlags::PATH | OFlags::DIRECTORY) {
        remove_tree(&parent, name.as_bytes(), 0);
    }
}

fn entry_names(dir: &impl AsFd) -> Vec<Vec<u8>> {
    let Ok(mut iter) = Dir::read_from(dir) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    while let Some(Ok(entry)) = iter.read() {
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names
}

/// Removes `name` in `parent` and, for a directory, everything below it; never follows links.
fn remove_tree(parent: &impl AsFd, name: &[u8], depth: usize) {
    let Ok(stat) = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) else {
        return;
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        let _ = rustix::fs::unlinkat(parent, name, AtFlags::empty());
        return;
    }
    if depth < MAX_DEPTH {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if let Ok(dir) = rustix::fs::openat(parent, name, flags, Mode::empty()) {
            for child in entry_names(&dir) {
                remove_tree(&dir, &child, depth + 1);
            }
        }
    }
    let _ = rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR);
}

/// `mkdir -p` inside the root; returns the final directory.
fn make_dirs(root: &Root, view: &str) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY;
    let mut current = root.open_to_change("/", flags)?;
    let mut walked = String::new();
    for part in view.split('/').filter(|part| !part.is_empty()) {
        walked.push('/');
        walked.push_str(part);
        current = match root.open_to_change(&walked, flags) {
            Ok(dir) => dir,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                match rustix::fs::mkdirat(&current, part, Mode::from_raw_mode(PARENT_MODE)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(errno) => return Err(cannot_mkdir(errno)),
                }
                root.open_to_change(&walked, flags)?
            }
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                return Err(io::Error::other("Cannot open: a symbolic link in the path"));
            }
            Err(err) => return Err(err),
        };
    }
    Ok(current)
}

fn cannot_open(errno: rustix::io::Errno) -> io::Error {
    io::Error::other(format!("Cannot open: {}", describe(errno)))
}

fn cannot_mkdir(errno: rustix::io::Errno) -> io::Error {
    io::Error::other(format!("Cannot mkdir: {}", describe(errno)))
}

/// The error's text without the `(os error N)` suffix.
fn describe(errno: rustix::io::Errno) -> String {
    let text = io::Error::from(errno).to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}
