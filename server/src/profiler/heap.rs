//! tracemalloc sessions inside one worker: start with a baseline, diff captures against it, stop.
//!
//! The Python side runs in a tiny helper module whose file name is `<forkscope>`. tracemalloc
//! charges an allocation to the most recent Python frame, so whatever the profiler allocates is
//! charged either to that helper or to `tracemalloc.py` (snapshots are built there), and both
//! are filtered out of every snapshot: a diff shows the application's memory, not ours.

use std::ffi::CStr;

use forkscope_protocol::{Frame, GroupBy, HeapDiff, SiteDiff, TracedMemory};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyModule;

use super::ids::unix_now;
use super::pss::self_pss;

/// The helper's file name; frames of this file are filtered out of snapshots.
const HELPER_FILE: &CStr = c"<forkscope>";

/// The helper module: snapshots with our filters, a diff sorted by growth, site conversion.
const HELPER_SOURCE: &CStr = cr#"
import tracemalloc

_filters = None

def filters():
    global _filters
    if _filters is None:
        _filters = (
            tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True),
            tracemalloc.Filter(False, "<forkscope>", all_frames=True),
        )
    return _filters

def warm_up():
    # Fill the caches that filtering fills on first use (fnmatch, re) before tracing starts,
    # so they are not charged to the application.
    import fnmatch
    for f in filters():
        fnmatch.fnmatch("x", f.filename_pattern)

def start(frames):
    started = not tracemalloc.is_tracing()
    if started:
        warm_up()
        tracemalloc.start(frames)
    return started, tracemalloc.get_traceback_limit()

def snapshot():
    return tracemalloc.take_snapshot().filter_traces(filters())

def diff(after, before, key_type, top):
    stats = after.compare_to(before, key_type)
    total = 0
    for stat in stats:
        total += stat.size_diff
    stats.sort(key=lambda s: (s.size_diff, s.size), reverse=True)
    sites = [
        (
            [(f.filename, f.lineno) for f in reversed(s.traceback)],
            s.size,
            s.size_diff,
            s.count,
            s.count_diff,
        )
        for s in stats[:top]
    ]
    return total, len(stats), sites
"#;

static HELPER: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The helper module, compiled once per interpreter (in the leader, so workers inherit it).
///
/// # Errors
/// The helper failed to compile (a bug) or `tracemalloc` cannot be imported.
pub fn helper(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    HELPER
        .get_or_try_init(py, || {
            PyModule::from_code(py, HELPER_SOURCE, HELPER_FILE, c"forkscope._tracemalloc")
                .map(Bound::unbind)
        })
        .map(|m| m.bind(py))
}

/// True when tracemalloc traces, whoever started it.
pub fn tracemalloc_is_tracing(py: Python<'_>) -> bool {
    py.import("tracemalloc")
        .and_then(|t| t.call_method0("is_tracing"))
        .and_then(|v| v.extract())
        .unwrap_or(false)
}

fn traced_memory(tracemalloc: &Bound<'_, PyModule>) -> PyResult<TracedMemory> {
    let (current, peak): (u64, u64) = tracemalloc.call_method0("get_traced_memory")?.extract()?;
    Ok(TracedMemory { current, peak })
}

/// One tracing session: what the baseline was and who asked for it.
pub struct Session {
    /// The id of the request that started it (`manual-…` for the bare doorbell).
    pub request_id: String,
    /// Started by the bare doorbell (its capture reuses the id).
    pub manual: bool,
    /// The traceback depth tracemalloc records.
    pub frames: u32,
    /// False when tracemalloc was already tracing (the app started it): then stopping the
    /// session leaves tracemalloc alone.
    pub started_tracemalloc: bool,
    /// When the baseline was taken.
    pub baseline_at: f64,
    /// tracemalloc's counters at the baseline.
    pub traced_before: TracedMemory,
    /// PSS at the baseline (read before tracing began).
    pub pss_before: Option<u64>,
    baseline: Py<PyAny>,
}

impl Session {
    /// Starts tracemalloc with `frames` frames (unless it already traces) and takes the
    /// baseline snapshot.
    ///
    /// # Errors
    /// A Python error from tracemalloc; tracing this call started is stopped again.
    pub fn start(py: Python<'_>, request_id: String, frames: u32, manual: bool) -> PyResult<Self> {
        let helper = helper(py)?;
        let tracemalloc = py.import("tracemalloc")?;
        let pss_before = self_pss();
        let (started, frames): (bool, u32) = helper.call_method1("start", (frames,))?.extract()?;
        let baseline = (|| {
            let traced_before = traced_memory(&tracemalloc)?;
            let snapshot = helper.call_method0("snapshot")?;
            Ok::<_, PyErr>((traced_before, snapshot))
        })();
        match baseline {
            Ok((traced_before, snapshot)) => Ok(Self {
                request_id,
                manual,
                frames,
                started_tracemalloc: started,
                baseline_at: unix_now(),
                traced_before,
                pss_before,
                baseline: snapshot.unbind(),
            }),
            Err(e) => {
                if started {
                    let _ = tracemalloc.call_method0("stop");
                }
                Err(e)
            }
        }
    }

    /// Snapshots now and diffs against the baseline; tracing goes on.
    ///
    /// # Errors
    /// A Python error, for example when the application stopped tracemalloc itself.
    pub fn capture(&self, py: Python<'_>, group_by: GroupBy, top: u32) -> PyResult<HeapDiff> {
        let helper = helper(py)?;
        let tracemalloc = py.import("tracemalloc")?;
        // Measure before the snapshot, which itself costs memory.
        let pss_after = self_pss();
        let traced_after = traced_memory(&tracemalloc)?;
        let overhead: u64 = tracemalloc
            .call_method0("get_tracemalloc_memory")?
            .extract()?;
        let snapshot = helper.call_method0("snapshot")?;
        let captured_at = unix_now();
        let (total_size_diff, total_sites, raw): (i64, u64, Vec<RawSite>) = helper
            .call_method1(
                "diff",
                (&snapshot, self.baseline.bind(py), group_by.as_str(), top),
            )?
            .extract()?;
        drop(snapshot);
        Ok(HeapDiff {
            frames: self.frames,
            group_by,
            baseline_at: self.baseline_at,
            captured_at,
            traced_before: self.traced_before,
            traced_after,
            tracemalloc_overhead_bytes: overhead,
            pss_before_bytes: self.pss_before,
            pss_after_bytes: pss_after,
            total_size_diff,
            total_sites,
            sites: raw.into_iter().map(site).collect(),
        })
    }

    /// Ends the session: drops the baseline and stops tracemalloc (if the session started it),
    /// which releases the memory tracing used.
    ///
    /// # Errors
    /// A Python error from `tracemalloc.stop()`.
    pub fn stop(self, py: Python<'_>) -> PyResult<()> {
        drop(self.baseline);
        if self.started_tracemalloc {
            py.import("tracemalloc")?.call_method0("stop")?;
        }
        Ok(())
    }
}

/// `(frames most recent first, size, size_diff, count, count_diff)` as the helper returns it.
type RawSite = (Vec<(String, u32)>, u64, i64, u64, i64);

fn site((frames, size, size_diff, count, count_diff): RawSite) -> SiteDiff {
    SiteDiff {
        traceback: frames
            .into_iter()
            .map(|(filename, lineno)| Frame {
                filename,
                lineno,
                function: None,
            })
            .collect(),
        size_before: before(size, size_diff),
        size_after: size,
        size_diff,
        count_before: before(count, count_diff),
        count_after: count,
        count_diff,
    }
}

/// `after - diff`, never below zero.
fn before(after: u64, diff: i64) -> u64 {
    u64::try_from(i128::from(after) - i128::from(diff)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use rusty_fork::rusty_fork_test;

    use super::*;

    #[test]
    fn before_is_after_minus_diff() {
        assert_eq!(before(100, 30), 70);
        assert_eq!(before(100, -30), 130);
        assert_eq!(before(10, 30), 0);
    }

    // In a process of its own, like the tests of profiler::tests (the reason is there).
    rusty_fork_test! {
        /// A real tracemalloc session in this process: a module keeps 200 blocks alive at one
        /// known line between the baseline and the capture.
        #[test]
        fn diff_names_the_allocating_line() {
            Python::initialize();
            Python::attach(|py| {
                let leaky = PyModule::from_code(
                    py,
                    c"kept = []\ndef leak(n):\n    for _ in range(n):\n        kept.append(bytearray(1000))\ndef run(n):\n    leak(n)\n",
                    c"/fs/leaky_unit.py",
                    c"leaky_unit",
                )
                .expect("leaky module");
                let session = Session::start(py, "unit".into(), 5, false).expect("tracing starts");
                assert!(session.started_tracemalloc);
                assert!(tracemalloc_is_tracing(py));
                leaky.call_method1("run", (200,)).expect("leak");
                for group_by in [GroupBy::Lineno, GroupBy::Traceback] {
                    let diff = session.capture(py, group_by, 10).expect("capture");
                    let top = &diff.sites[0];
                    assert_eq!(
                        top.traceback[0].location(),
                        "/fs/leaky_unit.py:4",
                        "{diff:#?}"
                    );
                    // Each bytearray is two blocks (object and buffer), plus the list's growth.
                    assert!(top.count_diff >= 200, "{top:?}");
                    assert!(top.size_diff >= 200_000, "{top:?}");
                    assert_eq!(
                        top.size_before as i64 + top.size_diff,
                        top.size_after as i64
                    );
                    assert!(diff.total_size_diff >= top.size_diff);
                    assert!(diff.total_sites as usize >= diff.sites.len());
                    assert!(diff.traced_after.current > diff.traced_before.current);
                    assert!(diff.pss_before_bytes.is_some() && diff.pss_after_bytes.is_some());
                    if group_by == GroupBy::Traceback {
                        // Most recent call first: the allocation, then its caller.
                        assert_eq!(
                            top.traceback[1].location(),
                            "/fs/leaky_unit.py:6",
                            "{top:?}"
                        );
                    }
                    let ours =
                        diff.sites.iter().flat_map(|s| &s.traceback).any(|f| {
                            f.filename == "<forkscope>" || f.filename.ends_with("tracemalloc.py")
                        });
                    assert!(!ours, "profiler frames leak into the diff: {diff:#?}");
                }
                session.stop(py).expect("stop");
                assert!(!tracemalloc_is_tracing(py));
            });
        }
    }
}
