//! What the sandbox executor and its runners share: the configuration, cgroups, images,
//! network, and the free uid range slots.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use super::{cgroup::Cgroups, image};
use crate::{
    config::SandboxConfig,
    error::{Error, Result},
    image::service::Images,
    network::Network,
};

/// Host ids per runner: inside ids 0..65535.
pub(super) const IDS_PER_RUNNER: u32 = 65536;

/// What the executor and its runners share.
#[derive(Debug)]
pub(super) struct Shared {
    pub config: SandboxConfig,
    pub agent: PathBuf,
    /// `<state dir>/sandbox`: one (empty) directory per runner.
    pub dir: PathBuf,
    pub cgroups: Cgroups,
    /// Registry images (`None` if the image store cannot be used; then only directory and
    /// host images work).
    pub images: Option<Arc<Images>>,
    /// Free uid ranges (only [`Shared::take_slot`], [`Shared::reserve_slot`] and
    /// [`Shared::give_slot`] change them).
    pub slots: Mutex<Slots>,
    /// Network access and exposed ports.
    pub network: Arc<Network>,
}

/// Free host uid ranges, numbered from `uid_base`. Only the first `count` are ever handed
/// out: those are the ranges checked against the host's ids at start.
#[derive(Debug)]
pub(super) struct Slots {
    free: Vec<u32>,
    next: u32,
    count: u32,
}

impl Slots {
    /// None taken yet, `count` to hand out.
    pub(super) fn new(count: u32) -> Slots {
        Slots {
            free: Vec::new(),
            next: 0,
            count,
        }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        (self.next < self.count).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Takes `slot` out of circulation. A slot beyond `count` (a runner of a server that was
    /// configured with a larger capacity) is never handed out anyway.
    fn reserve(&mut self, slot: u32) {
        if slot < self.next {
            self.free.retain(|free| *free != slot);
            return;
        }
        let end = slot.min(self.count);
        self.free.extend(self.next..end);
        self.next = (slot + 1).min(self.count).max(self.next);
    }

    fn give(&mut self, slot: u32) {
        if slot < self.count && slot < self.next && !self.free.contains(&slot) {
            self.free.push(slot);
        }
    }
}

impl Shared {
    /// Resolves image names with the configuration and the image store.
    pub fn resolver(&self) -> image::Resolver<'_> {
        image::Resolver {
            aliases: &self.config.images,
            images_dir: self.config.images_dir.as_deref(),
            images: self.images.as_ref(),
        }
    }

    /// Takes a free uid range.
    pub fn take_slot(&self) -> Result<u32> {
        self.slots
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Error::Internal("sandbox: no free uid range".into()))
    }

    /// Marks a uid range as taken (by a runner an earlier server left running).
    pub fn reserve_slot(&self, slot: u32) {
        self.slots.lock().unwrap().reserve(slot);
    }

    /// Returns a uid range; only once nothing of its runner runs any more.
    pub fn give_slot(&self, slot: u32) {
        self.slots.lock().unwrap().give(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_slots_are_never_handed_out_and_none_beyond_the_count() {
        let mut slots = Slots::new(4);
        slots.reserve(2);
        slots.reserve(9);
        let mut taken: Vec<u32> = std::iter::from_fn(|| slots.take()).collect();
        taken.sort_unstable();
        assert_eq!(taken, vec![0, 1, 3]);
        slots.give(9);
        slots.give(2);
        slots.give(2);
        assert_eq!((slots.take(), slots.take()), (Some(2), None));
    }
}
