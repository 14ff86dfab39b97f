//! Data-driven tests of `forkscope_operator::aggregate`: every `tests/aggregate/*.json` case
//! describes the sessions of a few pods in a compact form, expands them into the sidecar's real
//! `Session` type, and compares what the status would say with the case's expectations.
//! Regenerate nothing by hand: a case's `expect*` fields are written by people, from the story
//! in its `about`.

use std::collections::BTreeMap;
use std::path::Path;

use forkscope_operator::aggregate;
use forkscope_protocol::{
    Action, CommandResult, Frame, GroupBy, HeapDiff, Outcome, SiteDiff, ThreadStack, TracedMemory,
};
use forkscope_sidecar::api::{ProfileRequest, Session, SessionState, WorkerRun, WorkerState};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    about: String,
    top: usize,
    pods: BTreeMap<String, Vec<Worker>>,
    #[serde(default)]
    expect_sites: Option<Value>,
    #[serde(default)]
    expect_stacks: Option<Value>,
    #[serde(default)]
    expect_workers: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Worker {
    slot: u32,
    pid: u32,
    /// `done` (default), `failed`, `exited`, `stopped`.
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: Option<String>,
    /// PSS before and after, bytes.
    #[serde(default)]
    pss: Option<[u64; 2]>,
    /// tracemalloc's traced memory before and after, bytes.
    #[serde(default)]
    traced: [u64; 2],
    #[serde(default)]
    overhead: u64,
    #[serde(default)]
    sites: Vec<Site>,
    /// Stacks, one per thread, outermost frame first, each `file:line in function`.
    #[serde(default)]
    threads: Option<Vec<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Site {
    /// `file:line` frames, innermost first.
    at: Vec<String>,
    size: i64,
    count: i64,
}

fn frame(text: &str) -> Frame {
    let (location, function) = match text.split_once(" in ") {
        Some((l, f)) => (l, Some(f.to_owned())),
        None => (text, None),
    };
    let (file, line) = location.rsplit_once(':').expect("frames are file:line");
    Frame {
        filename: file.to_owned(),
        lineno: line.parse().expect("line number"),
        function,
    }
}

fn result(w: &Worker, outcome: Outcome) -> CommandResult {
    CommandResult {
        version: forkscope_protocol::FORMAT_VERSION,
        request_id: "case".into(),
        action: Action::Capture,
        pid: w.pid,
        slot: w.slot,
        started_at: 0.0,
        finished_at: 1.0,
        outcome,
    }
}

fn run(w: &Worker) -> WorkerRun {
    let state = match w.state.as_deref().unwrap_or("done") {
        "done" => WorkerState::Done,
        "failed" => WorkerState::Failed,
        "exited" => WorkerState::Exited,
        "stopped" => WorkerState::Stopped,
        other => panic!("unknown worker state {other}"),
    };
    let result = if let Some(threads) = &w.threads {
        let threads = threads
            .iter()
            .enumerate()
            .map(|(i, frames)| ThreadStack {
                thread_id: i as u64,
                name: "t".into(),
                current: i == 0,
                frames: frames.iter().map(|f| frame(f)).collect(),
            })
            .collect();
        Some(result(w, Outcome::Stacks { threads }))
    } else if state == WorkerState::Done {
        let sites: Vec<SiteDiff> = w
            .sites
            .iter()
            .map(|s| SiteDiff {
                traceback: s.at.iter().map(|f| frame(f)).collect(),
                size_before: 0,
                size_after: s.size.max(0) as u64,
                size_diff: s.size,
                count_before: 0,
                count_after: s.count.max(0) as u64,
                count_diff: s.count,
            })
            .collect();
        Some(result(
            w,
            Outcome::HeapDiff(HeapDiff {
                frames: 1,
                group_by: GroupBy::Traceback,
                baseline_at: 0.0,
                captured_at: 1.0,
                traced_before: TracedMemory {
                    current: w.traced[0],
                    peak: w.traced[0],
                },
                traced_after: TracedMemory {
                    current: w.traced[1],
                    peak: w.traced[1],
                },
                tracemalloc_overhead_bytes: w.overhead,
                pss_before_bytes: w.pss.map(|p| p[0]),
                pss_after_bytes: w.pss.map(|p| p[1]),
                total_size_diff: sites.iter().map(|s| s.size_diff).sum(),
                total_sites: sites.len() as u64,
                sites,
            }),
        ))
    } else {
        None
    };
    WorkerRun {
        pid: w.pid,
        start_ticks: 1,
        slot: Some(w.slot),
        state,
        error: w.error.clone(),
        result,
    }
}

fn session(workers: &[Worker]) -> Session {
    Session {
        id: "s".into(),
        state: SessionState::Completed,
        request: ProfileRequest::heap_diff(Some(1.0)),
        leader_pid: 1,
        created_at: 0.0,
        finished_at: Some(1.0),
        deadline_at: None,
        error: None,
        workers: workers.iter().map(run).collect(),
        summary: None,
    }
}

fn check(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let case: Case = serde_json::from_str(&text).map_err(|e| format!("parse: {e}"))?;
    let sessions: Vec<(String, Session)> = case
        .pods
        .iter()
        .map(|(pod, workers)| (pod.clone(), session(workers)))
        .collect();
    let pairs = || sessions.iter().map(|(p, s)| (p.as_str(), s));
    let mut checked = 0;
    if let Some(want) = &case.expect_sites {
        let got = serde_json::to_value(aggregate::top_sites(pairs(), case.top)).unwrap();
        if &got != want {
            return Err(format!(
                "{}\nsites: got\n{}\nwant\n{}",
                case.about,
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(want).unwrap()
            ));
        }
        checked += 1;
    }
    if let Some(want) = &case.expect_stacks {
        let got = serde_json::to_value(aggregate::top_stacks(pairs(), case.top)).unwrap();
        if &got != want {
            return Err(format!(
                "{}\nstacks: got\n{}\nwant\n{}",
                case.about,
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(want).unwrap()
            ));
        }
        checked += 1;
    }
    for (pod, want) in case.expect_workers.iter().flatten() {
        let (_, s) = sessions
            .iter()
            .find(|(p, _)| p == pod)
            .ok_or_else(|| format!("no pod {pod} in the case"))?;
        let got = serde_json::to_value(aggregate::workers(s)).unwrap();
        if &got != want {
            return Err(format!(
                "{}\nworkers of {pod}: got\n{}\nwant\n{}",
                case.about,
                serde_json::to_string_pretty(&got).unwrap(),
                serde_json::to_string_pretty(want).unwrap()
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err("the case expects nothing".into());
    }
    Ok(())
}

#[test]
fn aggregate_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aggregate");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/aggregate")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 5, "the corpus lost its cases");
    let failures: Vec<String> = paths
        .iter()
        .filter_map(|p| check(p).err().map(|e| format!("{}: {e}", p.display())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
