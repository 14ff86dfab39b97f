//! Profile sessions: pick workers, write `command.json`, ring the doorbell, await
//! `results/{id}.{action}.json` with a timeout, aggregate, and keep finished sessions for a
//! bounded time and count.
//!
//! One session per worker at a time (a second one gets a 409 naming the holder). Every session
//! that starts tracing is written to a journal in the runtime directory
//! (`{runtime_dir}/sidecar/sessions/{id}.json`) and removed when it ends, so a sidecar that
//! restarts mid-session finds the tracing its predecessor left behind, stops it and reports the
//! session as `orphaned` ([`Sessions::recover_orphans`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forkscope_protocol::{
    Action, Command, CommandResult, FORMAT_VERSION, Outcome, RuntimeDir, read_json_limited,
    write_json_atomic,
};
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use forkscope_protocol::command::{MAX_FRAMES, MAX_TARGET_WORKERS, MAX_TOP};

use crate::api::{
    ProfileKind, ProfileRequest, Session, SessionList, SessionState, Targets, WorkerRun,
    WorkerState,
};
use crate::discovery::{ProcSource, ProcessKey};
use crate::error::ApiError;
use crate::signals::{self, Signal, SignalError};
use crate::summary::summarize;

/// The largest result file the sidecar reads (a heap diff of 10000 sites with deep tracebacks
/// fits comfortably).
pub const MAX_RESULT_BYTES: u64 = 32 * 1024 * 1024;

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

/// What a journal entry remembers of a running session.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct JournalEntry {
    id: String,
    leader_pid: u32,
    created_at: f64,
    request: ProfileRequest,
    workers: Vec<(u32, u64, Option<u32>)>,
}

/// Wakes a running session's task.
#[derive(Debug, Default)]
struct Control {
    capture: Notify,
    cancel: Notify,
    done: Notify,
}

struct Entry {
    session: Session,
    control: Arc<Control>,
    finished: Option<Instant>,
}

#[derive(Default)]
struct Table {
    sessions: BTreeMap<String, Entry>,
    /// Which session holds which worker.
    busy: HashMap<ProcessKey, String>,
}

/// The session manager, shared by the routes (cheap to clone).
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    table: Mutex<Table>,
    source: ProcSource,
    runtime: RuntimeDir,
    limits: SessionLimits,
    outcomes: IntCounterVec,
    ids: AtomicU64,
    seed: u64,
    recovered: std::sync::atomic::AtomicBool,
}

/// Why one command to one worker did not produce its result.
#[derive(Debug)]
enum ExchangeError {
    /// The worker exited; `result` is its exit result when it wrote one.
    Exited {
        reason: String,
        result: Option<Box<CommandResult>>,
    },
    /// The worker answered with an error, or the files failed.
    Failed(String),
    /// No answer in time; the worker was left a `stop` for its pending ring.
    TimedOut(String),
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
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::default()),
                source,
                runtime,
                limits,
                outcomes,
                ids: AtomicU64::new(0),
                seed,
                recovered: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn journal_dir(&self) -> PathBuf {
        self.inner.runtime.root().join("sidecar").join("sessions")
    }

    fn journal_path(&self, id: &str) -> PathBuf {
        self.journal_dir().join(format!("{id}.json"))
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

    /// Drops finished sessions beyond the retention time and count.
    fn prune(table: &mut Table, limits: &SessionLimits) {
        let now = Instant::now();
        table.sessions.retain(|_, e| {
            e.finished
                .is_none_or(|t| now.duration_since(t) < limits.retention)
        });
        let mut finished: Vec<(Instant, String)> = table
            .sessions
            .iter()
            .filter_map(|(id, e)| e.finished.map(|t| (t, id.clone())))
            .collect();
        if finished.len() > limits.max_finished {
            finished.sort();
            let excess = finished.len() - limits.max_finished;
            for (_, id) in finished.into_iter().take(excess) {
                table.sessions.remove(&id);
            }
        }
    }

    /// Every running session and the retained finished ones, oldest first, without the
    /// workers' result payloads (a listing stays small; `get` has them).
    pub fn list(&self) -> SessionList {
        let mut table = self.table();
        Self::prune(&mut table, &self.inner.limits);
        let mut sessions: Vec<Session> = table
            .sessions
            .values()
            .map(|e| {
                let mut s = e.session.clone();
                for w in &mut s.workers {
                    w.result = None;
                }
                s
            })
            .collect();
        sessions.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        SessionList { sessions }
    }

    /// One session.
    ///
    /// # Errors
    /// 404 when unknown or no longer retained.
    pub fn get(&self, id: &str) -> Result<Session, ApiError> {
        let mut table = self.table();
        Self::prune(&mut table, &self.inner.limits);
        table
            .sessions
            .get(id)
            .map(|e| e.session.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no profile session {id:?}")))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Session)) {
        if let Some(entry) = self.table().sessions.get_mut(id) {
            f(&mut entry.session);
        }
    }

    fn set_worker(&self, id: &str, key: ProcessKey, f: impl FnOnce(&mut WorkerRun)) {
        self.update(id, |s| {
            if let Some(w) = s
                .workers
                .iter_mut()
                .find(|w| w.pid == key.pid && w.start_ticks == key.start_ticks)
            {
                f(w);
            }
        });
    }

    /// Validates `req`, picks the workers, reserves them and starts the session in the
    /// background. The answer is the session in state `starting`.
    ///
    /// # Errors
    /// 400 for out-of-range fields, 422 for an unknown leader or slot or a gunicorn leader, 409
    /// when a worker is held by another session.
    pub fn start(&self, req: ProfileRequest) -> Result<Session, ApiError> {
        validate(&req)?;
        let snap = self.inner.source.scan();
        let forkscope: Vec<_> = snap
            .leaders
            .iter()
            .filter(|l| l.server == crate::api::ServerKind::Forkscope)
            .collect();
        let leader = match req.leader_pid {
            Some(pid) => {
                let l = snap.leader(pid).ok_or_else(|| {
                    ApiError::NotAWorker(format!("process {pid} is not a discovered leader"))
                })?;
                if l.server != crate::api::ServerKind::Forkscope {
                    return Err(ApiError::Unprocessable(format!(
                        "leader {pid} is {}: only forkscope-server workers have a profiler",
                        l.server.as_str()
                    )));
                }
                l
            }
            None => match forkscope.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ApiError::Unprocessable(
                        "no forkscope-server leader found in this pod".into(),
                    ));
                }
                _ => {
                    return Err(ApiError::Unprocessable(
                        "several forkscope-server leaders: name one with leader_pid".into(),
                    ));
                }
            },
        };
        let mut chosen: Vec<(ProcessKey, u32)> = match &req.targets {
            Targets::All => leader
                .workers
                .iter()
                .map(|w| (w.process.key, w.slot))
                .collect(),
            Targets::Slots { slots } => {
                let mut out = Vec::new();
                for slot in slots {
                    let found: Vec<_> = leader.workers.iter().filter(|w| w.slot == *slot).collect();
                    if found.is_empty() {
                        return Err(ApiError::Unprocessable(format!(
                            "leader {} has no worker in slot {slot}",
                            leader.leader.key.pid
                        )));
                    }
                    out.extend(found.iter().map(|w| (w.process.key, w.slot)));
                }
                out.sort();
                out.dedup();
                out
            }
            Targets::TopPss { count } => {
                let mut by_pss: Vec<(u64, ProcessKey, u32)> = leader
                    .workers
                    .iter()
                    .filter_map(|w| {
                        let m = self.inner.source.memory(w.process.key)?;
                        Some((m.pss_bytes, w.process.key, w.slot))
                    })
                    .collect();
                by_pss.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
                by_pss
                    .into_iter()
                    .take(*count as usize)
                    .map(|(_, k, s)| (k, s))
                    .collect()
            }
        };
        chosen.sort_by_key(|(k, slot)| (*slot, k.pid));
        if chosen.is_empty() {
            return Err(ApiError::Unprocessable(format!(
                "leader {} has no workers to profile",
                leader.leader.key.pid
            )));
        }
        let id = self.new_id();
        let now = unix_now();
        let session = Session {
            id: id.clone(),
            state: SessionState::Starting,
            request: req.clone(),
            leader_pid: leader.leader.key.pid,
            created_at: now,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: chosen
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
        let control = Arc::new(Control::default());
        {
            let mut table = self.table();
            Self::prune(&mut table, &self.inner.limits);
            if let Some((key, holder)) = chosen
                .iter()
                .find_map(|(k, _)| table.busy.get(k).map(|h| (k, h.clone())))
            {
                return Err(ApiError::Conflict {
                    reason: format!("worker {} is held by profile session {holder}", key.pid),
                    holder: Some(holder),
                });
            }
            for (k, _) in &chosen {
                table.busy.insert(*k, id.clone());
            }
            table.sessions.insert(
                id.clone(),
                Entry {
                    session: session.clone(),
                    control: control.clone(),
                    finished: None,
                },
            );
        }
        if req.kind == ProfileKind::HeapDiff {
            let journal = JournalEntry {
                id: id.clone(),
                leader_pid: session.leader_pid,
                created_at: now,
                request: req.clone(),
                workers: chosen
                    .iter()
                    .map(|(k, s)| (k.pid, k.start_ticks, Some(*s)))
                    .collect(),
            };
            let written = std::fs::create_dir_all(self.journal_dir())
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    write_json_atomic(&self.journal_path(&id), &journal).map_err(|e| e.to_string())
                });
            if let Err(e) = written {
                self.finish(&id, SessionState::Failed, Some(format!("journal: {e}")));
                return Err(ApiError::Internal(format!(
                    "cannot write the session journal in {}: {e}",
                    self.journal_dir().display()
                )));
            }
        }
        let this = self.clone();
        let workers: Vec<ProcessKey> = chosen.iter().map(|(k, _)| *k).collect();
        tokio::spawn(async move {
            this.run(id, req, workers, control).await;
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
            .sessions
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
                .sessions
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
    /// sidecar is gone; bounded by the result timeout per session.
    pub async fn cancel_all(&self) {
        let running: Vec<String> = self
            .table()
            .sessions
            .iter()
            .filter(|(_, e)| !e.session.state.is_final())
            .map(|(id, _)| id.clone())
            .collect();
        let mut set = tokio::task::JoinSet::new();
        for id in running {
            let this = self.clone();
            set.spawn(async move {
                let _ = this.cancel(&id).await;
            });
        }
        while set.join_next().await.is_some() {}
    }

    /// Ends a session: final state, busy workers released, journal removed, outcome counted.
    fn finish(&self, id: &str, state: SessionState, error: Option<String>) {
        let control = {
            let mut table = self.table();
            let Some(entry) = table.sessions.get_mut(id) else {
                return;
            };
            entry.session.state = state;
            entry.session.finished_at = Some(unix_now());
            if error.is_some() {
                entry.session.error = error;
            }
            entry.finished = Some(Instant::now());
            let control = entry.control.clone();
            table.busy.retain(|_, holder| holder != id);
            control
        };
        let _ = std::fs::remove_file(self.journal_path(id));
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

    async fn run(
        &self,
        id: String,
        req: ProfileRequest,
        workers: Vec<ProcessKey>,
        control: Arc<Control>,
    ) {
        match req.kind {
            ProfileKind::Stacks => self.run_stacks(&id, &workers).await,
            ProfileKind::HeapDiff => self.run_heap_diff(&id, &req, &workers, &control).await,
        }
    }

    async fn run_stacks(&self, id: &str, workers: &[ProcessKey]) {
        let cmd = Command::new(id, Action::Stacks);
        let results = self.exchange_all(workers, &cmd).await;
        let mut any = false;
        for (key, result) in results {
            match result {
                Ok(r) => {
                    any = true;
                    self.set_worker(id, key, |w| {
                        w.state = WorkerState::Done;
                        w.result = Some(r);
                    });
                }
                Err(e) => self.record_failure(id, key, e),
            }
        }
        let state = if any {
            SessionState::Completed
        } else {
            SessionState::Failed
        };
        let error = (!any).then(|| "no worker answered".to_owned());
        self.finish(id, state, error);
    }

    fn record_failure(&self, id: &str, key: ProcessKey, e: ExchangeError) {
        self.set_worker(id, key, |w| match e {
            ExchangeError::Exited { reason, result } => {
                w.state = WorkerState::Exited;
                w.error = Some(reason);
                if result.is_some() {
                    w.result = result.map(|r| *r);
                }
            }
            ExchangeError::Failed(reason) | ExchangeError::TimedOut(reason) => {
                w.state = WorkerState::Failed;
                w.error = Some(reason);
            }
        });
    }

    async fn run_heap_diff(
        &self,
        id: &str,
        req: &ProfileRequest,
        workers: &[ProcessKey],
        control: &Control,
    ) {
        let mut start = Command::new(id, Action::Start);
        start.frames = req.frames;
        let mut tracing: Vec<ProcessKey> = Vec::new();
        for (key, result) in self.exchange_all(workers, &start).await {
            match result {
                Ok(_) => {
                    tracing.push(key);
                    self.set_worker(id, key, |w| w.state = WorkerState::Tracing);
                }
                Err(e) => self.record_failure(id, key, e),
            }
        }
        if tracing.is_empty() {
            self.finish(
                id,
                SessionState::Failed,
                Some("tracing did not start in any worker".into()),
            );
            return;
        }
        let limit = match (req.duration_seconds, req.timeout_seconds) {
            (Some(d), _) => Duration::from_secs_f64(d),
            (None, Some(t)) => Duration::from_secs_f64(t),
            (None, None) => self.inner.limits.default_trace_timeout,
        };
        let explicit = req.duration_seconds.is_none();
        self.update(id, |s| {
            s.state = SessionState::Tracing;
            if explicit {
                s.deadline_at = Some(unix_now() + limit.as_secs_f64());
            }
        });
        // Wait for the duration, a capture call, a cancel or the timeout.
        enum Next {
            Capture,
            Cancel,
            Timeout,
        }
        let next = tokio::select! {
            () = tokio::time::sleep(limit) => if explicit { Next::Timeout } else { Next::Capture },
            () = control.capture.notified() => Next::Capture,
            () = control.cancel.notified() => Next::Cancel,
        };
        let stop = Command::new(id, Action::Stop);
        match next {
            Next::Capture => {
                self.update(id, |s| s.state = SessionState::Capturing);
                let mut capture = Command::new(id, Action::Capture);
                capture.top = req.top;
                capture.group_by = req.group_by;
                // Tracing goes on after a capture: it is stopped wherever it may still run, i.e.
                // every worker but those that exited or were left a stop after a timeout.
                let mut still_tracing: Vec<ProcessKey> = Vec::new();
                for (key, result) in self.exchange_all(&tracing, &capture).await {
                    match result {
                        Ok(r) => {
                            still_tracing.push(key);
                            self.set_worker(id, key, |w| {
                                w.state = WorkerState::Done;
                                w.result = Some(r);
                            });
                        }
                        Err(e @ ExchangeError::Failed(_)) => {
                            still_tracing.push(key);
                            self.record_failure(id, key, e);
                        }
                        Err(e) => self.record_failure(id, key, e),
                    }
                }
                for (key, result) in self.exchange_all(&still_tracing, &stop).await {
                    if let Err(e) = result {
                        tracing::warn!(session = id, pid = key.pid, "stop after capture: {e:?}");
                    }
                }
                let summary = {
                    let table = self.table();
                    table.sessions.get(id).map(|e| {
                        summarize(
                            e.session.workers.iter().filter_map(|w| match &w.result {
                                Some(CommandResult {
                                    outcome: Outcome::HeapDiff(d),
                                    ..
                                }) => Some(d),
                                _ => None,
                            }),
                            req.top as usize,
                        )
                    })
                };
                let any = summary.as_ref().is_some_and(|s| s.workers > 0);
                self.update(id, |s| s.summary = summary);
                if any {
                    self.finish(id, SessionState::Completed, None);
                } else {
                    self.finish(
                        id,
                        SessionState::Failed,
                        Some("no worker delivered a heap diff".into()),
                    );
                }
            }
            Next::Cancel | Next::Timeout => {
                self.stop_workers(id, &tracing, &stop).await;
                let (state, why) = match next {
                    Next::Timeout => (
                        SessionState::TimedOut,
                        Some(format!(
                            "no capture within {:.0} s: tracing stopped",
                            limit.as_secs_f64()
                        )),
                    ),
                    _ => (SessionState::Cancelled, None),
                };
                self.finish(id, state, why);
            }
        }
    }

    async fn stop_workers(&self, id: &str, workers: &[ProcessKey], stop: &Command) {
        for (key, result) in self.exchange_all(workers, stop).await {
            match result {
                Ok(_) => self.set_worker(id, key, |w| w.state = WorkerState::Stopped),
                Err(e) => self.record_failure(id, key, e),
            }
        }
    }

    /// Sends `cmd` to every worker at once and collects the answers.
    async fn exchange_all(
        &self,
        workers: &[ProcessKey],
        cmd: &Command,
    ) -> Vec<(ProcessKey, Result<CommandResult, ExchangeError>)> {
        let mut set = tokio::task::JoinSet::new();
        for key in workers {
            let this = self.clone();
            let cmd = cmd.clone();
            let key = *key;
            set.spawn(async move { (key, this.exchange(key, &cmd).await) });
        }
        let mut out = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(pair) => out.push(pair),
                Err(e) => tracing::error!("worker exchange task failed: {e}"),
            }
        }
        out.sort_by_key(|(k, _)| k.pid);
        out
    }

    /// One command to one worker: write the command file, ring, await the result.
    async fn exchange(
        &self,
        key: ProcessKey,
        cmd: &Command,
    ) -> Result<CommandResult, ExchangeError> {
        let runtime = &self.inner.runtime;
        let source = &self.inner.source;
        let dir = runtime.process_dir(key.pid);
        let exit_path = runtime.result(key.pid, &cmd.request_id, Action::Exit);
        if source.lookup(key).is_none() {
            // The leader removes a dead worker's folder unless it holds results.
            return Err(self.exited(key, &exit_path));
        }
        if !dir.is_dir() {
            return Err(ExchangeError::Failed(format!(
                "{} does not exist: is the runtime directory shared with the server (same --runtime-dir)?",
                dir.display()
            )));
        }
        let result_path = runtime.result(key.pid, &cmd.request_id, cmd.action);
        let _ = std::fs::remove_file(&result_path);
        let command_path = runtime.command(key.pid);
        if let Err(e) = write_json_atomic(&command_path, cmd) {
            return Err(ExchangeError::Failed(format!("writing the command: {e}")));
        }
        match signals::send(source, key, Signal::Usr2) {
            Ok(()) => {}
            Err(SignalError::Gone(_)) => {
                let _ = std::fs::remove_file(&command_path);
                return Err(self.exited(key, &exit_path));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&command_path);
                return Err(ExchangeError::Failed(e.to_string()));
            }
        }
        let deadline = Instant::now() + self.inner.limits.result_timeout;
        loop {
            if result_path.exists() {
                return self.collect(key, cmd, &result_path);
            }
            if source.lookup(key).is_none() {
                // It may have written the result just before exiting.
                if result_path.exists() {
                    return self.collect(key, cmd, &result_path);
                }
                return Err(self.exited(key, &exit_path));
            }
            if Instant::now() >= deadline {
                // The doorbell is still pending in the worker (stopped, or stuck outside Python).
                // Leave it a `stop` to find when it wakes: removing the file would make the late
                // ring a bare toggle that starts tracing, and keeping `start` or `capture` would
                // leave it tracing with nobody to stop it.
                let mut late = Command::new(cmd.request_id.clone(), Action::Stop);
                late.frames = cmd.frames;
                if write_json_atomic(&command_path, &late).is_err() {
                    let _ = std::fs::remove_file(&command_path);
                }
                return Err(ExchangeError::TimedOut(format!(
                    "no {} result within {:.1} s",
                    cmd.action.as_str(),
                    self.inner.limits.result_timeout.as_secs_f64()
                )));
            }
            tokio::time::sleep(self.inner.limits.poll_interval).await;
        }
    }

    /// Reads, checks and removes a result file.
    fn collect(
        &self,
        key: ProcessKey,
        cmd: &Command,
        path: &std::path::Path,
    ) -> Result<CommandResult, ExchangeError> {
        let read = read_json_limited::<CommandResult>(path, MAX_RESULT_BYTES);
        let _ = std::fs::remove_file(path);
        let result = read.map_err(|e| ExchangeError::Failed(format!("unreadable result: {e}")))?;
        if result.version != FORMAT_VERSION
            || result.request_id != cmd.request_id
            || result.action != cmd.action
            || result.pid != key.pid
        {
            return Err(ExchangeError::Failed(format!(
                "result file {} does not answer this command",
                path.display()
            )));
        }
        match &result.outcome {
            Outcome::Error { reason } => Err(ExchangeError::Failed(format!(
                "worker refused {}: {reason}",
                cmd.action.as_str()
            ))),
            Outcome::ExitedWhileTracing { reason } => Err(ExchangeError::Exited {
                reason: reason.clone(),
                result: Some(Box::new(result.clone())),
            }),
            _ => Ok(result),
        }
    }

    fn exited(&self, key: ProcessKey, exit_path: &std::path::Path) -> ExchangeError {
        let result = read_json_limited::<CommandResult>(exit_path, MAX_RESULT_BYTES).ok();
        let _ = std::fs::remove_file(exit_path);
        let reason = match &result {
            Some(CommandResult {
                outcome: Outcome::ExitedWhileTracing { reason },
                ..
            }) => format!("worker {} exited while tracing: {reason}", key.pid),
            _ => format!("worker {} exited (killed?) without a result", key.pid),
        };
        ExchangeError::Exited {
            reason,
            result: result.map(Box::new),
        }
    }

    /// Finds the sessions an earlier sidecar process left in the journal, stops the tracing
    /// they left in workers that still run, and records them as `orphaned`.
    pub async fn recover_orphans(&self) {
        let entries = match std::fs::read_dir(self.journal_dir()) {
            Ok(e) => e,
            Err(_) => {
                self.inner.recovered.store(true, Ordering::Release);
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let journal: JournalEntry = match read_json_limited(&path, 1024 * 1024) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!("unreadable session journal: {e}");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if !forkscope_protocol::command::valid_request_id(&journal.id) {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            self.recover_one(journal).await;
        }
        self.inner.recovered.store(true, Ordering::Release);
    }

    async fn recover_one(&self, journal: JournalEntry) {
        let id = journal.id.clone();
        tracing::warn!(session = %id, "found a session left by an earlier sidecar: stopping its tracing");
        let control = Arc::new(Control::default());
        let workers: Vec<(ProcessKey, Option<u32>)> = journal
            .workers
            .iter()
            .map(|(pid, ticks, slot)| {
                (
                    ProcessKey {
                        pid: *pid,
                        start_ticks: *ticks,
                    },
                    *slot,
                )
            })
            .collect();
        let session = Session {
            id: id.clone(),
            state: SessionState::Capturing,
            request: journal.request.clone(),
            leader_pid: journal.leader_pid,
            created_at: journal.created_at,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: workers
                .iter()
                .map(|(k, slot)| WorkerRun {
                    pid: k.pid,
                    start_ticks: k.start_ticks,
                    slot: *slot,
                    state: WorkerState::Pending,
                    error: None,
                    result: None,
                })
                .collect(),
            summary: None,
        };
        {
            let mut table = self.table();
            for (k, _) in &workers {
                table.busy.insert(*k, id.clone());
            }
            table.sessions.insert(
                id.clone(),
                Entry {
                    session,
                    control,
                    finished: None,
                },
            );
        }
        // Only processes discovered as forkscope-server workers right now are rung: the
        // journal is a file, not a licence to signal whatever PID it names.
        let snap = self.inner.source.scan();
        let alive: Vec<ProcessKey> = workers
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| {
                snap.worker(k.pid).is_some_and(|(l, w)| {
                    l.server == crate::api::ServerKind::Forkscope && w.process.key == *k
                })
            })
            .collect();
        for (k, _) in &workers {
            if alive.contains(k) {
                // Rung below.
            } else if self.inner.source.lookup(*k).is_some() {
                self.record_failure(
                    &id,
                    *k,
                    ExchangeError::Failed(format!(
                        "process {} is not a forkscope-server worker now: not signalled",
                        k.pid
                    )),
                );
            } else {
                // Collect what it may have written at exit, then forget it.
                let exit = self.inner.runtime.result(k.pid, &id, Action::Exit);
                let e = self.exited(*k, &exit);
                self.record_failure(&id, *k, e);
            }
            for action in [Action::Start, Action::Capture, Action::Stop] {
                let _ = std::fs::remove_file(self.inner.runtime.result(k.pid, &id, action));
            }
        }
        let stop = Command::new(&id, Action::Stop);
        self.stop_workers(&id, &alive, &stop).await;
        self.finish(
            &id,
            SessionState::Orphaned,
            Some(format!(
                "started by an earlier sidecar process that ended mid-session; tracing was stopped in {} live worker(s)",
                alive.len()
            )),
        );
    }
}

/// Checks every field of a profile request against its documented range.
fn validate(req: &ProfileRequest) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::InvalidRequest(m));
    if !(1..=MAX_FRAMES).contains(&req.frames) {
        return bad(format!(
            "frames must be 1..={MAX_FRAMES}, got {}",
            req.frames
        ));
    }
    if !(1..=MAX_TOP).contains(&req.top) {
        return bad(format!("top must be 1..={MAX_TOP}, got {}", req.top));
    }
    if let Some(d) = req.duration_seconds
        && !(0.1..=3600.0).contains(&d)
    {
        return bad(format!("duration_seconds must be 0.1..=3600, got {d}"));
    }
    if let Some(t) = req.timeout_seconds
        && !(1.0..=86400.0).contains(&t)
    {
        return bad(format!("timeout_seconds must be 1..=86400, got {t}"));
    }
    if let Some(owner) = &req.owner
        && (owner.len() > crate::api::MAX_OWNER_BYTES
            || !owner.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        return bad(format!(
            "owner must be printable ASCII of at most {} bytes",
            crate::api::MAX_OWNER_BYTES
        ));
    }
    match &req.targets {
        Targets::Slots { slots }
            if slots.is_empty() || slots.len() > MAX_TARGET_WORKERS as usize =>
        {
            bad(format!(
                "targets.slots must list 1..={MAX_TARGET_WORKERS} slots"
            ))
        }
        Targets::TopPss { count } if !(1..=MAX_TARGET_WORKERS).contains(count) => bad(format!(
            "targets.count must be 1..={MAX_TARGET_WORKERS}, got {count}"
        )),
        _ => Ok(()),
    }
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Exited { reason, .. }
            | ExchangeError::Failed(reason)
            | ExchangeError::TimedOut(reason) => f.write_str(reason),
        }
    }
}
