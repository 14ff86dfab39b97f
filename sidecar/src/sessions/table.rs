//! The session table: running and finished sessions, which session holds which worker, and
//! how long finished sessions (and their results) are kept. Pure data, no I/O and no clock of
//! its own: callers pass `now`, so retention is tested without waiting.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::api::{Session, WorkerRun};
use crate::discovery::ProcessKey;

/// What the table keeps of finished sessions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    /// How long a finished session is kept.
    pub(crate) age: Duration,
    /// How many finished sessions are kept.
    pub(crate) count: usize,
    /// How many bytes of worker results (as read from their files) the finished sessions may
    /// hold together; the oldest finished sessions go first.
    pub(crate) bytes: u64,
}

/// Wakes a running session's task.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) capture: Notify,
    pub(crate) cancel: Notify,
    pub(crate) done: Notify,
}

pub(crate) struct Entry {
    pub(crate) session: Session,
    pub(crate) control: Arc<Control>,
    pub(crate) finished: Option<Instant>,
    /// Bytes of the result files held in `session`.
    pub(crate) bytes: u64,
}

/// Why a worker cannot be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) pid: u32,
    pub(crate) holder: String,
    /// True when the holder has ended but the worker still owes it an answer.
    pub(crate) lingering: bool,
}

#[derive(Default)]
pub(crate) struct Table {
    sessions: BTreeMap<String, Entry>,
    /// Which running session holds which worker.
    busy: HashMap<ProcessKey, String>,
    /// Workers that did not answer in time and are being watched until they do (or exit), so
    /// tracing they may still start is stopped; no new session may take them meanwhile.
    lingering: HashMap<ProcessKey, String>,
}

impl Table {
    /// Drops finished sessions beyond the retention age, count and byte budget, oldest first.
    pub(crate) fn prune(&mut self, now: Instant, keep: Retention) {
        self.sessions.retain(|_, e| {
            e.finished
                .is_none_or(|t| now.saturating_duration_since(t) < keep.age)
        });
        let mut finished: Vec<(Instant, String, u64)> = self
            .sessions
            .iter()
            .filter_map(|(id, e)| e.finished.map(|t| (t, id.clone(), e.bytes)))
            .collect();
        finished.sort();
        let mut count = finished.len();
        let mut bytes: u64 = finished.iter().map(|(_, _, b)| *b).sum();
        for (_, id, b) in finished {
            if count <= keep.count && bytes <= keep.bytes {
                break;
            }
            self.sessions.remove(&id);
            count -= 1;
            bytes -= b;
        }
    }

    /// The holder of the first of `workers` that is taken, if any.
    pub(crate) fn held(&self, workers: &[ProcessKey]) -> Option<Held> {
        workers.iter().find_map(|k| {
            let busy = self.busy.get(k).map(|h| (h, false));
            busy.or_else(|| self.lingering.get(k).map(|h| (h, true)))
                .map(|(holder, lingering)| Held {
                    pid: k.pid,
                    holder: holder.clone(),
                    lingering,
                })
        })
    }

    /// Adds a running session holding `workers` (checked free with [`Table::held`]).
    pub(crate) fn insert(&mut self, session: Session, control: Arc<Control>) {
        for w in &session.workers {
            self.busy.insert(key(w), session.id.clone());
        }
        self.sessions.insert(
            session.id.clone(),
            Entry {
                session,
                control,
                finished: None,
                bytes: 0,
            },
        );
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.sessions.get(id)
    }

    pub(crate) fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.sessions.get_mut(id)
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.sessions.values()
    }

    /// Marks `id` finished at `now` and releases its workers.
    pub(crate) fn finish(&mut self, id: &str, now: Instant) -> Option<&mut Entry> {
        self.busy.retain(|_, holder| holder != id);
        let entry = self.sessions.get_mut(id)?;
        entry.finished = Some(now);
        Some(entry)
    }

    /// Keeps `worker` reserved for `id` after its session ends, until [`Table::release`].
    pub(crate) fn linger(&mut self, worker: ProcessKey, id: &str) {
        self.lingering.insert(worker, id.to_owned());
    }

    /// Ends a [`Table::linger`].
    pub(crate) fn release(&mut self, worker: ProcessKey) {
        self.lingering.remove(&worker);
    }

    /// How many workers are lingering.
    pub(crate) fn lingering(&self) -> usize {
        self.lingering.len()
    }
}

/// The identity of a session's worker.
pub(crate) fn key(w: &WorkerRun) -> ProcessKey {
    ProcessKey {
        pid: w.pid,
        start_ticks: w.start_ticks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ProfileKind, ProfileRequest, SessionState, Targets, WorkerState};

    fn session(id: &str, pids: &[u32]) -> Session {
        Session {
            id: id.into(),
            state: SessionState::Starting,
            request: ProfileRequest {
                kind: ProfileKind::Stacks,
                targets: Targets::All,
                ..serde_json::from_str("{}").expect("defaults")
            },
            leader_pid: 1,
            created_at: 0.0,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: pids
                .iter()
                .map(|p| WorkerRun {
                    pid: *p,
                    start_ticks: 7,
                    slot: Some(0),
                    state: WorkerState::Pending,
                    error: None,
                    result: None,
                })
                .collect(),
            summary: None,
        }
    }

    fn k(pid: u32) -> ProcessKey {
        ProcessKey {
            pid,
            start_ticks: 7,
        }
    }

    const KEEP: Retention = Retention {
        age: Duration::from_secs(60),
        count: 10,
        bytes: 1000,
    };

    #[test]
    fn finished_sessions_go_by_age_count_and_bytes_oldest_first() {
        let mut t = Table::default();
        let t0 = Instant::now();
        for (i, bytes) in [400u64, 400, 400].iter().enumerate() {
            let id = format!("s{i}");
            t.insert(session(&id, &[i as u32 + 10]), Arc::default());
            t.finish(&id, t0 + Duration::from_secs(i as u64))
                .expect("known")
                .bytes = *bytes;
        }
        // 1200 bytes over a budget of 1000: the oldest goes.
        t.prune(t0 + Duration::from_secs(3), KEEP);
        assert!(t.get("s0").is_none());
        assert!(t.get("s1").is_some() && t.get("s2").is_some());
        t.prune(t0 + Duration::from_secs(3), Retention { count: 1, ..KEEP });
        assert!(t.get("s1").is_none() && t.get("s2").is_some());
        t.prune(t0 + Duration::from_secs(62), KEEP);
        assert!(t.get("s2").is_none());
    }

    #[test]
    fn a_running_session_is_never_pruned_and_holds_its_workers() {
        let mut t = Table::default();
        t.insert(session("run", &[10, 11]), Arc::default());
        t.get_mut("run").expect("known").bytes = 10_000;
        t.prune(Instant::now() + Duration::from_secs(3600), KEEP);
        assert!(t.get("run").is_some());
        let held = t.held(&[k(9), k(11)]).expect("held");
        assert_eq!(
            (held.pid, held.holder.as_str(), held.lingering),
            (11, "run", false)
        );
        t.finish("run", Instant::now());
        assert_eq!(t.held(&[k(10), k(11)]), None);
    }

    #[test]
    fn a_lingering_worker_stays_reserved_after_its_session_ends() {
        let mut t = Table::default();
        t.insert(session("a", &[10]), Arc::default());
        t.linger(k(10), "a");
        t.finish("a", Instant::now());
        assert!(t.held(&[k(10)]).is_some_and(|h| h.lingering));
        t.release(k(10));
        assert_eq!(t.held(&[k(10)]), None);
    }
}
