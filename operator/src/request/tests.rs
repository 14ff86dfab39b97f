//! The request state machine against a fake sidecar fleet, step by step with an explicit clock.

use std::collections::HashMap;
use std::sync::Mutex;

use forkscope_protocol::{
    Action, CommandResult, Frame, GroupBy, HeapDiff, Outcome, SiteDiff, TracedMemory,
};
use forkscope_sidecar::api::{
    ProfileRequest, Session, SessionList, SessionState, WorkerRun, WorkerState,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::crd::{Phase, PodPhase, ProfileRequestSpec, ProfileRequestStatus, WorkerSelection};
use crate::sidecar::{CallError, Sidecars};

/// What one fake sidecar does.
#[derive(Default)]
struct FakePod {
    sessions: Vec<Session>,
    /// Answer 409 to this many starts.
    busy: u32,
    unreachable: bool,
    starts: u32,
}

#[derive(Default)]
struct Fleet {
    pods: Mutex<HashMap<String, FakePod>>,
}

fn heap_result(pid: u32, line: u32, bytes: i64) -> CommandResult {
    CommandResult {
        version: 1,
        request_id: "x".into(),
        action: Action::Capture,
        pid,
        slot: 0,
        started_at: 0.0,
        finished_at: 1.0,
        outcome: Outcome::HeapDiff(HeapDiff {
            frames: 1,
            group_by: GroupBy::Lineno,
            baseline_at: 0.0,
            captured_at: 1.0,
            traced_before: TracedMemory::default(),
            traced_after: TracedMemory {
                current: bytes as u64,
                peak: bytes as u64,
            },
            tracemalloc_overhead_bytes: 0,
            pss_before_bytes: Some(1_000_000),
            pss_after_bytes: Some(1_000_000 + bytes as u64),
            total_size_diff: bytes,
            total_sites: 1,
            sites: vec![SiteDiff {
                traceback: vec![Frame {
                    filename: "app/leaky.py".into(),
                    lineno: line,
                    function: None,
                }],
                size_before: 0,
                size_after: bytes as u64,
                size_diff: bytes,
                count_before: 0,
                count_after: 10,
                count_diff: 10,
            }],
        }),
    }
}

impl Fleet {
    fn with(pods: &[&str]) -> Self {
        let fleet = Fleet::default();
        for p in pods {
            fleet
                .pods
                .lock()
                .unwrap()
                .insert(addr(p), FakePod::default());
        }
        fleet
    }

    fn pod<T>(&self, name: &str, f: impl FnOnce(&mut FakePod) -> T) -> T {
        f(self
            .pods
            .lock()
            .unwrap()
            .get_mut(&addr(name))
            .expect("fake pod"))
    }

    /// Every tracing session delivers: two workers, the leak at line 12.
    fn deliver_all(&self) {
        for pod in self.pods.lock().unwrap().values_mut() {
            for s in &mut pod.sessions {
                if s.state == SessionState::Tracing {
                    s.state = SessionState::Completed;
                    for (i, w) in s.workers.iter_mut().enumerate() {
                        w.state = WorkerState::Done;
                        w.result = Some(heap_result(w.pid, 12, 1000 * (i as i64 + 1)));
                    }
                }
            }
        }
    }
}

fn addr(pod: &str) -> String {
    format!("{pod}:9808")
}

impl Sidecars for Fleet {
    async fn start(&self, addr: &str, req: &ProfileRequest) -> Result<Session, CallError> {
        let mut pods = self.pods.lock().unwrap();
        let pod = pods
            .get_mut(addr)
            .ok_or(CallError::Unreachable("no route".into()))?;
        if pod.unreachable {
            return Err(CallError::Unreachable("connection refused".into()));
        }
        if pod.busy > 0 {
            pod.busy -= 1;
            return Err(CallError::Busy {
                holder: "someone-else".into(),
            });
        }
        pod.starts += 1;
        let session = Session {
            id: format!("s{}", pod.starts),
            state: SessionState::Tracing,
            request: req.clone(),
            leader_pid: 1,
            created_at: 100.0,
            finished_at: None,
            deadline_at: None,
            error: None,
            workers: (0..2)
                .map(|slot| WorkerRun {
                    pid: 10 + slot,
                    start_ticks: 1,
                    slot: Some(slot),
                    state: WorkerState::Tracing,
                    error: None,
                    result: None,
                })
                .collect(),
            summary: None,
        };
        pod.sessions.push(session.clone());
        Ok(session)
    }

    async fn get(&self, addr: &str, id: &str) -> Result<Session, CallError> {
        let pods = self.pods.lock().unwrap();
        let pod = pods
            .get(addr)
            .ok_or(CallError::Unreachable("no route".into()))?;
        if pod.unreachable {
            return Err(CallError::Unreachable("connection refused".into()));
        }
        pod.sessions
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or(CallError::NotFound)
    }

    async fn list(&self, addr: &str) -> Result<SessionList, CallError> {
        let pods = self.pods.lock().unwrap();
        let pod = pods
            .get(addr)
            .ok_or(CallError::Unreachable("no route".into()))?;
        if pod.unreachable {
            return Err(CallError::Unreachable("connection refused".into()));
        }
        Ok(SessionList {
            sessions: pod.sessions.clone(),
        })
    }

    async fn cancel(&self, addr: &str, id: &str) -> Result<(), CallError> {
        let mut pods = self.pods.lock().unwrap();
        let pod = pods
            .get_mut(addr)
            .ok_or(CallError::Unreachable("no route".into()))?;
        let s = pod
            .sessions
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(CallError::NotFound)?;
        s.state = SessionState::Cancelled;
        Ok(())
    }
}

fn spec(parallelism: i32) -> ProfileRequestSpec {
    ProfileRequestSpec {
        selector: LabelSelector::default(),
        sidecar_port: IntOrString::String("forkscope".into()),
        kind: ProfileKind::HeapDiff,
        duration: "10s".into(),
        workers: WorkerSelection::all(),
        frames: 1,
        top: 5,
        parallelism,
        ttl_seconds_after_finished: None,
    }
}

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn pod(name: &str) -> PodInfo {
    PodInfo {
        name: name.into(),
        uid: format!("uid-{name}"),
        eligible: true,
        sidecar: Ok(addr(name)),
    }
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap() + SignedDuration::from_secs(secs)
}

struct Run<'a> {
    spec: &'a ProfileRequestSpec,
    fleet: &'a Fleet,
    pods: Vec<PodInfo>,
    status: ProfileRequestStatus,
    cache: HashMap<String, Session>,
    notes: Vec<Note>,
}

impl<'a> Run<'a> {
    fn new(spec: &'a ProfileRequestSpec, fleet: &'a Fleet, pods: Vec<PodInfo>) -> Self {
        Run {
            spec,
            fleet,
            pods,
            status: ProfileRequestStatus::default(),
            cache: HashMap::new(),
            notes: Vec::new(),
        }
    }

    async fn step(&mut self, secs: i64) -> Option<std::time::Duration> {
        let req = RequestRef {
            owner: "profilerequest/ns/r/uid".into(),
            spec: self.spec,
            generation: Some(1),
        };
        let t = Tunables {
            busy_wait: std::time::Duration::from_secs(30),
            ..Tunables::default()
        };
        let step = advance(
            &req,
            self.status.clone(),
            &self.pods,
            self.fleet,
            &mut self.cache,
            at(secs),
            &t,
        )
        .await;
        self.status = step.status;
        self.notes.extend(step.notes);
        step.requeue
    }

    fn phases(&self) -> Vec<(String, PodPhase)> {
        self.status
            .pods
            .iter()
            .map(|p| (p.name.clone(), p.phase))
            .collect()
    }

    fn reasons(&self) -> Vec<&str> {
        self.notes.iter().map(|n| n.reason.as_str()).collect()
    }
}

#[tokio::test]
async fn parallelism_bounds_the_running_pods_and_the_result_is_aggregated() {
    let spec = spec(2);
    let fleet = Fleet::with(&["web-a", "web-b", "web-c"]);
    let mut run = Run::new(
        &spec,
        &fleet,
        vec![pod("web-a"), pod("web-b"), pod("web-c")],
    );
    let wait = run.step(0).await.expect("running");
    assert_eq!(run.status.phase, Some(Phase::Running));
    assert_eq!(run.status.selected_pods, Some(3));
    assert_eq!(
        run.phases(),
        [
            ("web-a".into(), PodPhase::Running),
            ("web-b".into(), PodPhase::Running),
            ("web-c".into(), PodPhase::Pending)
        ]
    );
    assert!(
        run.status.pods[0].session_id.is_some(),
        "session ids are recorded at once"
    );
    assert!(
        wait >= std::time::Duration::from_secs(10),
        "the next look is at the end of the duration, not sooner: {wait:?}"
    );
    // Before the duration is over, nothing is polled or started.
    run.step(5).await;
    assert_eq!(run.phases()[2].1, PodPhase::Pending);
    fleet.deliver_all();
    run.step(11).await.expect("web-c still runs");
    assert_eq!(run.phases()[0].1, PodPhase::Succeeded);
    assert_eq!(
        run.phases()[2].1,
        PodPhase::Running,
        "a freed slot starts the next pod"
    );
    fleet.deliver_all();
    assert_eq!(run.step(22).await, None, "finished");
    assert_eq!(run.status.phase, Some(Phase::Succeeded));
    assert_eq!(run.status.top_site.as_deref(), Some("app/leaky.py:12"));
    let top = &run.status.top_sites[0];
    assert_eq!((top.size_diff_bytes, top.workers, top.pods), (9000, 6, 3));
    assert_eq!(run.status.pods[0].workers.len(), 2);
    assert_eq!(run.status.succeeded_pods, Some(3));
    assert_eq!(run.reasons(), ["Started", "Completed"]);
    assert!(
        fleet.pods.lock().unwrap().values().all(|p| p.starts == 1),
        "one session per pod"
    );
}

#[tokio::test]
async fn no_pod_selected_fails_at_once_with_a_reason() {
    let spec = spec(2);
    let fleet = Fleet::default();
    let mut not_ready = pod("web-a");
    not_ready.eligible = false;
    let mut run = Run::new(&spec, &fleet, vec![not_ready]);
    assert_eq!(run.step(0).await, None);
    assert_eq!(run.status.phase, Some(Phase::Failed));
    let cond = &run.status.conditions[0];
    assert_eq!(
        (cond.reason.as_str(), cond.status.as_str()),
        ("NoPodsSelected", "True")
    );
    assert!(run.status.completion_time.is_some());
}

#[tokio::test]
async fn an_unreachable_sidecar_fails_its_pod_alone() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a", "web-b"]);
    fleet.pod("web-b", |p| p.unreachable = true);
    let mut nameless = pod("web-c");
    nameless.sidecar = Err("no container of the pod has a port named \"forkscope\"".into());
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a"), pod("web-b"), nameless]);
    run.step(0).await;
    assert_eq!(
        run.phases(),
        [
            ("web-a".into(), PodPhase::Running),
            ("web-b".into(), PodPhase::Failed),
            ("web-c".into(), PodPhase::Skipped)
        ]
    );
    assert_eq!(
        run.status.pods[1].reason.as_deref(),
        Some("SidecarUnreachable")
    );
    assert_eq!(run.status.pods[2].reason.as_deref(), Some("NoSidecarPort"));
    fleet.deliver_all();
    assert_eq!(run.step(10).await, None);
    assert_eq!(run.status.phase, Some(Phase::PartiallySucceeded));
    assert_eq!(
        (run.status.succeeded_pods, run.status.failed_pods),
        (Some(1), Some(2))
    );
    let cond = &run.status.conditions[0];
    assert!(
        cond.message.contains("web-b (SidecarUnreachable)"),
        "{}",
        cond.message
    );
    assert!(run.reasons().contains(&"PodFailed"));
}

#[tokio::test]
async fn a_busy_worker_is_retried_then_reported_busy() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a", "web-b"]);
    fleet.pod("web-a", |p| p.busy = 2);
    fleet.pod("web-b", |p| p.busy = 1000);
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a"), pod("web-b")]);
    let wait = run.step(0).await.expect("retrying");
    assert_eq!(run.phases()[0].1, PodPhase::Pending);
    assert!(
        wait < std::time::Duration::from_secs(10),
        "busy pods are retried soon: {wait:?}"
    );
    run.step(1).await;
    run.step(2).await;
    assert_eq!(
        run.phases()[0].1,
        PodPhase::Running,
        "started once the worker was free"
    );
    assert_eq!(run.status.pods[0].busy_retries, Some(2));
    run.step(31).await;
    assert_eq!(run.phases()[1].1, PodPhase::Failed);
    assert_eq!(run.status.pods[1].reason.as_deref(), Some("WorkerBusy"));
    assert!(
        run.status.pods[1]
            .message
            .as_deref()
            .unwrap()
            .contains("someone-else")
    );
}

#[tokio::test]
async fn a_session_started_before_a_restart_is_adopted_not_repeated() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a"]);
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a")]);
    run.step(0).await;
    // The operator "crashed" before its status write landed: the same step runs again from the
    // old status, with an empty cache.
    run.status = ProfileRequestStatus::default();
    run.cache.clear();
    run.step(1).await;
    assert_eq!(run.status.pods[0].session_id.as_deref(), Some("s1"));
    assert_eq!(
        fleet.pod("web-a", |p| p.starts),
        1,
        "no second profile on the same pod"
    );
    fleet.deliver_all();
    assert_eq!(run.step(12).await, None);
    assert_eq!(run.status.phase, Some(Phase::Succeeded));
    // A restart after the pods finished but before the final status landed: the results are
    // fetched again from the sidecars.
    run.status.phase = Some(Phase::Running);
    run.status.top_sites.clear();
    run.status.top_site = None;
    run.cache.clear();
    assert_eq!(run.step(13).await, None);
    assert_eq!(run.status.phase, Some(Phase::Succeeded));
    assert_eq!(run.status.top_site.as_deref(), Some("app/leaky.py:12"));
}

#[tokio::test]
async fn a_pod_deleted_mid_run_fails_as_gone() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a", "web-b"]);
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a"), pod("web-b")]);
    run.step(0).await;
    // web-b was replaced by a pod of the same name.
    run.pods[1].uid = "uid-new".into();
    fleet.deliver_all();
    run.step(10).await;
    assert_eq!(run.status.pods[1].reason.as_deref(), Some("PodGone"));
    assert_eq!(run.status.phase, Some(Phase::PartiallySucceeded));
}

#[tokio::test]
async fn a_session_that_never_delivers_times_out_and_is_cancelled() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a"]);
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a")]);
    run.step(0).await;
    run.step(11).await.expect("waiting for the result");
    assert_eq!(run.phases()[0].1, PodPhase::Running);
    assert_eq!(run.step(10 + 61).await, None);
    assert_eq!(run.status.pods[0].reason.as_deref(), Some("ResultTimeout"));
    assert_eq!(run.status.phase, Some(Phase::Failed));
    assert_eq!(
        fleet.pod("web-a", |p| p.sessions[0].state),
        SessionState::Cancelled
    );
}

#[tokio::test]
async fn a_sidecar_that_forgot_the_session_fails_the_pod() {
    let spec = spec(5);
    let fleet = Fleet::with(&["web-a"]);
    let mut run = Run::new(&spec, &fleet, vec![pod("web-a")]);
    run.step(0).await;
    fleet.pod("web-a", |p| p.sessions.clear());
    run.step(10).await;
    assert_eq!(run.status.pods[0].reason.as_deref(), Some("SessionLost"));
}

#[test]
fn durations_parse_as_the_crd_accepts_them() {
    for (text, secs) in [
        ("30s", 30.0),
        ("2m", 120.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
    ] {
        assert_eq!(parse_duration(text), Some(secs), "{text}");
    }
    for bad in ["", "10", "1d", "s", "1m30"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

#[test]
fn the_sidecar_request_carries_the_spec() {
    let mut s = spec(1);
    s.workers = WorkerSelection {
        top_by_pss: Some(2),
        ..WorkerSelection::default()
    };
    s.frames = 5;
    let req = RequestRef {
        owner: "profilerequest/a/b/c".into(),
        spec: &s,
        generation: None,
    };
    let sr = sidecar_request(&req);
    assert_eq!(
        sr.targets,
        forkscope_sidecar::api::Targets::TopPss { count: 2 }
    );
    assert_eq!(sr.duration_seconds, Some(10.0));
    assert_eq!(sr.group_by, GroupBy::Traceback);
    assert_eq!(sr.owner.as_deref(), Some("profilerequest/a/b/c"));
    s.kind = ProfileKind::Stacks;
    s.workers = WorkerSelection {
        slots: Some(vec![0, 3]),
        ..WorkerSelection::default()
    };
    let sr = sidecar_request(&RequestRef {
        owner: "o".into(),
        spec: &s,
        generation: None,
    });
    assert_eq!(sr.kind, forkscope_sidecar::api::ProfileKind::Stacks);
    assert_eq!(sr.duration_seconds, None);
    assert_eq!(
        sr.targets,
        forkscope_sidecar::api::Targets::Slots { slots: vec![0, 3] }
    );
}
