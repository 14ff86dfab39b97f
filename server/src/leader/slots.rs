//! The slot table: which worker PID serves which stable slot, since when, and how its slot has
//! fared (for crash-loop back-off).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// A live worker.
#[derive(Debug, Clone)]
pub struct WorkerProc {
    /// Its PID.
    pub pid: Pid,
    /// Spawn order across the leader's life (gunicorn's `age`).
    pub age: u64,
    /// When it was forked.
    pub spawned_at: Instant,
    /// Told to stop (TERM, or ABRT on timeout); not counted as serving.
    pub retiring: Option<Retiring>,
    /// Its cell in the load table (see [`crate::balance`]).
    pub load_cell: Option<u32>,
}

/// Why and since when a worker is on its way out.
#[derive(Debug, Clone, Copy)]
pub struct Retiring {
    /// When it was told.
    pub since: Instant,
    /// It was aborted for a timeout (so KILL follows quickly).
    pub aborted: bool,
}

/// Consecutive boot failures in a slot and when it may be tried again.
#[derive(Debug, Clone, Copy, Default)]
pub struct Backoff {
    /// Failures in a row.
    pub failures: u32,
    /// Not before.
    pub retry_at: Option<Instant>,
}

/// Workers by slot. Retiring workers are kept apart, so their slot can be refilled at once.
/// During a reload, the old generation is *superseded*: it still serves, but its slot is
/// refilled, and each old worker retires once its replacement is ready.
#[derive(Debug, Default)]
pub struct Slots {
    serving: BTreeMap<u32, WorkerProc>,
    superseded: Vec<(u32, WorkerProc)>,
    retiring: Vec<(u32, WorkerProc)>,
    backoff: BTreeMap<u32, Backoff>,
    next_age: u64,
}

impl Slots {
    /// The next spawn's age.
    pub fn next_age(&mut self) -> u64 {
        self.next_age += 1;
        self.next_age
    }

    /// Records a freshly forked worker.
    pub fn insert(&mut self, slot: u32, worker: WorkerProc) {
        self.serving.insert(slot, worker);
    }

    /// Serving workers, by slot.
    pub fn serving(&self) -> impl Iterator<Item = (u32, &WorkerProc)> {
        self.serving.iter().map(|(s, w)| (*s, w))
    }

    /// Every live worker, serving, superseded or retiring.
    pub fn all_pids(&self) -> Vec<Pid> {
        self.serving
            .values()
            .chain(self.superseded.iter().map(|(_, w)| w))
            .chain(self.retiring.iter().map(|(_, w)| w))
            .map(|w| w.pid)
            .collect()
    }

    /// Moves the serving worker of `slot` to the superseded generation (it keeps serving until
    /// [`Slots::retire_superseded`]); returns its PID.
    pub fn supersede(&mut self, slot: u32) -> Option<Pid> {
        let w = self.serving.remove(&slot)?;
        let pid = w.pid;
        self.superseded.push((slot, w));
        Some(pid)
    }

    /// Superseded workers, by slot.
    pub fn superseded(&self) -> impl Iterator<Item = (u32, &WorkerProc)> {
        self.superseded.iter().map(|(s, w)| (*s, w))
    }

    /// Moves the superseded worker `pid` to the retiring set.
    pub fn retire_superseded(&mut self, pid: Pid) -> bool {
        let Some(i) = self.superseded.iter().position(|(_, w)| w.pid == pid) else {
            return false;
        };
        let (slot, mut w) = self.superseded.swap_remove(i);
        w.retiring = Some(Retiring {
            since: Instant::now(),
            aborted: false,
        });
        self.retiring.push((slot, w));
        true
    }

    /// Number of serving workers.
    pub fn serving_count(&self) -> usize {
        self.serving.len()
    }

    /// True when no worker is alive.
    pub fn is_empty(&self) -> bool {
        self.serving.is_empty() && self.superseded.is_empty() && self.retiring.is_empty()
    }

    /// Moves the worker of `slot` to the retiring set; returns its PID.
    pub fn retire(&mut self, slot: u32, aborted: bool) -> Option<Pid> {
        let mut w = self.serving.remove(&slot)?;
        w.retiring = Some(Retiring {
            since: Instant::now(),
            aborted,
        });
        let pid = w.pid;
        self.retiring.push((slot, w));
        Some(pid)
    }

    /// Retiring workers.
    pub fn retiring(&self) -> impl Iterator<Item = &(u32, WorkerProc)> {
        self.retiring.iter()
    }

    /// Retiring workers, to escalate their stop.
    pub fn retiring_mut(&mut self) -> impl Iterator<Item = &mut (u32, WorkerProc)> {
        self.retiring.iter_mut()
    }

    /// Removes the worker with `pid`; returns its slot and record if it was ours.
    pub fn remove_pid(&mut self, pid: Pid) -> Option<(u32, WorkerProc)> {
        if let Some(slot) = self
            .serving
            .iter()
            .find(|(_, w)| w.pid == pid)
            .map(|(s, _)| *s)
        {
            return self.serving.remove(&slot).map(|w| (slot, w));
        }
        if let Some(i) = self.superseded.iter().position(|(_, w)| w.pid == pid) {
            return Some(self.superseded.swap_remove(i));
        }
        let i = self.retiring.iter().position(|(_, w)| w.pid == pid)?;
        Some(self.retiring.swap_remove(i))
    }

    /// Slots below `target` that have no serving worker and are not backing off.
    pub fn empty_slots(&self, target: u32, now: Instant) -> Vec<u32> {
        (0..target)
            .filter(|s| !self.serving.contains_key(s))
            .filter(|s| {
                self.backoff
                    .get(s)
                    .and_then(|b| b.retry_at)
                    .is_none_or(|t| now >= t)
            })
            .collect()
    }

    /// Serving slots at or above `target` (to shrink after TTOU), highest first.
    pub fn excess_slots(&self, target: u32) -> Vec<u32> {
        self.serving
            .keys()
            .rev()
            .copied()
            .filter(|s| *s >= target)
            .collect()
    }

    /// A worker in `slot` failed at boot: doubles the wait before the next try, from 100 ms up
    /// to 10 s. Returns the number of failures in a row.
    pub fn boot_failed(&mut self, slot: u32) -> u32 {
        let b = self.backoff.entry(slot).or_default();
        b.failures += 1;
        let wait = Duration::from_millis(100) * 2u32.saturating_pow(b.failures - 1).min(100);
        b.retry_at = Some(Instant::now() + wait);
        b.failures
    }

    /// A worker in `slot` booted fine: forget its failures.
    pub fn booted(&mut self, slot: u32) {
        self.backoff.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: i32) -> WorkerProc {
        WorkerProc {
            pid: Pid::from_raw(pid),
            age: 0,
            spawned_at: Instant::now(),
            retiring: None,
            load_cell: None,
        }
    }

    #[test]
    fn a_dead_worker_frees_its_slot_for_the_same_slot() {
        let mut slots = Slots::default();
        slots.insert(0, worker(10));
        slots.insert(1, worker(11));
        assert_eq!(slots.empty_slots(3, Instant::now()), vec![2]);
        assert_eq!(slots.remove_pid(Pid::from_raw(11)).map(|(s, _)| s), Some(1));
        assert_eq!(slots.empty_slots(3, Instant::now()), vec![1, 2]);
    }

    #[test]
    fn retiring_frees_the_slot_but_keeps_the_pid() {
        let mut slots = Slots::default();
        slots.insert(0, worker(10));
        assert_eq!(slots.retire(0, false), Some(Pid::from_raw(10)));
        assert_eq!(slots.empty_slots(1, Instant::now()), vec![0]);
        assert_eq!(slots.all_pids(), vec![Pid::from_raw(10)]);
        assert!(slots.remove_pid(Pid::from_raw(10)).is_some());
        assert!(slots.is_empty());
    }

    #[test]
    fn a_superseded_worker_serves_until_it_is_retired() {
        let mut slots = Slots::default();
        slots.insert(0, worker(10));
        assert_eq!(slots.supersede(0), Some(Pid::from_raw(10)));
        assert_eq!(slots.empty_slots(1, Instant::now()), vec![0]);
        slots.insert(0, worker(20));
        assert_eq!(slots.all_pids().len(), 2);
        assert!(slots.retire_superseded(Pid::from_raw(10)));
        assert_eq!(slots.superseded().count(), 0);
        assert_eq!(slots.retiring().count(), 1);
        assert!(slots.remove_pid(Pid::from_raw(10)).is_some());
        assert!(slots.remove_pid(Pid::from_raw(20)).is_some());
        assert!(slots.is_empty());
    }

    #[test]
    fn boot_failures_back_off() {
        let mut slots = Slots::default();
        assert_eq!(slots.boot_failed(0), 1);
        assert_eq!(slots.boot_failed(0), 2);
        let now = Instant::now();
        assert!(slots.empty_slots(1, now).is_empty());
        assert_eq!(slots.empty_slots(1, now + Duration::from_secs(11)), vec![0]);
        slots.booted(0);
        assert_eq!(slots.empty_slots(1, now), vec![0]);
    }

    #[test]
    fn shrinking_takes_the_highest_slots() {
        let mut slots = Slots::default();
        for i in 0..4 {
            slots.insert(i, worker(10 + i as i32));
        }
        assert_eq!(slots.excess_slots(2), vec![3, 2]);
    }
}
