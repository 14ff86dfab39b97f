//! One atomic word per worker slot, in memory the leader maps before forking so that it is
//! shared with every worker: the building block of the heartbeat and readiness tables.

use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};

/// How many slots a table holds; `TTIN` cannot grow past it.
pub const MAX_SLOTS: usize = 4096;

/// A shared table of `MAX_SLOTS` zero-initialized atomic words; a copy is a pointer to memory
/// that stays mapped until the process exits.
#[derive(Clone, Copy, Debug)]
pub struct SlotTable {
    base: NonNull<AtomicU64>,
}

// SAFETY: the memory is a table of atomics that stays mapped for the life of the process.
unsafe impl Send for SlotTable {}
// SAFETY: as above; all access goes through atomic operations.
unsafe impl Sync for SlotTable {}

impl SlotTable {
    /// Maps the table (shared with every child forked afterwards).
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        let len = std::num::NonZeroUsize::new(MAX_SLOTS * 8).expect("non-zero size");
        // SAFETY: a fresh anonymous mapping, zero-filled, never unmapped.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Self { base: ptr.cast() })
    }

    /// The word of `slot`, `None` past the table's end.
    pub fn cell(&self, slot: u32) -> Option<&AtomicU64> {
        let slot = slot as usize;
        // SAFETY: index checked against the mapping size; AtomicU64 has the alignment of u64
        // and the mapping is page-aligned.
        (slot < MAX_SLOTS).then(|| unsafe { &*self.base.as_ptr().add(slot) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_store_in_a_child_is_seen_by_the_parent() {
        let table = SlotTable::new().expect("mmap");
        assert!(table.cell(MAX_SLOTS as u32).is_none());
        // SAFETY: the child only stores to shared memory and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                if let Some(c) = table.cell(7) {
                    c.store(42, Ordering::SeqCst);
                }
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(table.cell(7).expect("slot").load(Ordering::SeqCst), 42);
            }
        }
    }
}
