//! Applying layers (untrusted tar streams) to an image's root directory, as Docker, containerd
//! and umoci do, but with every path resolved inside the root: `..` refused, symlinks followed
//! only in-root, existing entries unlinked and recreated (never written through), metadata set
//! through the new descriptor, whiteouts and opaque directories honoured, device nodes skipped,
//! and hard bounds on size, entries, path length and extension headers.

use std::{
    collections::HashSet,
    ffi::OsStr,
    io::{self, Read},
    os::{fd::AsFd, unix::ffi::OsStrExt},
};

use rustix::fs::{self, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use tar::EntryType;

use super::{
    digest::{Digest, Hashing, verify},
    inroot::{InPath, Root, children, kind_at, remove_all},
    stream::{HeaderGuard, decompressed},
};
use crate::error::{Error, Result};

/// Bounds on what unpacking an image may consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Total uncompressed bytes of all layers of one image.
    pub max_unpacked_bytes: u64,
    /// Total tar entries of all layers of one image.
    pub max_entries: u64,
    /// Longest entry path or link target, in bytes.
    pub max_path: usize,
    /// Largest tar extension header (PAX, GNU long name or link), in bytes.
    pub max_header: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 32 << 30,
            max_entries: 4_000_000,
            max_path: 4096,
            max_header: 1 << 20,
        }
    }
}

/// The highest uid/gid kept; higher ones become `nobody` (65534), since runners map 65536 ids.
const MAX_ID: u64 = 65535;
const NOBODY: u32 = 65534;

/// Applies layers, in order, to one root, counting against the image's limits.
#[derive(Debug)]
pub struct Unpacker<'a> {
    root: &'a Root,
    limits: &'a Limits,
    bytes: u64,
    entries: u64,
    /// Device nodes skipped (the sandbox brings its own /dev).
    pub skipped_devices: u64,
}

/// One layer's in-progress state.
#[derive(Default)]
struct Layer {
    /// Paths this layer created (with their ancestors): whiteouts never hide them.
    touched: HashSet<InPath>,
    /// Directory modification times, set once the layer's children are in place.
    dir_times: Vec<(InPath, u64)>,
}

impl<'a> Unpacker<'a> {
    /// An unpacker for `root`, which must be an empty directory owned by the server.
    pub fn new(root: &'a Root, limits: &'a Limits) -> Self {
        Unpacker {
            root,
            limits,
            bytes: 0,
            entries: 0,
            skipped_devices: 0,
        }
    }

    /// Uncompressed bytes applied so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Applies the layer read from `blob` (compressed or not) and checks that its uncompressed
    /// digest is `diff_id`. `what` names the layer in errors.
    pub fn apply(&mut self, blob: impl Read, diff_id: &Digest, what: &str) -> Result<()> {
        let fail = |e: io::Error| Error::Image(format!("{what}: {e}"));
        let budget = self.limits.max_unpacked_bytes.saturating_sub(self.bytes);
        let mut hashing = Hashing::new(
            decompressed(blob).map_err(fail)?,
            budget,
            "unpacked image size",
        );
        let mut layer = Layer::default();
        {
            let mut archive =
                tar::Archive::new(HeaderGuard::new(&mut hashing, self.limits.max_header));
            for entry in archive.entries().map_err(fail)? {
                let mut entry = entry.map_err(fail)?;
                self.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(Error::Image(format!(
                        "{what}: the image has more than {} entries",
                        self.limits.max_entries
                    )));
                }
                self.entry(&mut entry, &mut layer).map_err(fail)?;
            }
        }
        let (actual, n) = hashing.finish().map_err(fail)?;
        self.bytes += n;
        verify(&format!("{what} (uncompressed)"), diff_id, &actual)?;
        for (path, mtime) in layer.dir_times {
            if let Ok(fd) = self.root.open_at(
                &path,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW,
                Mode::empty(),
            ) {
                fs::futimens(&fd, &times(mtime)).ok();
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        entry: &mut tar::Entry<'_, impl Read>,
        layer: &mut Layer,
    ) -> io::Result<()> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            return Ok(());
        }
        let path = InPath::parse(&entry.path_bytes(), self.limits.max_path)?;
        let Some((parent, name)) = path.split_last() else {
            return if kind == EntryType::Directory {
                Ok(())
            } else {
                Err(bad("the root entry is not a directory".into()))
            };
        };
        if let Some(target) = name.as_bytes().strip_prefix(b".wh.") {
            return self.whiteout(&parent, target, layer);
        }
        match kind {
            EntryType::Char | EntryType::Block => {
                self.skipped_devices += 1;
                log::debug!("skipping device node {}", path.display());
                return Ok(());
            }
            EntryType::Directory
            | EntryType::Regular
            | EntryType::Continuous
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo => {}
            other => {
                return Err(bad(format!(
                    "unsupported tar entry type {other:?} at {}",
                    path.display()
                )));
            }
        }
        layer.touched.extend(path.prefixes());
        let header = entry.header();
        let (uid, gid) = (
            fs::Uid::from_raw(id(header.uid()?)),
            fs::Gid::from_raw(id(header.gid()?)),
        );
        let mode = Mode::from_raw_mode(header.mode()? & 0o7777);
        let mtime = header.mtime()?;
        let dir = self.root.mkdir_all(&parent)?;
        match kind {
            EntryType::Directory => {
                if kind_at(&dir, name)? != Some(FileType::Directory) {
                    remove_all(&dir, name)?;
                    fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))?;
                }
                let fd = fs::openat(
                    &dir,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                owner_and_mode(&fd, uid, gid, mode)?;
                layer.dir_times.push((path, mtime));
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_all(&dir, name)?;
                let fd = fs::openat(
                    &dir,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                let mut file = std::fs::File::from(fd);
                io::copy(entry, &mut file)?;
                owner_and_mode(&file, uid, gid, mode)?;
                capability(entry, &file)?;
                fs::futimens(&file, &times(mtime))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("symlink without target".into()))?;
                if target.len() > self.limits.max_path || target.contains(&0) {
                    return Err(bad(format!("symlink target of {} bytes", target.len())));
                }
                remove_all(&dir, name)?;
                fs::symlinkat(OsStr::from_bytes(&target), &dir, name)?;
                fs::chownat(&dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
                fs::utimensat(&dir, name, &times(mtime), AtFlags::SYMLINK_NOFOLLOW)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("hard link without target".into()))?;
                let target = InPath::parse(&target, self.limits.max_path)?;
                let (target_parent, target_name) = target
                    .split_last()
                    .ok_or_else(|| bad("hard link to the root".into()))?;
                let target_dir = self.root.dir(&target_parent)?;
                if kind_at(&target_dir, target_name)? == Some(FileType::Directory) {
                    return Err(bad(format!(
                        "hard link to the directory {}",
                        target.display()
                    )));
                }
                remove_all(&dir, name)?;
                fs::linkat(&target_dir, target_name, &dir, name, AtFlags::empty())?;
            }
            EntryType::Fifo => {
                remove_all(&dir, name)?;
                fs::mknodat(&dir, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)?;
                let fd = fs::openat(
                    &dir,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                fs::chownat(&fd, "", Some(uid), Some(gid), AtFlags::EMPTY_PATH)?;
                fs::chmodat(&dir, name, mode, AtFlags::empty())?;
            }
            _ => unreachable!("entry types are checked above"),
        }
        Ok(())
    }

    /// `.wh..wh..opq` makes `parent` opaque; `.wh.<name>` deletes `<name>` from lower layers.
    fn whiteout(&self, parent: &InPath, target: &[u8], layer: &mut Layer) -> io::Result<()> {
        if target == b".wh..opq" {
            layer.touched.extend(parent.prefixes());
            let dir = self.root.mkdir_all(parent)?;
            return self.clear_lower(&dir, parent, layer);
        }
        if target.starts_with(b".wh.") {
            return Ok(()); // AUFS metadata (.wh..wh.plnk and friends)
        }
        if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') {
            return Err(bad(format!(
                "invalid whiteout {:?} in {}",
                String::from_utf8_lossy(target),
                parent.display()
            )));
        }
        let name = OsStr::from_bytes(target);
        let path = parent.join(name);
        let dir = match self.root.dir(parent) {
            Ok(dir) => dir,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if !layer.touched.contains(&path) {
            return remove_all(&dir, name);
        }
        // This layer created the path itself: only what lower layers had below it goes.
        if kind_at(&dir, name)? == Some(FileType::Directory) {
            let sub = fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            self.clear_lower(&sub, &path, layer)?;
        }
        Ok(())
    }

    /// Removes the children of `dir` (at `path`) that this layer did not create.
    fn clear_lower(&self, dir: &impl AsFd, path: &InPath, layer: &Layer) -> io::Result<()> {
        for child in children(dir)? {
            if !layer.touched.contains(&path.join(&child)) {
                remove_all(dir, &child)?;
            }
        }
        Ok(())
    }
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn id(raw: u64) -> u32 {
    if raw > MAX_ID { NOBODY } else { raw as u32 }
}

fn times(mtime: u64) -> Timestamps {
    let at = Timespec {
        tv_sec: mtime.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: at,
        last_modification: at,
    }
}

/// Owner first, then mode: chown clears the setuid and setgid bits.
fn owner_and_mode(fd: &impl AsFd, uid: fs::Uid, gid: fs::Gid, mode: Mode) -> io::Result<()> {
    fs::fchown(fd, Some(uid), Some(gid))?;
    fs::fchmod(fd, mode)?;
    Ok(())
}

/// Keeps the one extended attribute images need (file capabilities, e.g. Ubuntu's `ping`);
/// overlay, SELinux and other attributes are dropped.
fn capability(entry: &mut tar::Entry<'_, impl Read>, fd: &impl AsFd) -> io::Result<()> {
    let Some(extensions) = entry.pax_extensions()? else {
        return Ok(());
    };
    for extension in extensions {
        let extension = extension?;
        if extension.key_bytes() == b"SCHILY.xattr.security.capability" {
            fs::fsetxattr(
                fd,
                "security.capability",
                extension.value_bytes(),
                XattrFlags::empty(),
            )?;
        }
    }
    Ok(())
}
