//! Directory listings in Poseidon's format, which mirrors `ls -l --time-style=+%s -1 --literal
//! [--recursive]`: hidden entries are skipped, entries are sorted by name, a recursive listing
//! names entries `<path>/<entry>`, a flat one bare names, a single file the path as given.

use std::{
    ffi::CStr,
    io::{self, BufWriter, Write},
    os::fd::{AsFd, OwnedFd},
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};
use serde::Serialize;

use super::{Names, Root};
use crate::error::{Error, Result};

/// Deeper directories are not descended into (each level holds a descriptor).
const MAX_DEPTH: usize = 128;

/// One entry of a listing, serialized exactly as Poseidon does (field order included).
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    #[serde(rename = "entryType")]
    entry_type: String,
    #[serde(rename = "linkTarget", skip_serializing_if = "Option::is_none")]
    link_target: Option<String>,
    size: i64,
    #[serde(rename = "modificationTime")]
    modification_time: i64,
    permissions: String,
    owner: String,
    group: String,
}

#[derive(Debug)]
enum Start {
    Single(Entry),
    Directory {
        dir: OwnedFd,
        prefix: Option<String>,
    },
}

/// A listing whose start path exists and is readable; writing it streams the JSON body.
#[derive(Debug)]
pub struct Listing {
    names: Names,
    start: Start,
}

impl Listing {
    pub(super) fn start(root: &Root, path: &str, recursive: bool) -> Result<Listing> {
        let display = if path.is_empty() { "./" } else { path };
        let not_found = || Error::FileNotFound(display.to_owned());
        // O_NOFOLLOW lists a symlink itself, like `ls -l`; a trailing slash still follows it.
        let fd = root
            .open_at(&root.view_path(display), OFlags::PATH | OFlags::NOFOLLOW)
            .map_err(|_| not_found())?;
        let stat = rustix::fs::fstat(&fd).map_err(|_| not_found())?;
        let names = root.names();
        let start = if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
            let dir = rustix::fs::openat(
                &fd,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|_| not_found())?;
            let prefix = recursive.then(|| format!("{}/", display.trim_end_matches('/')));
            Start::Directory { dir, prefix }
        } else {
            let target = rustix::fs::readlinkat(&fd, "", Vec::new())
                .ok()
                .map(|t| t.into_bytes());
            let entry = entry(&names, display.to_owned(), &stat, target.as_deref())
                .ok_or_else(not_found)?;
            Start::Single(entry)
        };
        Ok(Listing { names, start })
    }

    /// Writes `{"files": [...]}` to `out`.
    pub fn write_json(self, out: impl Write) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(64 << 10, out);
        out.write_all(br#"{"files": ["#)?;
        let mut writer = EntryWriter {
            out: &mut out,
            first: true,
            names: &self.names,
        };
        match self.start {
            Start::Single(entry) => writer.write(&entry)?,
            Start::Directory { dir, prefix: None } => {
                for (name, stat, target) in read_entries(&dir) {
                    if let Some(entry) = entry(&self.names, name, &stat, target.as_deref()) {
                        writer.write(&entry)?;
                    }
                }
            }
            Start::Directory {
                dir,
                prefix: Some(prefix),
            } => writer.walk(&dir, &prefix, 0)?,
        }
        out.write_all(b"]}")?;
        out.flush()
    }
}

struct EntryWriter<'a, W: Write> {
    out: &'a mut W,
    first: bool,
    names: &'a Names,
}

impl<W: Write> EntryWriter<'_, W> {
    fn write(&mut self, entry: &Entry) -> io::Result<()> {
        if !std::mem::take(&mut self.first) {
            self.out.write_all(b",")?;
        }
        serde_json::to_writer(&mut *self.out, entry).map_err(io::Error::other)
    }

    /// Lists a directory, then descends into its subdirectories in order, like `ls -R`.
    fn walk(&mut self, dir: &OwnedFd, prefix: &str, depth: usize) -> io::Result<()> {
        let entries = read_entries(dir);
        let mut subdirs = Vec::new();
        for (name, stat, target) in entries {
            let full = format!("{prefix}{name}");
            if FileType::from_raw_mode(stat.st_mode) == FileType::Directory {
                subdirs.push(name);
            }
            if let Some(entry) = entry(self.names, full, &stat, target.as_deref()) {
                self.write(&entry)?;
            }
        }
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for name in subdirs {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            // Unreadable subdirectories are skipped, as `ls -R` reports and skips them.
            let sub = rustix::fs::openat(dir, name.as_str(), flags, Mode::empty());
            // `/proc` is listed as a directory but never entered (see `outside_proc`).
            if let Ok(sub) = sub.map_err(io::Error::from).and_then(super::outside_proc) {
                self.walk(&sub, &format!("{prefix}{name}/"), depth + 1)?;
            }
        }
        Ok(())
    }
}

/// The visible entries of a directory, sorted by name, with their metadata and link targets.
fn read_entries(dir: &impl AsFd) -> Vec<(String, Stat, Option<Vec<u8>>)> {
    let Ok(mut iter) = Dir::read_from(dir) else {
        return Vec::new();
    };
    let mut names: Vec<Vec<u8>> = Vec::new();
    while let Some(Ok(entry)) = iter.read() {
        let name: &CStr = entry.file_name();
        if !name.to_bytes().starts_with(b".") {
            names.push(name.to_bytes().to_vec());
        }
    }
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let stat = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
            let target = (FileType::from_raw_mode(stat.st_mode) == FileType::Symlink)
                .then(|| rustix::fs::readlinkat(dir, name.as_slice(), Vec::new()).ok())
                .flatten()
                .map(|target| target.into_bytes());
            Some((String::from_utf8_lossy(&name).into_owned(), stat, target))
        })
        .collect()
}

/// Builds an entry; devices are left out, as Poseidon's `ls` parser skips them.
fn entry(names: &Names, name: String, stat: &Stat, target: Option<&[u8]>) -> Option<Entry> {
    let entry_type = match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        _ => return None,
    };
    let link_target = match entry_type {
        'l' => target.map(|target| String::from_utf8_lossy(target).into_owned()),
        _ => None,
    };
    Some(Entry {
        name,
        entry_type: entry_type.to_string(),
        link_target,
        size: stat.st_size,
        modification_time: stat.st_mtime,
        permissions: permissions(stat.st_mode),
        owner: names.user(stat.st_uid),
        group: names.group(stat.st_gid),
    })
}

/// `rwxr-xr-x`-style permissions, with setuid/setgid (`s`/`S`) and sticky (`t`/`T`) bits.
pub(crate) fn permissions(mode: u32) -> String {
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    let special = |exec: bool, special: bool, lower: char, upper: char| match (exec, special) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    let mut text = String::with_capacity(9);
    text.push(bit(0o400, 'r'));
    text.push(bit(0o200, 'w'));
    text.push(special(mode & 0o100 != 0, mode & 0o4000 != 0, 's', 'S'));
    text.push(bit(0o040, 'r'));
    text.push(bit(0o020, 'w'));
    text.push(special(mode & 0o010 != 0, mode & 0o2000 != 0, 's', 'S'));
    text.push(bit(0o004, 'r'));
    text.push(bit(0o002, 'w'));
    text.push(special(mode & 0o001 != 0, mode & 0o1000 != 0, 't', 'T'));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_render_like_ls() {
        assert_eq!(permissions(0o744), "rwxr--r--");
        assert_eq!(permissions(0o1777), "rwxrwxrwt");
        assert_eq!(permissions(0o1776), "rwxrwxrwT");
        assert_eq!(permissions(0o4755), "rwsr-xr-x");
        assert_eq!(permissions(0o2645), "rw-r-Sr-x");
    }
}
