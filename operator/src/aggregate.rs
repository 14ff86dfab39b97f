//! Aggregation of the sidecar sessions of every selected pod into what the status reports: the
//! allocation sites ranked by their growth across all workers and pods, per-worker memory
//! figures with the native-growth flag, and identical stacks counted across workers.
//!
//! Pure functions over the sidecar's [`Session`] type; the data-driven tests in
//! `operator/tests/aggregate/` feed them.

use std::collections::{BTreeMap, HashMap, HashSet};

use forkscope_protocol::{CommandResult, Frame, HeapDiff, Outcome};
use forkscope_sidecar::api::{Session, WorkerRun, WorkerState};

use crate::crd::{SiteSummary, StackSummary, WorkerOutcome};

/// PSS growth that tracemalloc did not see (after its own overhead) is only called native when
/// it is at least this large: smaller differences are allocator slack and page rounding.
pub const NATIVE_GROWTH_MIN_BYTES: i64 = 32 * 1024 * 1024;

/// The heap diff a worker delivered, if any.
fn heap_diff(run: &WorkerRun) -> Option<&HeapDiff> {
    match run.result.as_ref().map(|r: &CommandResult| &r.outcome) {
        Some(Outcome::HeapDiff(diff)) if run.state == WorkerState::Done => Some(diff),
        _ => None,
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What the status says of each worker of one pod's session, by slot.
pub fn workers(session: &Session) -> Vec<WorkerOutcome> {
    let mut out: Vec<WorkerOutcome> = session
        .workers
        .iter()
        .map(|run| {
            let mut w = WorkerOutcome {
                slot: run
                    .slot
                    .map_or(-1, |s| i32::try_from(s).unwrap_or(i32::MAX)),
                pid: i32::try_from(run.pid).ok(),
                ..WorkerOutcome::default()
            };
            match heap_diff(run) {
                Some(diff) => {
                    w.pss_before_bytes = diff.pss_before_bytes.map(to_i64);
                    w.pss_after_bytes = diff.pss_after_bytes.map(to_i64);
                    let traced = to_i64(diff.traced_after.current)
                        .saturating_sub(to_i64(diff.traced_before.current));
                    w.traced_growth_bytes = Some(traced);
                    w.native_growth_suspected = native_growth_suspected(diff);
                }
                None if run.state == WorkerState::Done => {}
                None => {
                    w.error = Some(
                        run.error
                            .clone()
                            .unwrap_or_else(|| format!("worker state {:?}", run.state)),
                    );
                }
            }
            w
        })
        .collect();
    out.sort_by_key(|w| w.slot);
    out
}

/// True when PSS grew by far more than the memory tracemalloc traced: the untraced growth (PSS
/// growth minus traced growth minus tracemalloc's own overhead) is at least
/// [`NATIVE_GROWTH_MIN_BYTES`] and larger than the traced growth.
pub fn native_growth_suspected(diff: &HeapDiff) -> bool {
    let (Some(before), Some(after)) = (diff.pss_before_bytes, diff.pss_after_bytes) else {
        return false;
    };
    let pss = to_i64(after).saturating_sub(to_i64(before));
    let traced =
        to_i64(diff.traced_after.current).saturating_sub(to_i64(diff.traced_before.current));
    let untraced = pss
        .saturating_sub(traced.max(0))
        .saturating_sub(to_i64(diff.tracemalloc_overhead_bytes));
    untraced >= NATIVE_GROWTH_MIN_BYTES && untraced > traced
}

struct SiteAcc<'a> {
    traceback: &'a [Frame],
    size: i64,
    count: i64,
    workers: u32,
    pods: HashSet<&'a str>,
    max_worker: i64,
}

/// Merges the heap diffs of every worker of every pod by allocation site (its whole recorded
/// traceback) and ranks the sites by total growth, largest first; ties in file:line order.
/// Sites that did not grow in a worker do not count that worker.
pub fn top_sites<'a>(
    sessions: impl IntoIterator<Item = (&'a str, &'a Session)>,
    top: usize,
) -> Vec<SiteSummary> {
    let mut sites: HashMap<&'a [Frame], SiteAcc<'a>> = HashMap::new();
    for (pod, session) in sessions {
        for diff in session.workers.iter().filter_map(heap_diff) {
            for site in &diff.sites {
                let acc = sites
                    .entry(site.traceback.as_slice())
                    .or_insert_with(|| SiteAcc {
                        traceback: &site.traceback,
                        size: 0,
                        count: 0,
                        workers: 0,
                        pods: HashSet::new(),
                        max_worker: i64::MIN,
                    });
                acc.size = acc.size.saturating_add(site.size_diff);
                acc.count = acc.count.saturating_add(site.count_diff);
                acc.max_worker = acc.max_worker.max(site.size_diff);
                if site.size_diff > 0 {
                    acc.workers += 1;
                    acc.pods.insert(pod);
                }
            }
        }
    }
    let mut ranked: Vec<SiteSummary> = sites
        .into_values()
        .map(|acc| SiteSummary {
            site: acc
                .traceback
                .first()
                .map(Frame::location)
                .unwrap_or_else(|| "<unknown>".to_owned()),
            traceback: acc.traceback.iter().skip(1).map(Frame::location).collect(),
            size_diff_bytes: acc.size,
            count_diff: acc.count,
            workers: i32::try_from(acc.workers).unwrap_or(i32::MAX),
            pods: i32::try_from(acc.pods.len()).unwrap_or(i32::MAX),
            max_worker_size_diff_bytes: acc.max_worker,
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.size_diff_bytes
            .cmp(&a.size_diff_bytes)
            .then_with(|| a.site.cmp(&b.site))
            .then_with(|| a.traceback.cmp(&b.traceback))
    });
    ranked.truncate(top);
    ranked
}

fn frame_text(f: &Frame) -> String {
    match &f.function {
        Some(func) => format!("{}:{} in {func}", f.filename, f.lineno),
        None => f.location(),
    }
}

/// Counts identical Python stacks across every thread of every worker of every pod, the most
/// frequent first (ties in frame order). Frames are listed innermost first.
pub fn top_stacks<'a>(
    sessions: impl IntoIterator<Item = (&'a str, &'a Session)>,
    top: usize,
) -> Vec<StackSummary> {
    #[derive(Default)]
    struct Acc<'a> {
        threads: u32,
        workers: HashSet<(&'a str, u32)>,
        pods: HashSet<&'a str>,
    }
    let mut stacks: BTreeMap<Vec<String>, Acc<'a>> = BTreeMap::new();
    for (pod, session) in sessions {
        for run in &session.workers {
            let Some(CommandResult {
                outcome: Outcome::Stacks { threads },
                ..
            }) = run.result.as_ref()
            else {
                continue;
            };
            for thread in threads {
                let frames: Vec<String> = thread.frames.iter().rev().map(frame_text).collect();
                let acc = stacks.entry(frames).or_default();
                acc.threads += 1;
                acc.workers.insert((pod, run.pid));
                acc.pods.insert(pod);
            }
        }
    }
    let mut ranked: Vec<StackSummary> = stacks
        .into_iter()
        .map(|(frames, acc)| StackSummary {
            frames,
            threads: i32::try_from(acc.threads).unwrap_or(i32::MAX),
            workers: i32::try_from(acc.workers.len()).unwrap_or(i32::MAX),
            pods: i32::try_from(acc.pods.len()).unwrap_or(i32::MAX),
        })
        .collect();
    // Stable sort: equal counts keep the BTreeMap's frame order.
    ranked.sort_by_key(|s| std::cmp::Reverse(s.threads));
    ranked.truncate(top);
    ranked
}
