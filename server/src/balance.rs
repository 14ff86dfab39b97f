//! Spreading connections over the workers of one leader.
//!
//! Every worker watches the same listening sockets and the kernel wakes all of them for each
//! new connection; whichever calls `accept` first takes it, and a worker that is awake takes
//! everything queued. Under keep-alive (a load balancer's pool, a benchmark's 32 connections)
//! that leaves one worker holding every connection for hours while its siblings idle.
//!
//! So each worker publishes its open connections in memory the leader shares with all of its
//! workers, and before each `accept` looks at its siblings: when one that accepts, and is not
//! deep in a request, holds fewer connections, it leaves the connection to that sibling. The
//! kernel woke the sibling too, so it takes the connection within microseconds; if it does not
//! (stuck, stopped, killed and not yet reaped), the deferral ends after [`DEFER_AT_MOST`] and
//! the worker takes the connection after all. Only the choice of taker changes: the sockets,
//! the backlog and the zero-drop reload are untouched.
//!
//! The leader hands each worker its own cell (not its slot's: during a reload the old and the
//! new worker of a slot both serve) and clears it when it reaps the worker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::slot_table::{MAX_SLOTS, SlotTable};

/// How long a worker leaves queued connections to a sibling that does not take them.
pub const DEFER_AT_MOST: Duration = Duration::from_millis(20);

/// A sibling inside one request for longer than this will not accept soon: not waited for.
const BUSY_LONG_MS: u64 = 2;

/// Set while the worker accepts; the low 32 bits count its open connections.
const ACCEPTING: u64 = 1 << 63;
const CONNS: u64 = u32::MAX as u64;

/// Cells a table holds: two words each (load, busy-since) in one slot table.
const CELLS: u32 = (MAX_SLOTS / 2) as u32;

/// The shared table: per cell, a load word (accepting flag, open connections) and the time the
/// worker's single request loop entered its current request (monotonic ms, 0 = idle); plus a
/// header word holding how many cells to look at.
#[derive(Clone, Copy, Debug)]
pub struct LoadTable {
    words: SlotTable,
    header: SlotTable,
}

impl LoadTable {
    /// Maps the table (shared with every child forked afterwards).
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            words: SlotTable::new()?,
            header: SlotTable::new()?,
        })
    }

    fn load(&self, cell: u32) -> Option<&AtomicU64> {
        self.words.cell(cell * 2)
    }

    fn busy(&self, cell: u32) -> Option<&AtomicU64> {
        self.words.cell(cell * 2 + 1)
    }

    fn in_use(&self) -> &AtomicU64 {
        self.header.cell(0).expect("the header has a first word")
    }
}

/// The leader's side: which cells its live workers hold.
#[derive(Debug)]
pub struct Cells {
    table: LoadTable,
    used: BTreeSet<u32>,
}

impl Cells {
    /// An empty table.
    ///
    /// # Errors
    /// `mmap` failed.
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            table: LoadTable::new()?,
            used: BTreeSet::new(),
        })
    }

    /// A cleared cell for a worker about to be forked (`None` when every cell is taken: that
    /// worker then accepts without looking at its siblings).
    pub fn take(&mut self) -> Option<Load> {
        let cell = (0..CELLS).find(|c| !self.used.contains(c))?;
        self.used.insert(cell);
        self.clear(cell);
        self.publish_in_use();
        Some(Load {
            table: self.table,
            cell,
        })
    }

    /// Gives back the cell of a worker that has exited (or was never forked).
    pub fn release(&mut self, cell: u32) {
        if self.used.remove(&cell) {
            self.clear(cell);
            self.publish_in_use();
        }
    }

    fn clear(&self, cell: u32) {
        for word in [self.table.load(cell), self.table.busy(cell)]
            .into_iter()
            .flatten()
        {
            word.store(0, Ordering::SeqCst);
        }
    }

    fn publish_in_use(&self) {
        let n = self.used.last().map_or(0, |c| c + 1);
        self.table.in_use().store(u64::from(n), Ordering::SeqCst);
    }
}

/// A worker's side: its own cell, and a view of its siblings'.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    table: LoadTable,
    cell: u32,
}

impl Load {
    /// The cell's number (the leader releases it by number).
    pub fn cell(&self) -> u32 {
        self.cell
    }

    fn word(&self) -> &AtomicU64 {
        self.table
            .load(self.cell)
            .expect("cells are taken in range")
    }

    /// Siblings may leave connections to this worker from now on.
    pub fn start_accepting(&self) {
        self.word().fetch_or(ACCEPTING, Ordering::Relaxed);
    }

    /// This worker takes no more connections: siblings stop leaving them to it.
    pub fn stop_accepting(&self) {
        self.word().fetch_and(!ACCEPTING, Ordering::Relaxed);
    }

    /// A connection was accepted.
    pub fn opened(&self) {
        self.word().fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed.
    pub fn closed(&self) {
        self.word().fetch_sub(1, Ordering::Relaxed);
    }

    /// The single request loop entered a request at `now_ms`, or left it (`0`). Workers with
    /// several threads do not publish this: one busy thread leaves others to accept.
    pub fn set_busy_since(&self, now_ms: u64) {
        if let Some(w) = self.table.busy(self.cell) {
            w.store(now_ms, Ordering::Relaxed);
        }
    }

    /// True when a sibling that accepts and is not deep in a request holds fewer connections.
    pub fn sibling_has_fewer(&self, now_ms: u64) -> bool {
        let mine = self.word().load(Ordering::Relaxed) & CONNS;
        if mine == 0 {
            return false;
        }
        let in_use = self.table.in_use().load(Ordering::Relaxed) as u32;
        (0..in_use.min(CELLS)).any(|cell| {
            if cell == self.cell {
                return false;
            }
            let load = self
                .table
                .load(cell)
                .map_or(0, |w| w.load(Ordering::Relaxed));
            if load & ACCEPTING == 0 || load & CONNS >= mine {
                return false;
            }
            let since = self
                .table
                .busy(cell)
                .map_or(0, |w| w.load(Ordering::Relaxed));
            since == 0 || now_ms.saturating_sub(since) <= BUSY_LONG_MS
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepting_with(cells: &mut Cells, conns: u32) -> Load {
        let load = cells.take().expect("a free cell");
        load.start_accepting();
        for _ in 0..conns {
            load.opened();
        }
        load
    }

    #[test]
    fn a_worker_defers_only_to_an_accepting_sibling_with_fewer_connections() {
        let mut cells = Cells::new().expect("mmap");
        let a = accepting_with(&mut cells, 0);
        let b = accepting_with(&mut cells, 0);
        assert!(!a.sibling_has_fewer(1000), "ties take the connection");
        a.opened();
        assert!(a.sibling_has_fewer(1000));
        assert!(!b.sibling_has_fewer(1000));
        b.stop_accepting();
        assert!(!a.sibling_has_fewer(1000), "a stopping sibling takes none");
        b.start_accepting();
        b.opened();
        b.opened();
        assert!(!a.sibling_has_fewer(1000));
        assert!(b.sibling_has_fewer(1000));
        a.closed();
        assert!(b.sibling_has_fewer(1000));
    }

    #[test]
    fn a_sibling_deep_in_a_request_is_not_waited_for() {
        let mut cells = Cells::new().expect("mmap");
        let a = accepting_with(&mut cells, 3);
        let b = accepting_with(&mut cells, 1);
        b.set_busy_since(1000);
        assert!(a.sibling_has_fewer(1000 + BUSY_LONG_MS), "just entered");
        assert!(!a.sibling_has_fewer(1000 + BUSY_LONG_MS + 1));
        b.set_busy_since(0);
        assert!(a.sibling_has_fewer(5000));
    }

    #[test]
    fn a_released_cell_is_cleared_and_reused() {
        let mut cells = Cells::new().expect("mmap");
        let a = accepting_with(&mut cells, 2);
        let b = accepting_with(&mut cells, 0);
        assert!(a.sibling_has_fewer(0));
        cells.release(b.cell());
        assert!(!a.sibling_has_fewer(0), "a reaped worker is no sibling");
        let c = cells.take().expect("a free cell");
        assert_eq!(c.cell(), b.cell(), "the lowest free cell is reused");
        assert!(!a.sibling_has_fewer(0), "not accepting before it says so");
        c.start_accepting();
        assert!(a.sibling_has_fewer(0));
    }

    #[test]
    fn the_table_is_shared_across_fork() {
        let mut cells = Cells::new().expect("mmap");
        let a = accepting_with(&mut cells, 1);
        let b = cells.take().expect("a free cell");
        // SAFETY: the child only stores to shared memory and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                b.start_accepting();
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
                assert!(a.sibling_has_fewer(0));
            }
        }
    }
}
