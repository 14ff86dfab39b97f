//! What processes write into the runtime directory: their identity and command results.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::command::{Action, GroupBy};

/// Whether a process is a leader or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The process that binds sockets and forks workers.
    Leader,
    /// A forked process serving requests.
    Worker,
}

/// `process.json`: written by every forkscope-server process when it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessInfo {
    /// Format version, [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// The process id.
    pub pid: u32,
    /// Leader or worker.
    pub role: Role,
    /// The worker slot (stable across respawns); `None` for a leader.
    pub slot: Option<u32>,
    /// The leader's PID (its own for a leader).
    pub leader_pid: u32,
    /// The application, as given on the command line (`module:callable`).
    pub app: String,
    /// forkscope-server's version.
    pub server_version: String,
    /// Start time, seconds since the Unix epoch.
    pub started_at: f64,
}

/// The largest result file a worker writes and a reader accepts, bytes. A heap diff that would
/// be larger (many sites with deep tracebacks) keeps its highest-ranked sites that fit
/// ([`CommandResult::fit`]), so a valid request never produces a result nobody can read.
pub const MAX_RESULT_BYTES: u64 = 32 * 1024 * 1024;

/// A worker's answer to one command: `results/{request_id}.{action}.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandResult {
    /// Format version, [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// The id of the command this answers (`manual-…` for a bare doorbell).
    pub request_id: String,
    /// The action that was carried out.
    pub action: Action,
    /// The worker's PID.
    pub pid: u32,
    /// The worker's slot.
    pub slot: u32,
    /// When the worker began handling the command, seconds since the Unix epoch.
    pub started_at: f64,
    /// When the result was written, seconds since the Unix epoch.
    pub finished_at: f64,
    /// Success with its payload, or the reason of a failure.
    pub outcome: Outcome,
}

/// The payload of a [`CommandResult`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Tracing started (answer to `start`).
    Started {
        /// Traceback depth being recorded.
        frames: u32,
        /// PSS of the worker at the baseline, bytes.
        pss_bytes: Option<u64>,
    },
    /// A heap diff (answer to `capture`, or the second bare doorbell).
    HeapDiff(HeapDiff),
    /// Tracing stopped without a capture (answer to `stop`).
    Stopped,
    /// Every thread's stack (answer to `stacks`).
    Stacks {
        /// One entry per Python thread.
        threads: Vec<ThreadStack>,
    },
    /// The worker exited while tracing (action `exit`): the baseline was never captured.
    ExitedWhileTracing {
        /// Why the worker exited, as far as it knew.
        reason: String,
    },
    /// The command was refused or failed; the worker keeps serving.
    Error {
        /// A human-readable reason.
        reason: String,
    },
}

/// A tracemalloc snapshot diff (after − before) of one worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HeapDiff {
    /// Traceback depth that was recorded.
    pub frames: u32,
    /// Grouping of `sites`.
    pub group_by: GroupBy,
    /// When the baseline was taken, seconds since the Unix epoch.
    pub baseline_at: f64,
    /// When the capture was taken, seconds since the Unix epoch.
    pub captured_at: f64,
    /// `tracemalloc.get_traced_memory()` at the baseline.
    pub traced_before: TracedMemory,
    /// `tracemalloc.get_traced_memory()` at the capture.
    pub traced_after: TracedMemory,
    /// `tracemalloc.get_tracemalloc_memory()` at the capture: what tracing itself costs.
    pub tracemalloc_overhead_bytes: u64,
    /// PSS of the worker at the baseline, bytes (from `/proc/self/smaps_rollup`).
    pub pss_before_bytes: Option<u64>,
    /// PSS of the worker at the capture, bytes.
    pub pss_after_bytes: Option<u64>,
    /// Sum of `size_diff` over all sites, listed or not.
    pub total_size_diff: i64,
    /// Number of sites before truncation to `top`.
    pub total_sites: u64,
    /// The `top` sites with the largest `size_diff`, largest first.
    pub sites: Vec<SiteDiff>,
}

/// Memory traced by tracemalloc, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TracedMemory {
    /// Currently traced.
    pub current: u64,
    /// Peak since tracing started.
    pub peak: u64,
}

/// One allocation site of a heap diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SiteDiff {
    /// The allocating traceback, most recent call first; one frame when grouped by line.
    pub traceback: Vec<Frame>,
    /// Bytes allocated at the site in the baseline.
    pub size_before: u64,
    /// Bytes allocated at the site in the capture.
    pub size_after: u64,
    /// `size_after - size_before`.
    pub size_diff: i64,
    /// Live blocks in the baseline.
    pub count_before: u64,
    /// Live blocks in the capture.
    pub count_after: u64,
    /// `count_after - count_before`.
    pub count_diff: i64,
}

/// One frame of a traceback or a stack.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub struct Frame {
    /// Source file.
    pub filename: String,
    /// Line number (0 when unknown).
    pub lineno: u32,
    /// Function name, when known (stacks have it, tracemalloc does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
}

/// The Python stack of one thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ThreadStack {
    /// `threading.get_ident()` of the thread.
    pub thread_id: u64,
    /// The thread's name (`MainThread`, or `?` when it is not a `threading` thread).
    pub name: String,
    /// True for the thread that handled the command.
    pub current: bool,
    /// Frames, outermost call first (as tracebacks print).
    pub frames: Vec<Frame>,
}

impl Frame {
    /// `file:line`, the key reports use to name a site.
    pub fn location(&self) -> String {
        format!("{}:{}", self.filename, self.lineno)
    }
}

impl CommandResult {
    /// Drops the lowest-ranked sites of a heap diff until its JSON (as
    /// [`crate::write_json_atomic`] writes it) fits in `limit` bytes; returns how many were
    /// dropped (`total_sites` still counts every site). Other outcomes are left as they are.
    pub fn fit(&mut self, limit: u64) -> usize {
        let Outcome::HeapDiff(diff) = &mut self.outcome else {
            return 0;
        };
        let sites = std::mem::take(&mut diff.sites);
        let base = json_len(&*self);
        let mut total = base;
        let mut keep = 0;
        for (i, site) in sites.iter().enumerate() {
            // Sites after the first are preceded by a comma.
            let add = json_len(site) + u64::from(i > 0);
            if total + add > limit {
                break;
            }
            total += add;
            keep = i + 1;
        }
        let dropped = sites.len() - keep;
        if let Outcome::HeapDiff(diff) = &mut self.outcome {
            diff.sites = sites;
            diff.sites.truncate(keep);
        }
        dropped
    }
}

/// The length of `value`'s compact JSON, counted without keeping the bytes.
fn json_len<T: Serialize>(value: &T) -> u64 {
    struct Counter(u64);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(sites: usize, frames: usize) -> CommandResult {
        let site = |i: usize| SiteDiff {
            traceback: (0..frames)
                .map(|f| Frame {
                    filename: format!("/srv/app/module_{i}/file_{f}.py"),
                    lineno: f as u32,
                    function: Some("handler".into()),
                })
                .collect(),
            size_before: 0,
            size_after: 1000,
            size_diff: 1000 - i as i64,
            count_before: 0,
            count_after: 1,
            count_diff: 1,
        };
        CommandResult {
            version: crate::FORMAT_VERSION,
            request_id: "r".into(),
            action: Action::Capture,
            pid: 1,
            slot: 0,
            started_at: 0.0,
            finished_at: 0.0,
            outcome: Outcome::HeapDiff(HeapDiff {
                frames: frames as u32,
                group_by: GroupBy::Traceback,
                total_sites: sites as u64,
                sites: (0..sites).map(site).collect(),
                ..HeapDiff::default()
            }),
        }
    }

    fn sites(r: &CommandResult) -> &[SiteDiff] {
        match &r.outcome {
            Outcome::HeapDiff(d) => &d.sites,
            _ => &[],
        }
    }

    /// Issue 14: a valid request (top 10000, 100 frames) could produce a result larger than
    /// readers accept, and it was lost whole.
    #[test]
    fn an_oversized_diff_keeps_the_top_sites_that_fit_exactly() {
        let mut r = result(200, 20);
        let whole = serde_json::to_vec(&r).expect("json").len() as u64;
        let limit = whole / 3;
        let dropped = r.fit(limit);
        let kept = sites(&r).len();
        assert_eq!(kept + dropped, 200);
        assert!(dropped > 0 && kept > 0);
        let bytes = serde_json::to_vec(&r).expect("json").len() as u64;
        assert!(bytes <= limit, "{bytes} > {limit}");
        // Maximal: one more site would not fit.
        let mut more = result(200, 20);
        if let Outcome::HeapDiff(d) = &mut more.outcome {
            d.sites.truncate(kept + 1);
        }
        assert!(serde_json::to_vec(&more).expect("json").len() as u64 > limit);
        // The highest-ranked ones stay, and the count of all sites is kept.
        assert_eq!(sites(&r)[0].size_diff, 1000);
        assert!(matches!(&r.outcome, Outcome::HeapDiff(d) if d.total_sites == 200));
    }

    #[test]
    fn a_diff_that_fits_is_untouched() {
        let mut r = result(10, 3);
        let before = r.clone();
        assert_eq!(r.fit(MAX_RESULT_BYTES), 0);
        assert_eq!(r, before);
    }
}
