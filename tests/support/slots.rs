//! Host uid ranges for the servers and executors the tests start, never shared by two test
//! processes on this machine (nextest runs every test in a process of its own, and other
//! checkouts may run their suites at the same time). Ids are handed out in blocks of
//! [`BLOCK_IDS`]; a block is claimed with an exclusive `flock` on a lock file of its own in
//! [`DIR`], held as long as its [`UidBlocks`] lives. The kernel releases the lock when the
//! process ends, also after a crash or SIGKILL, so no claim outlives its test process. A block
//! in which some process still has a uid (one a killed test left behind, or one still exiting)
//! is passed over.
//!
//! Blocks lie from 2^24 up: far above host users and the `subuid` ranges Debian hands out, as
//! the server's `uid_base` check demands (at least 65536, no overlap with host ids).

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
};

use poseidon_lite::executor::sandbox::SandboxExecutor;

/// Host ids per runner (as the sandbox executor maps them).
const IDS_PER_RUNNER: u32 = 65536;
/// Host ids per block: 64 runners' ranges.
pub const BLOCK_IDS: u32 = 64 * IDS_PER_RUNNER;
/// The first id of block 0.
const FIRST_ID: u32 = 1 << 24;
/// Blocks there are: the last ends below `u32::MAX` (which is no uid).
const BLOCKS: u32 = 1000;
/// Where the lock files are: fixed, so that every test process on the machine sees them.
const DIR: &str = "/tmp/poseidon-lite-test-slots";

/// Adjacent blocks of host uids that no other test process uses while this value lives.
#[derive(Debug)]
pub struct UidBlocks {
    base: u32,
    ids: u32,
    _locks: Vec<File>,
}

impl UidBlocks {
    /// The first id (a server's `uid_base`).
    pub fn base(&self) -> u32 {
        self.base
    }

    /// Host pids of the processes with a real, effective, saved or file-system uid in the
    /// blocks.
    pub fn pids(&self) -> Vec<u32> {
        pids_with_uids(self.base, self.ids)
    }
}

/// Blocks enough for every uid range a sandbox server of `capacity` runners may use.
#[track_caller]
pub fn claim_for(capacity: usize) -> UidBlocks {
    let ids = u64::from(SandboxExecutor::uid_ranges(capacity)) * u64::from(IDS_PER_RUNNER);
    let blocks = ids.div_ceil(u64::from(BLOCK_IDS));
    claim(u32::try_from(blocks).unwrap_or(u32::MAX))
}

/// `blocks` adjacent blocks that no other test process holds.
#[track_caller]
pub fn claim(blocks: u32) -> UidBlocks {
    assert!(
        (1..=BLOCKS).contains(&blocks),
        "{blocks} uid blocks wanted, there are {BLOCKS}: lower the capacity"
    );
    let dir = Path::new(DIR);
    if std::fs::create_dir(dir).is_ok() {
        // Any user's test process may claim blocks (as in /tmp itself, sticky).
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
    }
    for first in 0..=BLOCKS - blocks {
        let locks: Vec<File> = (first..first + blocks).map_while(lock).collect();
        if locks.len() != blocks as usize {
            continue;
        }
        let base = FIRST_ID + first * BLOCK_IDS;
        let ids = blocks * BLOCK_IDS;
        if pids_with_uids(base, ids).is_empty() {
            return UidBlocks {
                base,
                ids,
                _locks: locks,
            };
        }
    }
    panic!(
        "no {blocks} free adjacent uid blocks among the {BLOCKS} of {DIR}: each is locked by a \
         running test process or has a leftover process in it"
    );
}

/// The lock of `block`, if no open file (of this process or another) holds it.
fn lock(block: u32) -> Option<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o666)
        .open(Path::new(DIR).join(format!("block-{block}")))
        .ok()?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).ok()?;
    Some(file)
}

/// Host pids of the processes with a real, effective, saved or file-system uid in
/// `base..base + count`.
fn pids_with_uids(base: u32, count: u32) -> Vec<u32> {
    let range = u64::from(base)..u64::from(base) + u64::from(count);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"))?;
            uids.split_whitespace()
                .filter_map(|uid| uid.parse::<u64>().ok())
                .any(|uid| range.contains(&uid))
                .then_some(pid)
        })
        .collect()
}
