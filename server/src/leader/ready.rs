//! Which worker of each slot has booted, in memory shared with the workers.
//!
//! A worker writes its PID into its slot's cell once its app is loaded and `post_worker_init`
//! ran, right before it serves. On HUP the leader keeps each old worker serving until the new
//! worker in its slot has written its PID here, so a reload never leaves a slot without a
//! worker that accepts, even when the new workers take seconds to import the app.

use std::sync::atomic::Ordering;

use crate::slot_table::SlotTable;

/// The PID of the worker that is ready in each slot (0 = none yet).
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    table: SlotTable,
}

impl Ready {
    /// Maps the table (shared with every child forked afterwards).
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            table: SlotTable::new()?,
        })
    }

    /// In a worker: it serves from now on.
    pub fn mark(&self, slot: u32, pid: u32) {
        if let Some(c) = self.table.cell(slot) {
            c.store(u64::from(pid), Ordering::SeqCst);
        }
    }

    /// True once the worker `pid` of `slot` has marked itself ready.
    pub fn is_ready(&self, slot: u32, pid: u32) -> bool {
        self.table
            .cell(slot)
            .is_some_and(|c| c.load(Ordering::SeqCst) == u64::from(pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_seen_across_fork() {
        let ready = Ready::new().expect("mmap");
        assert!(!ready.is_ready(3, 42));
        // SAFETY: after fork only async-signal-safe work is allowed in the child of this
        // multi-threaded test process; the child only stores to shared memory and `_exit`s.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                ready.mark(3, 42);
                // SAFETY: _exit is async-signal-safe and ends the child without running the parent's
                // destructors or atexit handlers.
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
