//! File system operations confined to a root directory: every path is resolved with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..` and symlinks (absolute or
//! relative) stay inside the root, and the final component is always handled relative to its
//! resolved parent's descriptor without following it.

use std::{
    ffi::{OsStr, OsString},
    io,
    os::{
        fd::{AsFd, OwnedFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    path::Path,
};

use rustix::fs::{self, AtFlags, Mode, OFlags, ResolveFlags};

/// An open root directory.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

/// A path inside a root, as validated components (never empty, `.` or `..`, no `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InPath(Vec<OsString>);

impl InPath {
    /// Splits `bytes` on `/`, dropping empty and `.` components; `..` is refused (legitimate
    /// images never contain it).
    pub fn parse(bytes: &[u8], max_len: usize) -> io::Result<InPath> {
        if bytes.len() > max_len {
            return Err(invalid(format!(
                "path of {} bytes exceeds the limit of {max_len}",
                bytes.len()
            )));
        }
        if bytes.contains(&0) {
            return Err(invalid("path contains a NUL byte".into()));
        }
        let mut parts = Vec::new();
        for part in bytes.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    return Err(invalid(format!(
                        "path {:?} contains ..",
                        String::from_utf8_lossy(bytes)
                    )));
                }
                name => parts.push(OsStr::from_bytes(name).to_owned()),
            }
        }
        Ok(InPath(parts))
    }

    /// The root itself.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent and the last component (`None` for the root).
    pub fn split_last(&self) -> Option<(InPath, &OsStr)> {
        let (last, parent) = self.0.split_last()?;
        Some((InPath(parent.to_vec()), last))
    }

    /// This path with `name` appended.
    pub fn join(&self, name: &OsStr) -> InPath {
        let mut parts = self.0.clone();
        parts.push(name.to_owned());
        InPath(parts)
    }

    /// Every ancestor and the path itself, shortest first.
    pub fn prefixes(&self) -> impl Iterator<Item = InPath> + '_ {
        (1..=self.0.len()).map(|n| InPath(self.0[..n].to_vec()))
    }

    /// The relative path string handed to `openat2` (`.` for the root).
    fn relative(&self) -> OsString {
        if self.0.is_empty() {
            return ".".into();
        }
        let mut out = Vec::new();
        for (i, part) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(part.as_bytes());
        }
        OsString::from_vec(out)
    }

    /// For messages.
    pub fn display(&self) -> String {
        format!(
            "/{}",
            String::from_utf8_lossy(self.relative().as_bytes()).trim_start_matches('.')
        )
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

impl Root {
    /// Opens `dir` (a host path the server itself chose) as a root.
    pub fn open(dir: &Path) -> io::Result<Root> {
        let fd = fs::open(
            dir,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )?;
        Ok(Root { fd })
    }

    /// The root's own descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Opens `path` resolved inside the root with `flags` (symlinks followed in-root; add
    /// `OFlags::NOFOLLOW` to refuse one at the last component).
    pub fn open_at(&self, path: &InPath, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        Ok(fs::openat2(
            &self.fd,
            path.relative(),
            flags | OFlags::CLOEXEC,
            mode,
            RESOLVE,
        )?)
    }

    /// The directory `path` resolved in-root, as an `O_PATH` descriptor for `*at` calls.
    pub fn dir(&self, path: &InPath) -> io::Result<OwnedFd> {
        self.open_at(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
    }

    /// Like `mkdir -p` inside the root: missing directories are created (0755, owned by the
    /// server) in their in-root resolved parent. Returns the directory.
    pub fn mkdir_all(&self, path: &InPath) -> io::Result<OwnedFd> {
        match self.dir(path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            other => return other,
        }
        let mut parent = self.dir(&InPath(Vec::new()))?;
        for prefix in path.prefixes() {
            match self.dir(&prefix) {
                Ok(fd) => parent = fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let (_, name) = prefix.split_last().expect("prefixes are not empty");
                    fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755))?;
                    parent = self.dir(&prefix)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(parent)
    }

    /// Reads a regular file (never a symlink at the last component, a FIFO or a device) of at
    /// most `max` bytes.
    pub fn read_small(&self, path: &InPath, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let fd = self.open_at(
            path,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK,
            Mode::empty(),
        )?;
        let stat = fs::fstat(&fd)?;
        if fs::FileType::from_raw_mode(stat.st_mode) != fs::FileType::RegularFile {
            return Err(invalid(format!("{} is not a regular file", path.display())));
        }
        if stat.st_size as u64 > max {
            return Err(invalid(format!(
                "{} is larger than {max} bytes",
                path.display()
            )));
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd).take(max).read_to_end(&mut bytes)?;
        Ok(bytes)
    }
}

/// What is at `name` in `dir`, without following a symlink (`None` if nothing).
pub fn kind_at(dir: impl AsFd, name: &OsStr) -> io::Result<Option<fs::FileType>> {
    match fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(fs::FileType::from_raw_mode(stat.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir` and, if it is a directory, everything below it, never following
/// a symlink.
pub fn remove_all(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let dir = dir.as_fd();
    match kind_at(dir, name)? {
        None => Ok(()),
        Some(fs::FileType::Directory) => {
            let child = fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for entry in children(&child)? {
                remove_all(&child, &entry)?;
            }
            Ok(fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(fs::unlinkat(dir, name, AtFlags::empty())?),
    }
}

/// The names in an open directory (without `.` and `..`).
pub fn children(dir: impl AsFd) -> io::Result<Vec<OsString>> {
    let fd = fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_split_and_dotdot_refused() {
        let p = InPath::parse(b"./usr//lib/./x", 4096).unwrap();
        assert_eq!(p.display(), "/usr/lib/x");
        assert!(InPath::parse(b"/", 4096).unwrap().is_root());
        assert!(InPath::parse(b"a/../../b", 4096).is_err());
        assert!(InPath::parse(&[b'a'; 5000], 4096).is_err());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root_dir = tmp.path().join("root");
        std::fs::create_dir(&root_dir).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root_dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../outside", root_dir.join("rel")).unwrap();
        let root = Root::open(&root_dir).unwrap();
        for link in ["abs/x/y", "rel/x/y"] {
            root.mkdir_all(&InPath::parse(link.as_bytes(), 4096).unwrap())
                .unwrap_err();
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }
}
