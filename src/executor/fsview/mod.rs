//! File operations as a runner sees its file system: every path is resolved inside a root
//! directory with `openat2(RESOLVE_IN_ROOT)`, so neither `..` nor a symlink planted by learner
//! code can lead outside it. Used in-process by the process executor (root = the workspace) and
//! inside the sandbox by its agent (root = `/`, permissions of the runner's user).

mod list;
mod names;
mod patch;

use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use rustix::fs::{Mode, OFlags, ResolveFlags};

pub use list::Listing;
pub use names::{Names, PasswdEntry, parse_passwd};
pub use patch::{PARTIAL_SUFFIX, remove_partial_files};

use crate::{
    error::{Error, Result},
    executor::FileContent,
};

/// Files reported with size 0 (as `/proc` files are) are read into memory up to this size so
/// that the download carries their real content and length.
const ZERO_SIZE_READ_LIMIT: u64 = 1 << 20;

/// Where user and group names for listings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameSource {
    /// `/etc/passwd` and `/etc/group` inside the root.
    InRoot,
    /// The host's `/etc/passwd` and `/etc/group`.
    Host,
}

/// A runner's file system view.
#[derive(Debug)]
pub struct Root {
    dir: OwnedFd,
    workspace: String,
    names: NameSource,
}

impl Root {
    /// Opens `root` as the view's `/`; relative request paths resolve against `workspace`, an
    /// absolute path inside the view.
    pub fn open(root: &Path, workspace: &str, names: NameSource) -> io::Result<Root> {
        let dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Root {
            dir,
            workspace: workspace.trim_end_matches('/').to_owned(),
            names,
        })
    }

    /// The path inside the view that a request path denotes.
    fn view_path(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_owned()
        } else if path.is_empty() {
            format!("{}/", self.workspace)
        } else {
            format!("{}/{path}", self.workspace)
        }
    }

    /// Opens a view path; symlinks are followed but cannot leave the root.
    fn open_at(&self, view_path: &str, flags: OFlags) -> io::Result<OwnedFd> {
        resolve(&self.dir, view_path, flags)
    }

    /// Opens a view path to change what is below it (write, create, delete). Inside the
    /// workspace no symlink is followed at all: learner code plants them there, and changes
    /// are made as root inside the runner, which could otherwise be led to write into
    /// directories the learner may not (its own view stays confined either way).
    fn open_to_change(&self, view_path: &str, flags: OFlags) -> io::Result<OwnedFd> {
        let workspace = &self.workspace;
        let inside = workspace.is_empty()
            || view_path == workspace
            || view_path
                .strip_prefix(workspace.as_str())
                .is_some_and(|rest| rest.starts_with('/'));
        if !inside {
            return self.open_at(view_path, flags);
        }
        let strict = ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS;
        open_resolved(&self.dir, view_path, flags, strict)
    }

    fn names(&self) -> Names {
        match self.names {
            NameSource::Host => Names::load_host(),
            NameSource::InRoot => Names::load_in(&self.dir),
        }
    }

    /// Starts listing `path` like `ls -l [--recursive]`; missing or unreadable is 424.
    pub fn list(&self, path: &str, recursive: bool) -> Result<Listing> {
        Listing::start(self, path, recursive)
    }

    /// Opens a regular file for download; anything else, missing or unreadable, is 424.
    pub fn open_file(&self, path: &str) -> Result<FileContent> {
        let not_found = || Error::FileNotFound(path.to_owned());
        let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = self
            .open_at(&self.view_path(path), flags)
            .map_err(|_| not_found())?;
        let stat = rustix::fs::fstat(&fd).map_err(|_| not_found())?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(not_found());
        }
        let mut file = File::from(fd);
        let length = u64::try_from(stat.st_size).unwrap_or(0);
        if length > 0 {
            return Ok(FileContent {
                length,
                reader: Box::new(file.take(length)),
            });
        }
        // Pseudo files report size 0 but have content: read it to know the length.
        let mut content = Vec::new();
        (&mut file)
            .take(ZERO_SIZE_READ_LIMIT)
            .read_to_end(&mut content)
            .map_err(|_| not_found())?;
        Ok(FileContent {
            length: content.len() as u64,
            reader: Box::new(io::Cursor::new(content)),
        })
    }

    /// Deletes, then copies, as the calling user (root inside a runner). Every entry is tried;
    /// failures are collected into one [`Error::FileCopy`].
    pub fn apply(&self, update: &crate::executor::FileUpdate) -> Result<()> {
        patch::apply(self, update)
    }
}

/// Resolves `path` below `root` (absolute paths start at `root`), following symlinks only
/// within it and never through `/proc` magic links.
fn resolve(root: &impl AsFd, path: &str, flags: OFlags) -> io::Result<OwnedFd> {
    open_resolved(
        root,
        path,
        flags,
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

fn open_resolved(
    root: &impl AsFd,
    path: &str,
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC;
    loop {
        match rustix::fs::openat2(root, path, flags, Mode::empty(), resolve) {
            // The kernel asks for a retry when a rename raced with the lookup.
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => continue,
            Ok(fd) => return outside_proc(fd),
            Err(err) => return Err(err.into()),
        }
    }
}

/// Refuses what lies in a `/proc` file system: it describes the process doing the file
/// operation (in a sandbox the agent: its `maps` show the host binary's path and address
/// layout), not the runner's files. Checked on the opened file, so no path or symlink leads
/// around it.
pub(crate) fn outside_proc(fd: OwnedFd) -> io::Result<OwnedFd> {
    match rustix::fs::fstatfs(&fd) {
        Ok(fs) if fs.f_type == rustix::fs::PROC_SUPER_MAGIC => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the file API does not serve /proc",
        )),
        Ok(_) => Ok(fd),
        Err(err) => Err(err.into()),
    }
}

/// Lexically cleans a view path like Go's `path.Clean` (the path stays absolute).
pub(crate) fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Splits a cleaned absolute path into its parent and final component; `None` for `/`.
pub(crate) fn split_parent(path: &str) -> Option<(&str, &str)> {
    let (parent, name) = path.rsplit_once('/')?;
    if name.is_empty() {
        return None;
    }
    Some((if parent.is_empty() { "/" } else { parent }, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_never_climbs_above_the_root() {
        assert_eq!(clean("/workspace/../../etc/passwd"), "/etc/passwd");
        assert_eq!(clean("/workspace/./a//b/"), "/workspace/a/b");
        assert_eq!(clean("/"), "/");
    }

    #[test]
    fn split_parent_names_the_last_component() {
        assert_eq!(split_parent("/workspace/a"), Some(("/workspace", "a")));
        assert_eq!(split_parent("/a"), Some(("/", "a")));
        assert_eq!(split_parent("/"), None);
    }
}
