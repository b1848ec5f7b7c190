//! The only place with `unsafe` code: thin wrappers around what the safe APIs (std, rustix) do
//! not offer. Every block carries a `SAFETY:` comment.

pub mod inherited;
pub mod sandbox;

use std::{
    io,
    os::{fd::BorrowedFd, unix::process::CommandExt},
    process::{Child, Command},
};

/// Spawns `command` as the leader of a new session whose controlling terminal is its stdin
/// (which must be the slave side of a pseudo-terminal), so that `^C` reaches it as SIGINT and
/// its whole process group can be signalled at once; its soft limit on open files is lowered
/// to `file_limit` (see [`lower_file_limit`]).
pub fn spawn_with_controlling_terminal(
    command: &mut Command,
    file_limit: u64,
) -> io::Result<Child> {
    // SAFETY: the closure runs in the child between fork and exec. It only makes system calls
    // (setsid, ioctl, prlimit), which are async-signal-safe; it allocates nothing and takes no
    // locks, so the state of other threads of the parent at fork time cannot affect it.
    unsafe {
        command.pre_exec(move || {
            lower_file_limit(file_limit)?;
            rustix::process::setsid()?;
            // SAFETY: fd 0 is open in the child: std set up stdin before running this hook.
            let stdin = BorrowedFd::borrow_raw(0);
            rustix::process::ioctl_tiocsctty(stdin)?;
            Ok(())
        });
    }
    command.spawn()
}

/// Lowers the calling process's soft and hard limits on open files to `limit` (limits are
/// only ever lowered). The hard limit too: otherwise the process raises its soft limit back
/// (`ulimit -n 20000`). Only system calls: safe between fork and exec.
pub fn lower_file_limit(limit: u64) -> io::Result<()> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut files = getrlimit(Resource::Nofile);
    let lowered = |current: Option<u64>| Some(current.map_or(limit, |c| c.min(limit)));
    let (current, maximum) = (lowered(files.current), lowered(files.maximum));
    if (current, maximum) != (files.current, files.maximum) {
        files.current = current;
        files.maximum = maximum;
        setrlimit(Resource::Nofile, files)?;
    }
    Ok(())
}

/// Allocations from this size on are served by [`Allocator`] from their own mappings.
const HUGE: usize = 1 << 30;
/// Page size assumed for the alignment of such mappings.
const PAGE: usize = 4096;

/// A global allocator for binaries embedding the server: allocations of 1 GiB or more get
/// their own anonymous mapping made with `MAP_NORESERVE`, everything else goes to the system
/// allocator.
///
/// Why: an allocation sized by a number from outside (an announced length, say) that exceeds
/// the machine's memory would abort the process; a `MAP_NORESERVE` mapping only takes address
/// space, and only the pages touched cost memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allocator;

fn huge(layout: std::alloc::Layout) -> bool {
    layout.size() >= HUGE && layout.align() <= PAGE
}

// SAFETY: every method upholds the GlobalAlloc contract: huge layouts are served by fresh
// page-aligned mappings of at least the requested size (zeroed, as anonymous mappings are)
// and released with munmap of the same size; all other layouts are delegated to `System`
// unchanged. `huge` depends only on the layout, so a block is always freed by the same
// path that allocated it.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if huge(layout) {
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if huge(layout) {
            map(layout.size())
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if huge(layout) {
            // SAFETY: `ptr` came from `map(layout.size())` (same predicate on the same layout).
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to the alignment, fits an isize.
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !huge(layout) && !huge(new_layout) {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: `new_layout` is valid (see above); both blocks are live and distinct and the
        // copy stays within the smaller of them.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

fn map(size: usize) -> *mut u8 {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: an anonymous mapping at an address the kernel picks affects no existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        std::ptr::null_mut()
    } else {
        ptr.cast()
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::*;

    #[test]
    fn huge_zeroed_blocks_beyond_memory_are_served_and_freed() {
        // 64 TiB: far beyond any machine's memory, yet only address space.
        let layout = Layout::from_size_align(64 << 40, 1).unwrap();
        // SAFETY: the layout has a non-zero size; the block is freed with the same layout.
        unsafe {
            let block = Allocator.alloc_zeroed(layout);
            assert!(!block.is_null());
            *block.add(12345) = 7;
            assert_eq!(*block.add(12344), 0);
            Allocator.dealloc(block, layout);
        }
    }

    #[test]
    fn small_blocks_grow_into_huge_ones_and_keep_their_content() {
        let layout = Layout::from_size_align(16, 8).unwrap();
        // SAFETY: valid layouts; each block is freed once with its final layout.
        unsafe {
            let block = Allocator.alloc(layout);
            block.write_bytes(9, 16);
            let grown = Allocator.realloc(block, layout, HUGE);
            assert_eq!(*grown.add(15), 9);
            Allocator.dealloc(grown, Layout::from_size_align(HUGE, 8).unwrap());
        }
    }
}
