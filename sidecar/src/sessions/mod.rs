//! Profile sessions: pick workers, write `command.json`, ring the doorbell, await
//! `results/{id}.{action}.json` with a timeout, aggregate, and keep finished sessions for a
//! bounded time, count and size.
//!
//! One session per worker at a time (a second one gets a 409 naming the holder). Every session
//! that starts tracing is written to a journal in the runtime directory and removed when it
//! ends, so a sidecar that restarts mid-session finds the tracing its predecessor left behind,
//! stops it and reports the session as `orphaned` ([`Sessions::recover_orphans`]).
//!
//! # Layout
//! - `table`: the session table, which worker is held, retention (age, count, bytes). Pure.
//! - `select`: request validation and worker selection. Pure.
//! - `machine`: the state machine (exchange, heap diff, stacks, late answers, recovery),
//!   written against the `workers::Workers` trait.
//! - `workers`: that trait and its real implementation over `/proc` and the runtime directory.
//! - `journal`: the journal of running sessions.

mod journal;
mod machine;
mod select;
mod table;
mod workers;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkscope_protocol::RuntimeDir;
use prometheus::IntCounterVec;

use crate::api::{
    ProfileKind, ProfileRequest, Session, SessionList, SessionState, WorkerRun, WorkerState,
};
use crate::discovery::{ProcSource, ProcessKey};
use crate::error::ApiError;

use journal::{Journal, JournalEntry};
use table::{Control, Retention, Table};
use workers::{ProcWorkers, Workers};

/// The largest result file the sidecar reads: the protocol's bound, which the server keeps
/// every result within (a heap diff too large keeps its highest-ranked sites that fit).
pub const MAX_RESULT_BYTES: u64 = forkscope_protocol::result::MAX_RESULT_BYTES;

/// Tunables of the session manager.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// How long a worker may take to answer one command.
    pub result_timeout: Duration,
    /// How long a heap diff without a duration may trace when the request names no timeout.
    pub default_trace_timeout: Duration,
    /// How many finished sessions are kept.
    pub max_finished: usize,
    /// How long finished sessions are kept.
    pub retention: Duration,
    /// How many bytes of worker results the finished sessions may keep together (the oldest
    /// finished sessions are dropped first).
    pub max_retained_bytes: u64,
    /// How long a worker that did not answer in time is watched for its late answer (and kept
    /// from new sessions), so tracing it starts or keeps late is stopped.
    pub linger: Duration,
    /// How often result files and worker liveness are polled.
    pub poll_interval: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            result_timeout: Duration::from_secs(10),
            default_trace_timeout: Duration::from_secs(3600),
            max_finished: 100,
            retention: Duration::from_secs(3600),
            max_retained_bytes: 256 * 1024 * 1024,
            linger: Duration::from_secs(600),
            poll_interval: Duration::from_millis(20),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The session manager, shared by the routes (cheap to clone).
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    table: Mutex<Table>,
    workers: Arc<dyn Workers>,
    journal: Journal,
    limits: SessionLimits,
    outcomes: IntCounterVec,
    ids: AtomicU64,
    seed: u64,
    recovered: AtomicBool,
}

impl Sessions {
    /// A manager over `runtime` that finds workers with `source` and counts final sessions by
    /// outcome in `outcomes` (label `outcome`).
    pub fn new(
        source: ProcSource,
        runtime: RuntimeDir,
        limits: SessionLimits,
        outcomes: IntCounterVec,
    ) -> Self {
        let journal = Journal::new(runtime.root().join("sidecar").join("sessions"));
        Self::with_workers(
            Arc::new(ProcWorkers { source, runtime }),
            journal,
            limits,
            outcomes,
        )
    }

    /// A manager over any implementation of "the workers" (a fake in unit tests).
    fn with_workers(
        workers: Arc<dyn Workers>,
        journal: Journal,
        limits: SessionLimits,
        outcomes: IntCounterVec,
    ) -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::default()),
                workers,
                journal,
                limits,
                outcomes,
                ids: AtomicU64::new(0),
                seed,
                recovered: AtomicBool::new(false),
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table, with finished sessions past their retention dropped.
    fn pruned(&self) -> MutexGuard<'_, Table> {
        let limits = &self.inner.limits;
        let mut table = self.table();
        table.prune(
            Instant::now(),
            Retention {
                age: limits.retention,
                count: limits.max_finished,
                bytes: limits.max_retained_bytes,
            },
        );
        table
    }

    fn new_id(&self) -> String {
        let n = self.inner.ids.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write_u64(self.inner.seed);
        h.write_u64(n);
        h.write_u32(std::process::id());
        format!("fs-{:016x}", h.finish())
    }

    /// True once orphan recovery after start-up has finished.
    pub fn recovered(&self) -> bool {
        self.inner.recovered.load(Ordering::Acquire)
    }

    /// Every running session and the retained finished ones, oldest first, without the
    /// workers' result payloads (a listing stays small; `get` has them).
    pub fn list(&self) -> SessionList {
        let table = self.pruned();
        let mut sessions: Vec<Session> = table
            .entries()
            .map(|e| {
                let s = &e.session;
                Session {
                    id: s.id.clone(),
                    state: s.state,
                    request: s.request.clone(),
                    leader_pid: s.leader_pid,
                    created_at: s.created_at,
                    finished_at: s.finished_at,
                    deadline_at: s.deadline_at,
                    error: s.error.clone(),
                    workers: s
                        .workers
                        .iter()
                        .map(|w| WorkerRun {
                            pid: w.pid,
                            start_ticks: w.start_ticks,
                            slot: w.slot,
                            state: w.state,
                            error: w.error.clone(),
                            result: None,
                        })
                        .collect(),
                    summary: s.summary.clone(),
                }
            })
            .collect();
        drop(table);
        sessions.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        SessionList { sessions }
    }

    /// One session.
    ///
    /// # Errors
    /// 404 when unknown or no longer retained.
    pub fn get(&self, id: &str) -> Result<Session, ApiError> {
        self.pruned()
            .get(id)
            .map(|e| e.session.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no profile session {id:?}")))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Session)) {
        if let Some(entry) = self.table().get_mut(id) {
            f(&mut entry.session);
        }
    }

    fn set_worker(&self, id: &str, key: ProcessKey, f: impl FnOnce(&mut WorkerRun)) {
        self.update(id, |s| {
            if let Some(w) = s.workers.iter_mut().find(|w| table::key(w) == key) {
                f(w);
            }
        });
    }

    /// Validates `req`, picks the workers, reserves them and starts the session in the
    /// background. The answer is the session in state `starting`.
    ///
    /// # Errors
    /// 400 for out-of-range fields, 422 for an unknown leader or slot or a gunicorn leader, 409
    /// when a worker is held by another session (or still owes an earlier one an answer), 500
    /// when the journal cannot be written.
    pub async fn start(&self, req: ProfileRequest) -> Result<Session, ApiError> {
        select::validate(&req)?;
        let pss = matches!(req.targets, crate::api::Targets::TopPss { .. });
        let candidates = self.inner.workers.candidates(pss).await;
        let chosen = select::select(&req, &candidates)?;
        let id = self.new_id();
        let now = unix_now();
        let session = Session {
            id: id.clone(),
            state: SessionState::Starting,
            request: req.clone(),
            leader_pid: chosen.leader_pid,
            created_at: now,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: chosen
                .workers
                .iter()
                .map(|(k, slot)| WorkerRun {
                    pid: k.pid,
                    start_ticks: k.start_ticks,
                    slot: Some(*slot),
                    state: WorkerState::Pending,
                    error: None,
                    result: None,
                })
                .collect(),
            summary: None,
        };
        let keys: Vec<ProcessKey> = chosen.workers.iter().map(|(k, _)| *k).collect();
        let control = Arc::new(Control::default());
        {
            let mut table = self.pruned();
            if let Some(held) = table.held(&keys) {
                let reason = if held.lingering {
                    format!(
                        "worker {} has not answered profile session {} yet",
                        held.pid, held.holder
                    )
                } else {
                    format!(
                        "worker {} is held by profile session {}",
                        held.pid, held.holder
                    )
                };
                return Err(ApiError::Conflict {
                    reason,
                    holder: Some(held.holder),
                });
            }
            table.insert(session.clone(), control.clone());
        }
        if req.kind == ProfileKind::HeapDiff {
            let entry = JournalEntry {
                id: id.clone(),
                leader_pid: chosen.leader_pid,
                created_at: now,
                request: req.clone(),
                workers: chosen
                    .workers
                    .iter()
                    .map(|(k, s)| (k.pid, k.start_ticks, Some(*s)))
                    .collect(),
            };
            if let Err(e) = self.inner.journal.write(entry).await {
                self.finish(&id, SessionState::Failed, Some(format!("journal: {e}")))
                    .await;
                return Err(ApiError::Internal(format!(
                    "cannot write the session journal in {}: {e}",
                    self.inner.journal.dir().display()
                )));
            }
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.run(id, req, keys, control).await;
        });
        Ok(session)
    }

    /// Asks a tracing heap-diff session to capture now.
    ///
    /// # Errors
    /// 404 unknown session; 409 when it is not a heap diff that is tracing.
    pub fn capture(&self, id: &str) -> Result<Session, ApiError> {
        let table = self.table();
        let entry = table
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("no profile session {id:?}")))?;
        if entry.session.request.kind != ProfileKind::HeapDiff
            || !matches!(
                entry.session.state,
                SessionState::Starting | SessionState::Tracing
            )
        {
            return Err(ApiError::Conflict {
                reason: format!(
                    "session {id} is a {} session in state {}: only a tracing heap diff can be captured",
                    match entry.session.request.kind {
                        ProfileKind::HeapDiff => "heap_diff",
                        ProfileKind::Stacks => "stacks",
                    },
                    entry.session.state.as_str()
                ),
                holder: None,
            });
        }
        entry.control.capture.notify_one();
        Ok(entry.session.clone())
    }

    /// Cancels a session: tracing stops in every worker. Waits (bounded) for the workers to
    /// answer and returns the final session; a session already finished is returned as is.
    ///
    /// # Errors
    /// 404 unknown session.
    pub async fn cancel(&self, id: &str) -> Result<Session, ApiError> {
        let control = {
            let table = self.table();
            let entry = table
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("no profile session {id:?}")))?;
            if entry.session.state.is_final() {
                return Ok(entry.session.clone());
            }
            entry.control.clone()
        };
        let done = control.done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.get(id)?.state.is_final() {
            return self.get(id);
        }
        control.cancel.notify_one();
        let wait = self.inner.limits.result_timeout * 2 + Duration::from_secs(1);
        let _ = tokio::time::timeout(wait, done).await;
        self.get(id)
    }

    /// Cancels every running session (at shutdown), so no worker keeps tracing after the
    /// sidecar is gone, then waits for workers that still owe a late answer; bounded by the
    /// result timeout.
    pub async fn cancel_all(&self) {
        let running: Vec<String> = self
            .table()
            .entries()
            .filter(|e| !e.session.state.is_final())
            .map(|e| e.session.id.clone())
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for id in running {
            let this = self.clone();
            set.spawn(async move {
                let _ = this.cancel(&id).await;
            });
        }
        while set.join_next().await.is_some() {}
        let deadline = tokio::time::Instant::now() + self.inner.limits.result_timeout;
        while self.table().lingering() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(self.inner.limits.poll_interval).await;
        }
    }

    /// Ends a session: final state, busy workers released, journal removed, outcome counted.
    async fn finish(&self, id: &str, state: SessionState, error: Option<String>) {
        let control = {
            let mut table = self.table();
            let Some(entry) = table.finish(id, Instant::now()) else {
                return;
            };
            entry.session.state = state;
            entry.session.finished_at = Some(unix_now());
            if error.is_some() {
                entry.session.error = error;
            }
            entry.control.clone()
        };
        self.inner.journal.remove(id).await;
        self.inner
            .outcomes
            .with_label_values(&[state.as_str()])
            .inc();
        control.done.notify_waiters();
        tracing::info!(
            session = id,
            outcome = state.as_str(),
            "profile session finished"
        );
    }

    /// Finds the sessions an earlier sidecar process left in the journal, stops the tracing
    /// they left in workers that still run, and records them as `orphaned`.
    pub async fn recover_orphans(&self) {
        for entry in self.inner.journal.entries().await {
            self.recover_one(entry).await;
        }
        self.inner.recovered.store(true, Ordering::Release);
    }
}
