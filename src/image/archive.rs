//! Image archives as files: an OCI image layout as a directory, or a tar (optionally gzip or
//! zstd compressed, or on stdin) indexed once so that blobs are read by seeking, with links
//! inside the archive resolved (podman's `docker save` archives link `<id>/layer.tar` to
//! `../<diff id>.tar`).

use std::{
    collections::HashMap,
    fs::File,
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use super::stream::{HeaderGuard, decompressed, is_compressed};
use crate::error::{Error, Result};

/// Most members an image archive may hold (blobs and metadata, not layer contents).
const MAX_MEMBERS: usize = 100_000;

/// Where an image archive's files are.
#[derive(Debug)]
pub enum Archive {
    /// A directory (an OCI image layout).
    Dir(PathBuf),
    /// An uncompressed tar file and its index.
    Tar {
        /// The tar file (the input itself, or a spooled copy).
        file: File,
        /// Member name → where its data is.
        members: HashMap<String, Member>,
    },
}

/// A member of a tar archive.
#[derive(Debug, Clone)]
pub enum Member {
    /// A regular file: data offset and size.
    File(u64, u64),
    /// A symbolic or hard link to another member.
    Link(String),
}

impl Archive {
    /// Opens `input`: a directory, a tar file (compressed or not), or `-` for stdin. Compressed
    /// files and stdin are first copied into `spool` (a path in the store's staging area).
    pub fn open(input: &Path, spool: &Path, max_header: u64, max_spool: u64) -> Result<Archive> {
        if input.is_dir() {
            return Ok(Archive::Dir(input.to_owned()));
        }
        let reader: Box<dyn Read> = if input == Path::new("-") {
            Box::new(io::stdin().lock())
        } else {
            Box::new(
                File::open(input)
                    .map_err(|e| Error::Image(format!("cannot open {}: {e}", input.display())))?,
            )
        };
        let mut buffered = BufReader::new(reader);
        let compressed = is_compressed(buffered.fill_buf()?);
        let file = if compressed || input == Path::new("-") {
            let mut out = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(spool)?;
            let copied = io::copy(&mut decompressed(buffered)?.take(max_spool + 1), &mut out)
                .map_err(|e| Error::Image(format!("reading {}: {e}", input.display())))?;
            if copied > max_spool {
                return Err(Error::Image(format!(
                    "{} exceeds {max_spool} bytes",
                    input.display()
                )));
            }
            out.seek(SeekFrom::Start(0))?;
            out
        } else {
            File::open(input)?
        };
        let members = index(&file, max_header)
            .map_err(|e| Error::Image(format!("{}: {e}", input.display())))?;
        Ok(Archive::Tar { file, members })
    }

    /// Whether the archive has a file (regular, or a link to one) named `name`.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Archive::Dir(dir) => dir.join(name).is_file(),
            Archive::Tar { members, .. } => resolve(members, name).is_some(),
        }
    }

    /// The file `name` as a stream.
    pub fn open_member(&self, name: &str) -> Result<Box<dyn Read + '_>> {
        let missing = || Error::Image(format!("the archive has no {name}"));
        match self {
            Archive::Dir(dir) => Ok(Box::new(File::open(dir.join(name)).map_err(|_| missing())?)),
            Archive::Tar { file, members } => {
                let (offset, size) = resolve(members, name).ok_or_else(missing)?;
                let mut file = file.try_clone()?;
                file.seek(SeekFrom::Start(offset))?;
                Ok(Box::new(file.take(size)))
            }
        }
    }

    /// The size of `name`.
    pub fn size(&self, name: &str) -> Option<u64> {
        match self {
            Archive::Dir(dir) => dir.join(name).metadata().ok().map(|m| m.len()),
            Archive::Tar { members, .. } => resolve(members, name).map(|(_, size)| size),
        }
    }

    /// Reads a small member (a JSON document), at most `max` bytes.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.open_member(name)?
            .take(max + 1)
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max {
            return Err(Error::Image(format!("{name} is larger than {max} bytes")));
        }
        Ok(bytes)
    }

    /// Top-level names, for an error saying what the archive holds.
    pub fn listing(&self) -> String {
        let mut names: Vec<String> = match self {
            Archive::Dir(dir) => std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default(),
            Archive::Tar { members, .. } => members
                .keys()
                .map(|n| n.split('/').next().unwrap_or(n).to_owned())
                .collect(),
        };
        names.sort();
        names.dedup();
        names.truncate(12);
        names.join(", ")
    }
}

/// Indexes a tar file: each member's name and data position.
fn index(file: &File, max_header: u64) -> io::Result<HashMap<String, Member>> {
    let mut members = HashMap::new();
    let mut archive = tar::Archive::new(HeaderGuard::new(
        BufReader::new(file.try_clone()?),
        max_header,
    ));
    for entry in archive.entries()? {
        let entry = entry?;
        if members.len() >= MAX_MEMBERS {
            return Err(io::Error::other(format!("more than {MAX_MEMBERS} members")));
        }
        let name = normalise(&String::from_utf8_lossy(&entry.path_bytes()));
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Member::File(entry.raw_file_position(), entry.size())
            }
            tar::EntryType::Symlink => {
                let target = String::from_utf8_lossy(&entry.link_name_bytes().unwrap_or_default())
                    .into_owned();
                let base = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                Member::Link(normalise(&format!("{base}/{target}")))
            }
            tar::EntryType::Link => Member::Link(normalise(&String::from_utf8_lossy(
                &entry.link_name_bytes().unwrap_or_default(),
            ))),
            _ => continue,
        };
        members.insert(name, member);
    }
    Ok(members)
}

/// `./a/../b//c` → `b/c` (lexically, inside the archive).
fn normalise(path: &str) -> String {
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
    parts.join("/")
}

fn resolve(members: &HashMap<String, Member>, name: &str) -> Option<(u64, u64)> {
    let mut name = normalise(name);
    for _ in 0..8 {
        match members.get(&name)? {
            Member::File(offset, size) => return Some((*offset, *size)),
            Member::Link(target) => name = target.clone(),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_normalise_lexically() {
        assert_eq!(normalise("./blobs//sha256/x"), "blobs/sha256/x");
        assert_eq!(normalise("abc/../def.tar"), "def.tar");
        assert_eq!(normalise("../../etc/passwd"), "etc/passwd");
    }
}
