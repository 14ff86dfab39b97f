//! Which worker of each slot has booted, in memory shared with the workers.
//!
//! A worker writes its PID into its slot's cell once its app is loaded and `post_worker_init`
//! ran, right before it serves. On HUP the leader keeps each old worker serving until the new
//! worker in its slot has written its PID here, so a reload never leaves a slot without a
//! worker that accepts, even when the new workers take seconds to import the app.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};

use crate::heartbeat::MAX_SLOTS;

/// The shared table; a copy is a pointer to memory that lives until exit.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    base: NonNull<AtomicU32>,
}

// SAFETY: the memory is a table of atomics that stays mapped for the life of the process.
unsafe impl Send for Ready {}
// SAFETY: as above; all access goes through atomic operations.
unsafe impl Sync for Ready {}

impl Ready {
    /// Maps the table (shared with every child forked afterwards).
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        let len = std::num::NonZeroUsize::new(MAX_SLOTS * 4).expect("non-zero size");
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

    fn cell(&self, slot: u32) -> Option<&AtomicU32> {
        let slot = slot as usize;
        // SAFETY: index checked against the mapping size; the mapping is page-aligned.
        (slot < MAX_SLOTS).then(|| unsafe { &*self.base.as_ptr().add(slot) })
    }

    /// In a worker: it serves from now on.
    pub fn mark(&self, slot: u32, pid: u32) {
        if let Some(c) = self.cell(slot) {
            c.store(pid, Ordering::SeqCst);
        }
    }

    /// True once the worker `pid` of `slot` has marked itself ready.
    pub fn is_ready(&self, slot: u32, pid: u32) -> bool {
        self.cell(slot)
            .is_some_and(|c| c.load(Ordering::SeqCst) == pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_seen_across_fork() {
        let ready = Ready::new().expect("mmap");
        assert!(!ready.is_ready(3, 42));
        // SAFETY: the child only stores to shared memory and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                ready.mark(3, 42);
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert!(ready.is_ready(3, 42));
                assert!(!ready.is_ready(3, 43));
            }
        }
    }
}
