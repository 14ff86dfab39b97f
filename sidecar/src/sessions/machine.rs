//! The session state machine: one command to one worker (write the command, ring, await the
//! result or the worker's exit, with a timeout), heap diffs (start, trace, capture, stop),
//! stacks, workers that answer late, and orphan recovery. It sees the workers only through
//! [`Workers`], so its unit tests run against a fake on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use forkscope_protocol::{Action, Command, CommandResult, FORMAT_VERSION, HeapDiff, Outcome};
use tokio::time::Instant;

use super::journal::JournalEntry;
use super::table::Control;
use super::workers::{Answer, Now, RingError};
use super::{Sessions, unix_now};
use crate::api::{ProfileKind, ProfileRequest, Session, SessionState, WorkerRun, WorkerState};
use crate::discovery::ProcessKey;
use crate::summary::summarize;

/// Why one command to one worker did not produce its result.
#[derive(Debug)]
pub(super) enum ExchangeError {
    /// The worker exited; `result` is its exit result when it wrote one.
    Exited {
        reason: String,
        result: Option<Box<Answer>>,
    },
    /// The worker answered with an error, or the files failed.
    Failed(String),
    /// No answer in time; the worker is watched until it answers late (see `linger`).
    TimedOut(String),
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

/// Checks that a result answers `cmd` from worker `key`, and turns refusals into errors.
fn check(key: ProcessKey, cmd: &Command, answer: Answer) -> Result<Answer, ExchangeError> {
    let r = &answer.result;
    if r.version != FORMAT_VERSION
        || r.request_id != cmd.request_id
        || r.action != cmd.action
        || r.pid != key.pid
    {
        return Err(ExchangeError::Failed(format!(
            "the {} result of worker {} does not answer this command",
            cmd.action.as_str(),
            key.pid
        )));
    }
    match &r.outcome {
        Outcome::Error { reason } => Err(ExchangeError::Failed(format!(
            "worker refused {}: {reason}",
            cmd.action.as_str()
        ))),
        Outcome::ExitedWhileTracing { reason } => Err(ExchangeError::Exited {
            reason: reason.clone(),
            result: Some(Box::new(answer)),
        }),
        _ => Ok(answer),
    }
}

fn heap_diff(r: &CommandResult) -> Option<&HeapDiff> {
    match &r.outcome {
        Outcome::HeapDiff(d) => Some(d),
        _ => None,
    }
}

impl Sessions {
    pub(super) async fn run(
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

    /// Puts the answers of a session's workers into the table (without copying them) and
    /// counts their bytes against the retention budget.
    fn store(&self, id: &str, answers: Vec<(ProcessKey, Answer)>) {
        let mut table = self.table();
        let Some(entry) = table.get_mut(id) else {
            return;
        };
        for (key, answer) in answers {
            if let Some(w) = entry
                .session
                .workers
                .iter_mut()
                .find(|w| super::table::key(w) == key)
            {
                entry.bytes += answer.bytes;
                w.state = WorkerState::Done;
                w.result = Some(answer.result);
            }
        }
    }

    async fn run_stacks(&self, id: &str, workers: &[ProcessKey]) {
        let cmd = Command::new(id, Action::Stacks);
        let mut answers = Vec::new();
        for (key, result) in self.exchange_all(workers, &cmd).await {
            match result {
                Ok(a) => answers.push((key, a)),
                Err(e) => self.record_failure(id, key, e),
            }
        }
        let any = !answers.is_empty();
        self.store(id, answers);
        let (state, error) = if any {
            (SessionState::Completed, None)
        } else {
            (SessionState::Failed, Some("no worker answered".to_owned()))
        };
        self.finish(id, state, error).await;
    }

    fn record_failure(&self, id: &str, key: ProcessKey, e: ExchangeError) {
        let mut bytes = 0;
        self.set_worker(id, key, |w| match e {
            ExchangeError::Exited { reason, result } => {
                w.state = WorkerState::Exited;
                w.error = Some(reason);
                if let Some(a) = result {
                    bytes = a.bytes;
                    w.result = Some(a.result);
                }
            }
            ExchangeError::Failed(reason) | ExchangeError::TimedOut(reason) => {
                w.state = WorkerState::Failed;
                w.error = Some(reason);
            }
        });
        if let Some(entry) = self.table().get_mut(id) {
            entry.bytes += bytes;
        }
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
            )
            .await;
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
                // Tracing goes on after a capture: it is stopped wherever it may still run.
                // A worker that exited needs nothing, and one that timed out is stopped by
                // `linger` once it answers.
                let mut still_tracing: Vec<ProcessKey> = Vec::new();
                let mut answers = Vec::new();
                for (key, result) in self.exchange_all(&tracing, &capture).await {
                    match result {
                        Ok(a) => {
                            still_tracing.push(key);
                            answers.push((key, a));
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
                        tracing::warn!(session = id, pid = key.pid, "stop after capture: {e}");
                    }
                }
                // Summing large diffs takes a while: neither under the table's lock nor on
                // the runtime's threads.
                let top = req.top as usize;
                let (summary, answers) = tokio::task::spawn_blocking(move || {
                    let summary = summarize(
                        answers.iter().filter_map(|(_, a)| heap_diff(&a.result)),
                        top,
                    );
                    (summary, answers)
                })
                .await
                .expect("summarize does not panic on any heap diff");
                let any = summary.workers > 0;
                self.store(id, answers);
                self.update(id, |s| s.summary = Some(summary));
                if any {
                    self.finish(id, SessionState::Completed, None).await;
                } else {
                    self.finish(
                        id,
                        SessionState::Failed,
                        Some("no worker delivered a heap diff".into()),
                    )
                    .await;
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
                self.finish(id, state, why).await;
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

    /// Sends `cmd` to every worker at once and collects the answers, ordered by PID.
    async fn exchange_all(
        &self,
        workers: &[ProcessKey],
        cmd: &Command,
    ) -> Vec<(ProcessKey, Result<Answer, ExchangeError>)> {
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
    async fn exchange(&self, key: ProcessKey, cmd: &Command) -> Result<Answer, ExchangeError> {
        let workers = &self.inner.workers;
        let limits = &self.inner.limits;
        if !workers.alive(key).await {
            return Err(self.exited(key, &cmd.request_id).await);
        }
        workers
            .write_command(key, cmd)
            .await
            .map_err(ExchangeError::Failed)?;
        match workers.ring(key).await {
            Ok(()) => {}
            Err(RingError::Gone) => {
                workers.remove_command(key).await;
                return Err(self.exited(key, &cmd.request_id).await);
            }
            Err(RingError::Refused(e)) => {
                workers.remove_command(key).await;
                return Err(ExchangeError::Failed(e));
            }
        }
        let deadline = Instant::now() + limits.result_timeout;
        loop {
            if let Some(read) = workers.take_result(key, &cmd.request_id, cmd.action).await {
                return check(key, cmd, read.map_err(ExchangeError::Failed)?);
            }
            if !workers.alive(key).await {
                // It may have written the result just before exiting.
                if let Some(read) = workers.take_result(key, &cmd.request_id, cmd.action).await {
                    return check(key, cmd, read.map_err(ExchangeError::Failed)?);
                }
                return Err(self.exited(key, &cmd.request_id).await);
            }
            if Instant::now() >= deadline {
                self.linger(key, cmd).await;
                return Err(ExchangeError::TimedOut(format!(
                    "no {} result within {:.1} s",
                    cmd.action.as_str(),
                    limits.result_timeout.as_secs_f64()
                )));
            }
            tokio::time::sleep(limits.poll_interval).await;
        }
    }

    /// The worker did not answer `cmd` in time: its doorbell is still pending (a stopped
    /// process, or stuck outside Python), or it took the command and is still at it (a large
    /// capture). Either way it is left a `stop` (removing the file would make a pending ring
    /// a bare toggle that starts tracing) and watched, reserved, until it answers late: then
    /// the stop is rung if the worker may trace, so no worker is left tracing unwatched.
    async fn linger(&self, key: ProcessKey, cmd: &Command) {
        let workers = &self.inner.workers;
        if cmd.action != Action::Stop {
            let mut stop = Command::new(cmd.request_id.clone(), Action::Stop);
            stop.frames = cmd.frames;
            if workers.write_command(key, &stop).await.is_err() {
                workers.remove_command(key).await;
            }
        }
        self.table().linger(key, &cmd.request_id);
        let this = self.clone();
        let cmd = cmd.clone();
        tokio::spawn(async move {
            this.watch_late(key, &cmd).await;
            this.table().release(key);
        });
    }

    /// Waits (bounded by `SessionLimits::linger`) for the late answer of `cmd`.
    async fn watch_late(&self, key: ProcessKey, cmd: &Command) {
        let workers = &self.inner.workers;
        let limits = &self.inner.limits;
        let id = cmd.request_id.as_str();
        let deadline = Instant::now() + limits.linger;
        // The answer awaited: the late one of `cmd`, then the one of the stop rung after it.
        let mut awaited = cmd.action;
        loop {
            if awaited != Action::Stop
                && let Some(late) = workers.take_result(key, id, awaited).await
            {
                tracing::info!(
                    session = id,
                    pid = key.pid,
                    "late {} answer: {}",
                    awaited.as_str(),
                    match late {
                        Ok(_) => "collected".to_owned(),
                        Err(e) => e,
                    }
                );
                if !matches!(awaited, Action::Start | Action::Capture) {
                    // Nothing traces: the stop left for a pending ring is not needed now.
                    workers.remove_command(key).await;
                    return;
                }
                // The doorbell that took the command is spent, and the worker may trace.
                if !workers.command_waiting(key).await {
                    let stop = Command::new(id, Action::Stop);
                    if workers.write_command(key, &stop).await.is_err() {
                        return;
                    }
                }
                if workers.ring(key).await.is_err() {
                    workers.remove_command(key).await;
                    return;
                }
                awaited = Action::Stop;
            }
            if workers.take_result(key, id, Action::Stop).await.is_some() {
                return;
            }
            if !workers.alive(key).await {
                let _ = workers.take_result(key, id, Action::Exit).await;
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    session = id,
                    pid = key.pid,
                    "worker never answered its {} command: no longer watched",
                    cmd.action.as_str()
                );
                return;
            }
            tokio::time::sleep(limits.poll_interval * 5).await;
        }
    }

    /// The worker exited: collect its exit result, if it wrote one.
    async fn exited(&self, key: ProcessKey, request_id: &str) -> ExchangeError {
        let read = self
            .inner
            .workers
            .take_result(key, request_id, Action::Exit)
            .await;
        let answer = read.and_then(Result::ok);
        let reason = match answer.as_ref().map(|a| &a.result.outcome) {
            Some(Outcome::ExitedWhileTracing { reason }) => {
                format!("worker {} exited while tracing: {reason}", key.pid)
            }
            _ => format!("worker {} exited (killed?) without a result", key.pid),
        };
        ExchangeError::Exited {
            reason,
            result: answer.map(Box::new),
        }
    }

    /// Records a session an earlier sidecar left in the journal and stops its tracing in the
    /// workers that still run.
    pub(super) async fn recover_one(&self, journal: JournalEntry) {
        let id = journal.id.clone();
        tracing::warn!(session = %id, "found a session left by an earlier sidecar: stopping its tracing");
        let session = Session {
            id: id.clone(),
            state: SessionState::Capturing,
            request: journal.request.clone(),
            leader_pid: journal.leader_pid,
            created_at: journal.created_at,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: journal
                .workers
                .iter()
                .map(|(pid, ticks, slot)| WorkerRun {
                    pid: *pid,
                    start_ticks: *ticks,
                    slot: *slot,
                    state: WorkerState::Pending,
                    error: None,
                    result: None,
                })
                .collect(),
            summary: None,
        };
        let keys: Vec<ProcessKey> = session.workers.iter().map(super::table::key).collect();
        self.table().insert(session, Arc::default());
        // Only processes discovered as forkscope-server workers right now are rung: the
        // journal is a file, not a licence to signal whatever PID it names.
        let mut alive = Vec::new();
        for key in keys {
            match self.inner.workers.now(key).await {
                Now::Worker => alive.push(key),
                Now::Other => self.record_failure(
                    &id,
                    key,
                    ExchangeError::Failed(format!(
                        "process {} is not a forkscope-server worker now: not signalled",
                        key.pid
                    )),
                ),
                Now::Gone => {
                    // Collect what it may have written at exit, then forget it.
                    let e = self.exited(key, &id).await;
                    self.record_failure(&id, key, e);
                }
            }
            for action in [Action::Start, Action::Capture, Action::Stop] {
                let _ = self.inner.workers.take_result(key, &id, action).await;
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
        )
        .await;
    }
}
