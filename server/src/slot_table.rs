//! One atomic word per worker slot, in memory the leader maps before forking so that it is
//! shared with every worker: the building block of the heartbeat, readiness and load tables,
//! and (mapped from a file the sidecar reads) of the request counters.

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
    words: usize,
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
        Self::anonymous(MAX_SLOTS)
    }

    /// Maps `words` zero-initialized words of anonymous shared memory.
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn anonymous(words: usize) -> nix::Result<Self> {
        let len = std::num::NonZeroUsize::new(words * 8).expect("non-zero size");
        // SAFETY: a fresh anonymous mapping, zero-filled, never unmapped.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )?
        };
        Ok(Self {
            base: ptr.cast(),
            words,
        })
    }

    /// Maps the first `words` words of `file` (already at least that long), shared with every
    /// process that maps it: other programs read what the atomics write.
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn file(file: &std::fs::File, words: usize) -> nix::Result<Self> {
        let len = std::num::NonZeroUsize::new(words * 8).expect("non-zero size");
        // SAFETY: a shared mapping of a file the caller sized; it is never unmapped, and the
        // program only ever accesses it as atomics.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file,
                0,
            )?
        };
        Ok(Self {
            base: ptr.cast(),
            words,
        })
    }

    /// The word of `slot`, `None` past the table's end.
    pub fn cell(&self, slot: u32) -> Option<&AtomicU64> {
        self.word(slot as usize)
    }

    /// Word `index`, `None` past the table's end.
    pub fn word(&self, index: usize) -> Option<&AtomicU64> {
        // SAFETY: index checked against the mapping size; AtomicU64 has the alignment of u64
        // and the mapping is page-aligned.
        (index < self.words).then(|| unsafe { &*self.base.as_ptr().add(index) })
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
        // SAFETY: after fork only async-signal-safe work is allowed in the child of this
        // multi-threaded test process; the child only stores to shared memory and `_exit`s.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                if let Some(c) = table.cell(7) {
                    c.store(42, Ordering::SeqCst);
                }
                // SAFETY: _exit is async-signal-safe and ends the child without running the parent's
                // destructors or atexit handlers.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(table.cell(7).expect("slot").load(Ordering::SeqCst), 42);
            }
        }
    }
}
