//! The profiler inside every worker: the SIGUSR2 doorbell, tracemalloc heap diffs, stack dumps,
//! and the `forkscope` module applications may import (DESIGN.md "Contract: server ↔ sidecar",
//! docs/PROFILER.md for the user-facing behaviour and the result format).
//!
//! # Layout
//! - [`intake`]: read, remove and check the command file a program left.
//! - [`heap`]: tracemalloc sessions and the diffs they produce.
//! - [`stacks`]: every thread's Python stack.
//! - [`pss`]: PSS from `/proc/self/smaps_rollup`.
//! - [`module`]: the `forkscope` Python module and the doorbell callable.
//! - [`ids`]: timestamps and the request ids a worker makes up itself.
//!
//! # How the doorbell runs
//! The doorbell is a Python-level signal handler: CPython's C handler flags SIGUSR2, and the
//! main thread runs the handler between bytecodes (also inside a long request) or when the
//! worker's event loop calls `PyErr_CheckSignals`. It can therefore run *inside* profiler code
//! that is already at work on the main thread (tracemalloc's diff is Python code), or while an
//! application thread is inside `forkscope.mark`. All state sits behind one mutex that the
//! doorbell only ever `try_lock`s: when the lock is busy the ring is left in a flag that the
//! holder serves before it lets go. Nothing waits in a signal handler, and no ring is lost.
//!
//! When no session runs, the profiler costs nothing per request: it is a registered signal
//! handler and one atomic flag that `forkscope.is_tracing` and `forkscope.mark` read.

pub mod heap;
pub mod ids;
pub mod intake;
pub mod module;
pub mod pss;
pub mod stacks;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, PoisonError, TryLockError};

use forkscope_protocol::{
    Action, Command, CommandResult, FORMAT_VERSION, GroupBy, Outcome, RuntimeDir, write_json_atomic,
};
use pyo3::prelude::*;
use pyo3::sync::MutexExt;

pub use stacks::thread_stacks;

use heap::Session;
use intake::Intake;

/// Who this worker is and where it writes results.
#[derive(Debug, Clone)]
pub struct ProfilerContext {
    /// The runtime directory shared with the sidecar.
    pub runtime: RuntimeDir,
    /// This worker's PID (names its folder).
    pub pid: u32,
    /// This worker's stable slot.
    pub slot: u32,
    /// The leader's PID.
    pub leader_pid: u32,
}

/// Parameters of the bare doorbell (no command file), from the environment at worker start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToggleDefaults {
    /// `FORKSCOPE_PROFILE_FRAMES`, default 10: traceback depth recorded while tracing.
    pub frames: u32,
    /// `FORKSCOPE_PROFILE_TOP`, default 50: sites listed in a diff.
    pub top: u32,
    /// `FORKSCOPE_PROFILE_GROUP_BY` (`traceback`, `lineno`, `filename`), default `traceback`.
    pub group_by: GroupBy,
}

impl Default for ToggleDefaults {
    fn default() -> Self {
        Self {
            frames: 10,
            top: 50,
            group_by: GroupBy::Traceback,
        }
    }
}

impl ToggleDefaults {
    /// Reads the `FORKSCOPE_PROFILE_*` variables; a bad value is logged and the default kept.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`Self::from_env`], from any lookup (tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut out = Self::default();
        let number = |name: &str, max: u32, default: u32| match lookup(name) {
            None => default,
            Some(text) => match text.trim().parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    log::warn!("{name}={text:?} is not a number in 1..={max}; using {default}");
                    default
                }
            },
        };
        out.frames = number(
            "FORKSCOPE_PROFILE_FRAMES",
            forkscope_protocol::command::MAX_FRAMES,
            out.frames,
        );
        out.top = number(
            "FORKSCOPE_PROFILE_TOP",
            forkscope_protocol::command::MAX_TOP,
            out.top,
        );
        if let Some(text) = lookup("FORKSCOPE_PROFILE_GROUP_BY") {
            match serde_json::from_value::<GroupBy>(serde_json::Value::String(text.trim().into())) {
                Ok(g) => out.group_by = g,
                Err(_) => log::warn!(
                    "FORKSCOPE_PROFILE_GROUP_BY={text:?} is not traceback, lineno or filename; \
                     using {}",
                    out.group_by.as_str()
                ),
            }
        }
        out
    }
}

/// The profiler state of this worker process.
struct Worker {
    ctx: ProfilerContext,
    defaults: ToggleDefaults,
    session: Option<Session>,
    marks: u64,
}

/// `None` in the leader and before [`install`].
static WORKER: Mutex<Option<Worker>> = Mutex::new(None);
/// The doorbell rang and has not been answered yet.
static RINGING: AtomicBool = AtomicBool::new(false);
/// A session runs (read without the lock: the cost when idle is this load).
static TRACING: AtomicBool = AtomicBool::new(false);
/// The thread id holding [`WORKER`], 0 when free: detects re-entry on the same thread.
static HOLDER: AtomicI32 = AtomicI32::new(0);
/// The worker's slot, `u64::MAX` in the leader.
static SLOT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Registers the `forkscope` module in `sys.modules`; called once in the leader right after
/// Python starts, before any application import.
///
/// # Errors
/// Python refused to create or register the module.
pub fn register_module(py: Python<'_>) -> PyResult<()> {
    module::register(py)?;
    // Compile the tracemalloc helper here so every worker inherits it.
    heap::helper(py)?;
    Ok(())
}

/// Makes this freshly forked worker answer the doorbell: creates its results folder, sets
/// `forkscope.slot`, and installs the SIGUSR2 handler. Called on the main thread after the
/// worker reset its signal dispositions and before user hooks run.
///
/// An application handler for SIGUSR2 that the leader inherited from a preloaded import is
/// replaced (and logged): in workers SIGUSR2 belongs to the profiler.
///
/// # Errors
/// Not on the main thread, or Python refused the handler. A runtime directory that cannot be
/// written is only logged (the worker serves anyway; results will fail to be written).
pub fn install(py: Python<'_>, ctx: ProfilerContext) -> PyResult<()> {
    arm(py, ctx.clone(), ToggleDefaults::from_env())?;
    let previous = module::install_handler(py)?;
    // The worker may hold SIGUSR2 blocked while it boots, so that an early ring waits for the
    // doorbell instead of killing it (SIG_DFL); from here on it is answered.
    let mut usr2 = nix::sys::signal::SigSet::empty();
    usr2.add(nix::sys::signal::Signal::SIGUSR2);
    if let Err(e) = usr2.thread_unblock() {
        log::warn!("profiler: cannot unblock SIGUSR2: {e}");
    }
    if let module::Previous::Handler(previous) = previous {
        log::info!(
            "worker {}: the application's SIGUSR2 handler {previous} is replaced by the profiler \
             doorbell",
            ctx.slot
        );
    }
    Ok(())
}

/// Sets up the worker state and `forkscope.slot` (everything [`install`] does but the handler).
fn arm(py: Python<'_>, ctx: ProfilerContext, defaults: ToggleDefaults) -> PyResult<()> {
    let results = ctx.runtime.results_dir(ctx.pid);
    if let Err(e) = std::fs::create_dir_all(&results) {
        log::warn!(
            "profiler: cannot create {}: {e}; profiling results cannot be written",
            results.display()
        );
    }
    SLOT.store(u64::from(ctx.slot), SeqCst);
    TRACING.store(false, SeqCst);
    RINGING.store(false, SeqCst);
    HOLDER.store(0, SeqCst);
    let slot = ctx.slot;
    *WORKER.lock().unwrap_or_else(PoisonError::into_inner) = Some(Worker {
        ctx,
        defaults,
        session: None,
        marks: 0,
    });
    module::set_slot(py, Some(slot))
}

/// Takes SIGUSR2 back if the application replaced the doorbell after [`install`] (an app that
/// calls `signal.signal(SIGUSR2, ...)` at import, when it is imported in the worker). The
/// worker may call this after it imported the application.
///
/// # Errors
/// Not on the main thread, or Python refused the handler.
pub fn reclaim_doorbell(py: Python<'_>) -> PyResult<()> {
    if worker_slot().is_none() {
        // Not installed (no runtime directory): nothing to reclaim.
        return Ok(());
    }
    if let module::Previous::Handler(previous) = module::install_handler(py)? {
        log::warn!(
            "the application installed {previous} for SIGUSR2; forkscope keeps SIGUSR2 as the \
             profiler doorbell in workers"
        );
    }
    Ok(())
}

/// Called by the worker just before it exits: if a session runs, writes an
/// `ExitedWhileTracing` result under the session's request id (action `exit`).
pub fn on_worker_exit(py: Python<'_>, reason: &str) {
    if !TRACING.load(SeqCst) {
        return;
    }
    with_worker(py, true, |py, w| {
        if let Some(session) = w.session.take() {
            TRACING.store(false, SeqCst);
            let started_at = ids::unix_now();
            let id = session.request_id.clone();
            let _ = session.stop(py);
            w.write(
                &id,
                Action::Exit,
                started_at,
                Outcome::ExitedWhileTracing {
                    reason: reason.to_owned(),
                },
            );
        }
    });
}

/// The worker's slot; `None` in the leader.
pub fn worker_slot() -> Option<u32> {
    u32::try_from(SLOT.load(SeqCst)).ok()
}

/// True while a session runs in this worker.
pub fn is_tracing() -> bool {
    TRACING.load(SeqCst)
}

/// Answers one ring of the doorbell (the SIGUSR2 handler calls this). Never raises.
pub fn ring(py: Python<'_>) {
    RINGING.store(true, SeqCst);
    with_worker(py, false, |_, _| ());
}

/// `forkscope.mark(label)`: while tracing, writes a labelled diff and returns its path.
fn mark(py: Python<'_>, label: &str) -> Option<PathBuf> {
    if !TRACING.load(SeqCst) {
        return None;
    }
    with_worker(py, true, |py, w| {
        w.session.as_ref()?;
        let started_at = ids::unix_now();
        w.marks += 1;
        let id = ids::mark_id(label, w.marks);
        let outcome = w.capture(py, w.defaults.group_by, w.defaults.top);
        w.write(&id, Action::Capture, started_at, outcome)
    })
    .flatten()
}

/// Runs `f` with the worker state, then answers every ring that arrived meanwhile.
///
/// With `wait`, a lock held by another thread is waited for (the GIL released meanwhile);
/// without, a busy lock returns `None` at once, the ring being served by the holder. A call
/// nested on the holder's own thread (a signal handler run inside profiler code) returns `None`.
fn with_worker<R>(
    py: Python<'_>,
    wait: bool,
    f: impl FnOnce(Python<'_>, &mut Worker) -> R,
) -> Option<R> {
    let me = nix::unistd::gettid().as_raw();
    if HOLDER.load(SeqCst) == me {
        return None;
    }
    let mut f = Some(f);
    let mut out = None;
    loop {
        let mut guard = match WORKER.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if wait && f.is_some() => WORKER
                .lock_py_attached(py)
                .unwrap_or_else(PoisonError::into_inner),
            Err(TryLockError::WouldBlock) => return out,
        };
        HOLDER.store(me, SeqCst);
        match guard.as_mut() {
            Some(worker) => {
                if let Some(f) = f.take() {
                    match catch_unwind(AssertUnwindSafe(|| f(py, worker))) {
                        Ok(r) => out = Some(r),
                        Err(_) => log::error!("profiler: internal error (panic)"),
                    }
                }
                while RINGING.swap(false, SeqCst) {
                    if catch_unwind(AssertUnwindSafe(|| worker.answer_doorbell(py))).is_err() {
                        log::error!("profiler: internal error (panic) answering the doorbell");
                    }
                }
            }
            // Not a worker (the leader, or before install): rings are ignored.
            None => {
                f = None;
                RINGING.store(false, SeqCst);
            }
        }
        HOLDER.store(0, SeqCst);
        drop(guard);
        // A ring that found the lock busy after our last check is ours to serve.
        if !RINGING.load(SeqCst) {
            return out;
        }
    }
}

impl Worker {
    /// Reads the command file (if any) and does what it says, or toggles.
    fn answer_doorbell(&mut self, py: Python<'_>) {
        let started_at = ids::unix_now();
        match intake::take(&self.ctx.runtime.command(self.ctx.pid)) {
            Intake::Toggle => self.toggle(py, started_at),
            Intake::Command(cmd) => self.execute(py, &cmd, started_at),
            Intake::Rejected(rejected) => {
                let id = rejected
                    .request_id
                    .unwrap_or_else(|| ids::stamped("invalid", started_at));
                let action = rejected.action.unwrap_or(Action::Invalid);
                self.write(
                    &id,
                    action,
                    started_at,
                    Outcome::Error {
                        reason: rejected.reason,
                    },
                );
            }
        }
    }

    /// The bare doorbell: start a session, or capture, stop and write the diff.
    fn toggle(&mut self, py: Python<'_>, started_at: f64) {
        match &self.session {
            None => {
                let id = ids::stamped("manual", started_at);
                let outcome = self.start(py, &id, self.defaults.frames, true);
                self.write(&id, Action::Start, started_at, outcome);
            }
            Some(session) => {
                // A manual session's capture pairs with its start; a program's session keeps
                // its id for the program.
                let id = if session.manual {
                    session.request_id.clone()
                } else {
                    ids::stamped("manual", started_at)
                };
                let outcome = self.capture(py, self.defaults.group_by, self.defaults.top);
                if let Outcome::Error { reason } = self.stop(py) {
                    log::warn!("profiler: stopping after the capture failed: {reason}");
                }
                self.write(&id, Action::Capture, started_at, outcome);
            }
        }
    }

    /// A command from a program.
    fn execute(&mut self, py: Python<'_>, cmd: &Command, started_at: f64) {
        let outcome = match cmd.action {
            Action::Start => self.start(py, &cmd.request_id, cmd.frames, false),
            Action::Capture => self.capture(py, cmd.group_by, cmd.top),
            Action::Stop => self.stop(py),
            Action::Stacks => match thread_stacks(py) {
                Ok(threads) => Outcome::Stacks { threads },
                Err(e) => error("cannot read the stacks", &e),
            },
            // Refused by Command::validate already.
            Action::Exit | Action::Invalid => Outcome::Error {
                reason: format!("action '{}' cannot be requested", cmd.action.as_str()),
            },
        };
        self.write(&cmd.request_id, cmd.action, started_at, outcome);
    }

    fn start(&mut self, py: Python<'_>, request_id: &str, frames: u32, manual: bool) -> Outcome {
        if let Some(session) = &self.session {
            return Outcome::Error {
                reason: format!(
                    "already tracing (request {} started at {:.3}); capture or stop it first",
                    session.request_id, session.baseline_at
                ),
            };
        }
        match Session::start(py, request_id.to_owned(), frames, manual) {
            Ok(session) => {
                let outcome = Outcome::Started {
                    frames: session.frames,
                    pss_bytes: session.pss_before,
                };
                self.session = Some(session);
                TRACING.store(true, SeqCst);
                outcome
            }
            Err(e) => error("cannot start tracing", &e),
        }
    }

    fn capture(&mut self, py: Python<'_>, group_by: GroupBy, top: u32) -> Outcome {
        let Some(session) = &self.session else {
            return Outcome::Error {
                reason: "not tracing: start a session first".into(),
            };
        };
        match session.capture(py, group_by, top) {
            Ok(diff) => Outcome::HeapDiff(diff),
            Err(e) => {
                // The application stopped tracemalloc under us: the session is over.
                if !heap::tracemalloc_is_tracing(py) {
                    self.session = None;
                    TRACING.store(false, SeqCst);
                }
                error("capture failed", &e)
            }
        }
    }

    fn stop(&mut self, py: Python<'_>) -> Outcome {
        let Some(session) = self.session.take() else {
            return Outcome::Error {
                reason: "not tracing".into(),
            };
        };
        TRACING.store(false, SeqCst);
        match session.stop(py) {
            Ok(()) => Outcome::Stopped,
            Err(e) => error("cannot stop tracing", &e),
        }
    }

    /// Writes `results/{id}.{action}.json` and logs where; returns the path when written.
    fn write(
        &self,
        request_id: &str,
        action: Action,
        started_at: f64,
        outcome: Outcome,
    ) -> Option<PathBuf> {
        let ctx = &self.ctx;
        let summary = summary(&outcome);
        let failed = matches!(outcome, Outcome::Error { .. });
        let mut result = CommandResult {
            version: FORMAT_VERSION,
            request_id: request_id.to_owned(),
            action,
            pid: ctx.pid,
            slot: ctx.slot,
            started_at,
            finished_at: ids::unix_now(),
            outcome,
        };
        let dropped = result.fit(forkscope_protocol::result::MAX_RESULT_BYTES);
        if dropped > 0 {
            log::warn!(
                "profiler: the heap diff is larger than {} bytes: its {dropped} lowest-ranked sites are left out",
                forkscope_protocol::result::MAX_RESULT_BYTES
            );
        }
        let path = ctx.runtime.result(ctx.pid, request_id, action);
        let _ = std::fs::create_dir_all(ctx.runtime.results_dir(ctx.pid));
        match write_json_atomic(&path, &result) {
            Ok(()) if failed => {
                log::warn!("profiler: {summary}; wrote {}", path.display());
                Some(path)
            }
            Ok(()) => {
                log::info!("profiler: {summary}; wrote {}", path.display());
                Some(path)
            }
            Err(e) => {
                log::error!("profiler: {summary}, but the result cannot be written: {e}");
                None
            }
        }
    }
}

/// One line for the log about an outcome.
fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Started { frames, .. } => format!("tracing started ({frames} frames)"),
        Outcome::HeapDiff(diff) => format!(
            "heap diff captured ({:+} bytes over {} sites)",
            diff.total_size_diff, diff.total_sites
        ),
        Outcome::Stopped => "tracing stopped".into(),
        Outcome::Stacks { threads } => format!("stacks of {} threads dumped", threads.len()),
        Outcome::ExitedWhileTracing { reason } => format!("exited while tracing ({reason})"),
        Outcome::Error { reason } => format!("command failed: {reason}"),
    }
}

fn error(what: &str, e: &PyErr) -> Outcome {
    Outcome::Error {
        reason: format!("{what}: {e}"),
    }
}

#[cfg(test)]
mod tests;
