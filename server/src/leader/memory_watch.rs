//! `--max-worker-memory` and `--memory-watch-threshold`: recycle a worker on its private
//! memory, with the evidence captured first.
//!
//! Every [`CHECK_EVERY`] the leader reads each serving worker's USS (`smaps_rollup`: the memory
//! its exit frees; RSS would count the pages shared copy-on-write with the leader). A worker
//! that crosses the threshold starts tracing (the profiler's `start` command, through the same
//! command file and doorbell the sidecar uses), so the baseline is taken before most of the
//! growth. A worker over the limit on [`LIMIT_CHECKS`] checks in a row is asked for a heap diff
//! (`capture`) if it is tracing; once the diff is written (or [`CAPTURE_WAIT`] passed) the
//! leader records it in `{leader}/recycles/{pid}.json`, logs the sites that grew, and retires
//! the worker the way `--max-requests` does: in-flight requests finish, the slot is refilled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use forkscope_protocol::recycle::{KEPT, Recycle, RecycleReason};
use forkscope_protocol::result::{CommandResult, MAX_RESULT_BYTES, Outcome};
use forkscope_protocol::{Action, Command, FORMAT_VERSION, GroupBy, RuntimeDir};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Leader;
use crate::settings::Settings;

/// How often private memory is read.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Checks in a row over the limit before a worker is recycled (a short spike is not a leak).
pub const LIMIT_CHECKS: u32 = 3;
/// How long a worker may take to write its heap diff before it is recycled without one.
pub const CAPTURE_WAIT: Duration = Duration::from_secs(30);
/// Allocation sites a capture lists and the log shows.
const CAPTURE_TOP: u32 = 20;
const LOGGED_SITES: usize = 5;

/// What the watch wants done for one worker after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing.
    Wait,
    /// Start tracing (it crossed the threshold).
    Trace,
    /// Ask for a heap diff (it stayed over the limit while tracing).
    Capture,
    /// Recycle it now.
    Recycle,
}

/// The limits, and what the watch knows of each worker.
#[derive(Debug)]
pub struct MemoryWatch {
    limit: u64,
    threshold: Option<u64>,
    next_check: Instant,
    workers: HashMap<i32, Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    over_limit: u32,
    tracing: bool,
    /// When the heap diff was asked for.
    capture_asked: Option<Instant>,
    uss: u64,
}

impl MemoryWatch {
    /// The watch the settings ask for (`None` without `--max-worker-memory`).
    ///
    /// # Errors
    /// A threshold without a limit, or not below it.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Self>> {
        let limit = settings.max_worker_memory;
        if limit == 0 {
            if settings.memory_watch_threshold.is_some() {
                anyhow::bail!("--memory-watch-threshold needs --max-worker-memory");
            }
            return Ok(None);
        }
        let threshold = settings.memory_watch_threshold.map(|t| t.bytes(limit));
        if threshold.is_some_and(|t| t == 0 || t >= limit) {
            anyhow::bail!(
                "--memory-watch-threshold must be above 0 and below --max-worker-memory ({limit} \
                 bytes)"
            );
        }
        Ok(Some(Self {
            limit,
            threshold,
            next_check: Instant::now() + CHECK_EVERY,
            workers: HashMap::new(),
        }))
    }

    /// True when a check is due at `now` (and schedules the next).
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            return false;
        }
        self.next_check = now + CHECK_EVERY;
        true
    }

    /// Books one reading of worker `pid`'s private memory and says what to do.
    pub fn observe(&mut self, pid: i32, uss: u64, now: Instant) -> Step {
        let w = self.workers.entry(pid).or_default();
        w.uss = uss;
        if let Some(asked) = w.capture_asked {
            return if now.duration_since(asked) >= CAPTURE_WAIT {
                Step::Recycle
            } else {
                Step::Wait
            };
        }
        w.over_limit = if uss > self.limit {
            w.over_limit + 1
        } else {
            0
        };
        if w.over_limit >= LIMIT_CHECKS {
            if w.tracing {
                w.capture_asked = Some(now);
                return Step::Capture;
            }
            return Step::Recycle;
        }
        if !w.tracing && self.threshold.is_some_and(|t| uss > t) {
            w.tracing = true;
            return Step::Trace;
        }
        Step::Wait
    }

    /// True while a heap diff of `pid` is awaited.
    pub fn capturing(&self, pid: i32) -> bool {
        self.workers
            .get(&pid)
            .is_some_and(|w| w.capture_asked.is_some())
    }

    /// Forgets a worker that exited.
    pub fn forget(&mut self, pid: i32) {
        self.workers.remove(&pid);
    }

    fn uss(&self, pid: i32) -> u64 {
        self.workers.get(&pid).map_or(0, |w| w.uss)
    }
}

/// A worker's private memory in bytes, `None` when it cannot be read.
fn private_memory(pid: Pid) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    forkscope_protocol::smaps::parse(&text).map(|r| r.uss())
}

fn command(id: String, action: Action) -> Command {
    Command {
        version: FORMAT_VERSION,
        request_id: id,
        action,
        frames: 1,
        top: CAPTURE_TOP,
        group_by: GroupBy::default(),
    }
}

fn capture_id(pid: Pid) -> String {
    format!("memory-{pid}")
}

impl Leader {
    /// One round of the memory watch, when due (see the module docs).
    pub(super) fn watch_memory(&mut self) {
        let now = Instant::now();
        let due = match self.memory_watch.as_mut() {
            Some(w) => w.due(now),
            None => return,
        };
        let serving: Vec<(u32, Pid)> = self
            .slots
            .serving()
            .filter(|(slot, w)| self.ready.is_ready(*slot, w.pid.as_raw() as u32))
            .map(|(s, w)| (s, w.pid))
            .collect();
        for (slot, pid) in serving {
            // A diff asked for is looked for on every turn; memory only when a check is due.
            let capturing = self
                .memory_watch
                .as_ref()
                .is_some_and(|w| w.capturing(pid.as_raw()));
            let written = capturing && self.capture_written(pid);
            if !due && !written {
                continue;
            }
            let step = if written {
                Step::Recycle
            } else {
                let (Some(uss), Some(watch)) = (private_memory(pid), self.memory_watch.as_mut())
                else {
                    continue;
                };
                watch.observe(pid.as_raw(), uss, now)
            };
            match step {
                Step::Wait => {}
                Step::Trace => self.ask(pid, "start", Action::Start, slot),
                Step::Capture => self.ask(pid, "capture", Action::Capture, slot),
                Step::Recycle => self.recycle_for_memory(slot, pid),
            }
        }
    }

    fn capture_written(&self, pid: Pid) -> bool {
        self.runtime.as_ref().is_some_and(|rt| {
            rt.result(pid.as_raw() as u32, &capture_id(pid), Action::Capture)
                .exists()
        })
    }

    /// Writes a profiler command for worker `pid` and rings its doorbell.
    fn ask(&mut self, pid: Pid, what: &str, action: Action, slot: u32) {
        let Some(rt) = &self.runtime else {
            log::warn!("no runtime directory: cannot ask worker {pid} to {what} tracing");
            return;
        };
        let id = match action {
            Action::Capture => capture_id(pid),
            _ => format!("memory-watch-{pid}"),
        };
        let written = forkscope_protocol::write_json_atomic(
            &rt.command(pid.as_raw() as u32),
            &command(id, action),
        );
        if let Err(e) = written
            .map_err(|e| e.to_string())
            .and_then(|()| kill(pid, Signal::SIGUSR2).map_err(|e| e.to_string()))
        {
            log::error!("cannot ask worker {pid} for a {what}: {e}");
            return;
        }
        let uss = self
            .memory_watch
            .as_ref()
            .map_or(0, |w| w.uss(pid.as_raw()));
        match action {
            Action::Start => log::info!(
                "Worker (pid:{pid}) in slot {slot} crossed the memory watch threshold at {}: \
                 tracing its allocations",
                mib(uss)
            ),
            _ => log::info!(
                "Worker (pid:{pid}) in slot {slot} is over --max-worker-memory at {}: capturing \
                 a heap diff before recycling it",
                mib(uss)
            ),
        }
    }

    /// Records why `pid` goes (with its heap diff, if one was asked for), logs it and retires
    /// the worker gracefully.
    fn recycle_for_memory(&mut self, slot: u32, pid: Pid) {
        let Some(watch) = self.memory_watch.as_ref() else {
            return;
        };
        let (uss, limit, asked) = (
            watch.uss(pid.as_raw()),
            watch.limit,
            watch.capturing(pid.as_raw()),
        );
        let capture = self
            .runtime
            .as_ref()
            .filter(|_| asked)
            .and_then(|rt| take_capture(rt, pid));
        log::warn!(
            "Worker (pid:{pid}) in slot {slot} recycled: its private memory {} stayed above \
             --max-worker-memory {}{}",
            mib(uss),
            mib(limit),
            describe(capture.as_ref(), asked)
        );
        if let Some(rt) = &self.runtime {
            let record = Recycle {
                version: FORMAT_VERSION,
                reason: RecycleReason::Memory,
                leader_pid: std::process::id(),
                app: self.app_name.clone(),
                slot,
                pid: pid.as_raw() as u32,
                at: crate::runtime_dir::unix_now(),
                uss_bytes: uss,
                limit_bytes: limit,
                capture,
            };
            if let Err(e) = keep_record(rt, &record) {
                log::error!("cannot record the recycle of worker {pid}: {e}");
            }
        }
        if let Some(counts) = &self.request_counts {
            counts.recycled(slot, RecycleReason::Memory);
        }
        if let Some(w) = self.memory_watch.as_mut() {
            w.forget(pid.as_raw());
        }
        if self.slots.retire(slot, false).is_some() {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }
}

/// Reads (and removes, so the reaped worker's folder is not kept for it) the heap diff.
fn take_capture(rt: &RuntimeDir, pid: Pid) -> Option<CommandResult> {
    let path = rt.result(pid.as_raw() as u32, &capture_id(pid), Action::Capture);
    let result = forkscope_protocol::read_json_limited(&path, MAX_RESULT_BYTES).ok();
    let _ = std::fs::remove_file(&path);
    result
}

/// Writes `record` under the leader's folder and keeps only the newest [`KEPT`].
fn keep_record(rt: &RuntimeDir, record: &Recycle) -> Result<(), forkscope_protocol::FileError> {
    let dir = rt.recycles_dir(record.leader_pid);
    forkscope_protocol::files::ensure_real_dir(&dir)?;
    forkscope_protocol::write_json_atomic(&dir.join(format!("{}.json", record.pid)), record)?;
    let mut kept: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    kept.sort();
    let excess = kept.len().saturating_sub(KEPT);
    for (_, path) in kept.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The log's account of the heap diff.
fn describe(capture: Option<&CommandResult>, asked: bool) -> String {
    let diff = match capture.map(|c| &c.outcome) {
        Some(Outcome::HeapDiff(d)) => d,
        Some(other) => return format!("; no heap diff: {other:?}"),
        None if asked => return format!("; no heap diff within {}s", CAPTURE_WAIT.as_secs()),
        None => return String::new(),
    };
    let mut text = format!(
        "; traced memory grew {} since tracing started; the sites that grew most:",
        mib(diff.total_size_diff.max(0) as u64)
    );
    for site in diff.sites.iter().take(LOGGED_SITES) {
        let place = site.traceback.first().map_or_else(
            || "?".to_owned(),
            |f| format!("{}:{}", f.filename, f.lineno),
        );
        text.push_str(&format!(
            "\n  {place} +{}",
            mib(site.size_diff.max(0) as u64)
        ));
    }
    text
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn watch(threshold: Option<u64>) -> MemoryWatch {
        MemoryWatch {
            limit: 100 * MIB,
            threshold,
            next_check: Instant::now(),
            workers: HashMap::new(),
        }
    }

    #[test]
    fn the_threshold_starts_tracing_once_and_the_limit_captures_after_three_checks() {
        let mut w = watch(Some(60 * MIB));
        let t = Instant::now();
        assert_eq!(w.observe(1, 50 * MIB, t), Step::Wait);
        assert_eq!(w.observe(1, 70 * MIB, t), Step::Trace);
        assert_eq!(w.observe(1, 80 * MIB, t), Step::Wait, "traced once");
        assert_eq!(w.observe(1, 120 * MIB, t), Step::Wait);
        assert_eq!(
            w.observe(1, 90 * MIB, t),
            Step::Wait,
            "a spike resets the count"
        );
        assert_eq!(w.observe(1, 120 * MIB, t), Step::Wait);
        assert_eq!(w.observe(1, 120 * MIB, t), Step::Wait);
        assert_eq!(w.observe(1, 120 * MIB, t), Step::Capture);
        assert!(w.capturing(1));
        assert_eq!(w.observe(1, 130 * MIB, t), Step::Wait, "waits for the diff");
        assert_eq!(w.observe(1, 130 * MIB, t + CAPTURE_WAIT), Step::Recycle);
    }

    #[test]
    fn without_a_threshold_a_worker_is_recycled_without_tracing() {
        let mut w = watch(None);
        let t = Instant::now();
        for _ in 1..LIMIT_CHECKS {
            assert_eq!(w.observe(7, 200 * MIB, t), Step::Wait);
        }
        assert_eq!(w.observe(7, 200 * MIB, t), Step::Recycle);
        assert!(!w.capturing(7));
    }

    #[test]
    fn a_worker_below_the_threshold_is_never_traced() {
        let mut w = watch(Some(60 * MIB));
        for _ in 0..100 {
            assert_eq!(w.observe(3, 59 * MIB, Instant::now()), Step::Wait);
        }
    }
}
