//! Worker liveness shared with the leader through one anonymous shared memory page set.
//!
//! gunicorn workers `utime` a temporary file and the leader `stat`s it; here each slot is one
//! atomic word in memory the leader maps before forking, so a beat costs a single store and
//! the leader's check is a load. A worker beats from its event loop only while no request has
//! run longer than `--timeout`, so a stuck request, not only a stuck loop, stops the beats.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::slot_table::SlotTable;

pub use crate::slot_table::MAX_SLOTS;

/// Milliseconds on the system-wide monotonic clock (the same in every process).
pub fn now_ms() -> u64 {
    monotonic().as_millis() as u64
}

/// The system-wide monotonic clock (the same in every process).
pub fn monotonic() -> std::time::Duration {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
}

/// The last beat of each slot, in monotonic milliseconds (0 = never).
#[derive(Clone, Copy, Debug)]
pub struct Heartbeats {
    table: SlotTable,
}

impl Heartbeats {
    /// Maps the table (shared with every child forked afterwards).
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            table: SlotTable::new()?,
        })
    }

    fn cell(&self, slot: u32) -> Option<&AtomicU64> {
        self.table.cell(slot)
    }

    /// Records that the worker in `slot` is alive now.
    pub fn beat(&self, slot: u32) {
        if let Some(c) = self.cell(slot) {
            c.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// Milliseconds since the last beat of `slot` (0 if it never beat).
    pub fn silence_ms(&self, slot: u32) -> u64 {
        self.cell(slot)
            .map(|c| c.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .map_or(0, |t| now_ms().saturating_sub(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_are_seen_across_fork() {
        let hb = Heartbeats::new().expect("mmap");
        assert_eq!(hb.silence_ms(1), 0);
        // SAFETY: after fork only async-signal-safe work is allowed in the child of this
        // multi-threaded test process; the child only stores to shared memory and `_exit`s.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                hb.beat(1);
                // SAFETY: _exit is async-signal-safe and ends the child without running the parent's
                // destructors or atexit handlers.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert!(hb.silence_ms(1) < 60_000);
                let cell = hb.cell(1).expect("slot").load(Ordering::Relaxed);
                assert!(cell > 0, "the child's beat is visible to the parent");
            }
        }
    }
}
