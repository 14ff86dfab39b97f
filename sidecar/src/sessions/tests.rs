//! The state machine against fake workers on a paused clock: minutes of timeouts run in
//! milliseconds, and every interleaving is exact.

use std::sync::Arc;
use std::time::Duration;

use forkscope_protocol::Action;
use prometheus::{IntCounterVec, Opts};

use super::fake::{FakeWorkers, key};
use super::journal::Journal;
use super::{SessionLimits, Sessions};
use crate::api::{ProfileRequest, Session, SessionState, WorkerState};
use crate::error::ApiError;

struct Fixture {
    fake: Arc<FakeWorkers>,
    sessions: Sessions,
    _dir: tempfile::TempDir,
}

fn fixture(pids: &[u32]) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(FakeWorkers::new(pids));
    let outcomes =
        IntCounterVec::new(Opts::new("outcomes", "test"), &["outcome"]).expect("constant metric");
    let sessions = Sessions::with_workers(
        fake.clone(),
        Journal::new(dir.path().join("journal")),
        SessionLimits::default(),
        outcomes,
    );
    Fixture {
        fake,
        sessions,
        _dir: dir,
    }
}

impl Fixture {
    /// Starts a session from `json` and waits until it ends.
    async fn run(&self, json: &str) -> Session {
        let s = self.sessions.start(req(json)).await.expect("start");
        wait_final(&self.sessions, &s.id).await
    }
}

fn req(json: &str) -> ProfileRequest {
    serde_json::from_str(json).expect("request")
}

async fn wait_final(s: &Sessions, id: &str) -> Session {
    for _ in 0..100_000 {
        let session = s.get(id).expect("known session");
        if session.state.is_final() {
            return session;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {id} never ended");
}

/// Waits (on the paused clock) until `f` holds for worker `pid`.
async fn until(
    fake: &FakeWorkers,
    pid: u32,
    what: &str,
    f: impl Fn(&super::fake::FakeWorker) -> bool,
) {
    for _ in 0..100_000 {
        if fake.with(pid, |w| f(w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("worker {pid}: {what} never happened");
}

#[tokio::test(start_paused = true)]
async fn a_heap_diff_traces_captures_and_stops_every_worker() {
    let f = fixture(&[10, 11]);
    let done = f.run(r#"{"duration_seconds": 5}"#).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    assert_eq!(done.summary.as_ref().map(|s| s.workers), Some(2));
    for w in &done.workers {
        assert_eq!(w.state, WorkerState::Done);
        assert!(w.result.is_some());
        assert!(!f.fake.with(w.pid, |w| w.tracing));
    }
    // Stopped, released: the same workers can be profiled again.
    f.sessions
        .start(req(r#"{"kind": "stacks"}"#))
        .await
        .expect("workers released");
}

/// Issue 14: a capture that outlasts the result timeout after the worker took it left the
/// worker tracing forever: the `stop` left in `command.json` was never rung.
#[tokio::test(start_paused = true)]
async fn a_worker_that_answers_a_capture_late_is_stopped_afterwards() {
    let f = fixture(&[10, 11]);
    f.fake.with(11, |w| {
        w.takes.insert(Action::Capture, Duration::from_secs(45));
    });
    let done = f.run(r#"{"duration_seconds": 1}"#).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    let late = done
        .workers
        .iter()
        .find(|w| w.pid == 11)
        .expect("worker 11");
    assert_eq!(late.state, WorkerState::Failed, "{late:#?}");
    // Still capturing, and reserved meanwhile.
    assert!(f.fake.with(11, |w| w.tracing));
    let e = f
        .sessions
        .start(req(r#"{"kind": "stacks"}"#))
        .await
        .expect_err("worker 11 still owes an answer");
    assert!(matches!(e, ApiError::Conflict { .. }), "{e:?}");
    until(&f.fake, 11, "tracing stopped", |w| {
        !w.tracing && w.results.is_empty()
    })
    .await;
    assert_eq!(f.fake.with(11, |w| w.toggles), 0, "no bare toggle");
    // Released once it answered.
    for _ in 0..100 {
        if f.sessions.start(req(r#"{"kind": "stacks"}"#)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("worker 11 was never released");
}

/// A worker stopped (SIGSTOP) with its doorbell pending: the start times out, and when the
/// worker wakes it finds a stop, not a start and not a bare toggle.
#[tokio::test(start_paused = true)]
async fn a_frozen_worker_wakes_to_a_stop_and_never_traces() {
    let f = fixture(&[10]);
    let thaw = tokio::time::Instant::now() + Duration::from_secs(60);
    f.fake.with(10, |w| w.frozen_until = Some(thaw));
    let done = f.run(r#"{"duration_seconds": 1}"#).await;
    assert_eq!(done.state, SessionState::Failed, "{done:#?}");
    until(&f.fake, 10, "the stop answered", |w| {
        w.pending.is_none() && w.results.is_empty()
    })
    .await;
    f.fake.with(10, |w| {
        assert!(!w.tracing);
        assert_eq!(w.toggles, 0);
        assert!(w.command.is_none());
    });
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_tracing_and_a_busy_worker_is_a_conflict() {
    let f = fixture(&[10, 11]);
    let s = f.sessions.start(req("{}")).await.expect("start");
    let e = f
        .sessions
        .start(req(r#"{"kind": "stacks"}"#))
        .await
        .expect_err("busy");
    match e {
        ApiError::Conflict { holder, .. } => assert_eq!(holder.as_deref(), Some(s.id.as_str())),
        e => panic!("{e:?}"),
    }
    until(&f.fake, 10, "tracing", |w| w.tracing).await;
    let cancelled = f.sessions.cancel(&s.id).await.expect("cancel");
    assert_eq!(cancelled.state, SessionState::Cancelled);
    assert!(!f.fake.with(10, |w| w.tracing) && !f.fake.with(11, |w| w.tracing));
}

#[tokio::test(start_paused = true)]
async fn an_untimed_heap_diff_times_out_and_stops() {
    let f = fixture(&[10]);
    let done = f.run(r#"{"timeout_seconds": 30}"#).await;
    assert_eq!(done.state, SessionState::TimedOut);
    assert!(!f.fake.with(10, |w| w.tracing));
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_dies_mid_session_is_reported_exited() {
    let f = fixture(&[10, 11]);
    let s = f.sessions.start(req("{}")).await.expect("start");
    until(&f.fake, 11, "tracing", |w| w.tracing).await;
    f.fake.with(11, |w| w.alive = false);
    f.sessions.capture(&s.id).expect("capture");
    let done = wait_final(&f.sessions, &s.id).await;
    assert_eq!(done.state, SessionState::Completed);
    let dead = done
        .workers
        .iter()
        .find(|w| w.pid == 11)
        .expect("worker 11");
    assert_eq!(dead.state, WorkerState::Exited);
    assert_eq!(done.summary.as_ref().map(|s| s.workers), Some(1));
}

#[tokio::test(start_paused = true)]
async fn stacks_of_every_worker() {
    let f = fixture(&[10, 11, 12]);
    let done = f.run(r#"{"kind": "stacks"}"#).await;
    assert_eq!(done.state, SessionState::Completed);
    assert!(done.workers.iter().all(|w| w.result.is_some()));
    // The listing leaves the payloads out.
    let listed = f.sessions.list();
    assert!(
        listed.sessions[0]
            .workers
            .iter()
            .all(|w| w.result.is_none())
    );
    assert_eq!(key(10).pid, 10);
}
