//! One `ProfileRequest`'s life, as a state machine over its status: select pods, start one
//! sidecar session per pod (at most `spec.parallelism` at once), collect each when its duration
//! is over, then aggregate. [`advance`] does one step against the [`Sidecars`] trait and returns
//! the new status, the events to publish and when to look again; the controller does the
//! Kubernetes I/O around it. Everything the next step needs is in the status (session ids,
//! start times), so a restarted operator resumes where the last one stopped.

use std::collections::HashMap;
use std::time::Duration;

use forkscope_protocol::GroupBy;
use forkscope_sidecar::api::{self, Session, SessionState, Targets, WorkerState};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::aggregate;
use crate::crd::{
    Phase, PodOutcome, PodPhase, ProfileKind, ProfileRequestSpec, ProfileRequestStatus,
};
use crate::sidecar::{CallError, Sidecars};

/// A pod that currently matches the request's selector, as the controller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: String,
    /// Running, Ready and not being deleted: may be selected.
    pub eligible: bool,
    /// The sidecar's `IP:PORT`, or why the pod has none.
    pub sidecar: Result<String, String>,
}

/// What the request is, beyond its spec.
#[derive(Debug, Clone)]
pub struct RequestRef<'a> {
    /// `profilerequest/NAMESPACE/NAME/UID`, sent to sidecars as the session's owner.
    pub owner: String,
    /// The spec.
    pub spec: &'a ProfileRequestSpec,
    /// `metadata.generation`.
    pub generation: Option<i64>,
}

/// Timing rules of a request.
#[derive(Debug, Clone)]
pub struct Tunables {
    /// How long a pod whose workers are busy with another session is retried.
    pub busy_wait: Duration,
    /// How long past its expected end a session may take to deliver before the pod fails.
    pub collect_grace: Duration,
    /// How often a session that is due is polled.
    pub poll: Duration,
}

impl Default for Tunables {
    fn default() -> Self {
        Self {
            busy_wait: Duration::from_secs(120),
            collect_grace: Duration::from_secs(60),
            poll: Duration::from_millis(500),
        }
    }
}

/// An event to publish on the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// `PascalCase` reason.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct Step {
    /// The status to write.
    pub status: ProfileRequestStatus,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// When to look again (`None`: the request is finished).
    pub requeue: Option<Duration>,
}

/// Parses a duration as the CRD accepts it (`30s`, `2m`, `1m30s`, `1.5h`, `500ms`), in seconds.
pub fn parse_duration(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        total += value * unit;
        rest = &rest[len..];
    }
    Some(total)
}

/// The sidecar request for one pod of this profile request.
pub fn sidecar_request(req: &RequestRef<'_>) -> api::ProfileRequest {
    let spec = req.spec;
    let targets = if let Some(n) = spec.workers.top_by_pss {
        Targets::TopPss {
            count: u32::try_from(n).unwrap_or(1),
        }
    } else if let Some(slots) = &spec.workers.slots {
        Targets::Slots {
            slots: slots
                .iter()
                .filter_map(|s| u32::try_from(*s).ok())
                .collect(),
        }
    } else {
        Targets::All
    };
    let frames = u32::try_from(spec.frames).unwrap_or(1);
    api::ProfileRequest {
        leader_pid: None,
        targets,
        kind: match spec.kind {
            ProfileKind::HeapDiff => api::ProfileKind::HeapDiff,
            ProfileKind::Stacks => api::ProfileKind::Stacks,
        },
        duration_seconds: match spec.kind {
            ProfileKind::HeapDiff => Some(parse_duration(&spec.duration).unwrap_or(30.0)),
            ProfileKind::Stacks => None,
        },
        frames,
        top: u32::try_from(spec.top).unwrap_or(20),
        // With deeper tracebacks, callers tell sites apart.
        group_by: if frames > 1 {
            GroupBy::Traceback
        } else {
            GroupBy::Lineno
        },
        timeout_seconds: None,
        owner: Some(req.owner.clone()),
    }
}

fn seconds_since(now: Timestamp, then: &Time) -> f64 {
    now.duration_since(then.0).as_secs_f64()
}

fn expected_seconds(spec: &ProfileRequestSpec) -> f64 {
    match spec.kind {
        ProfileKind::HeapDiff => parse_duration(&spec.duration).unwrap_or(30.0),
        ProfileKind::Stacks => 0.0,
    }
}

/// Fails `pod` and returns the event that says so.
fn failed(pod: &mut PodOutcome, reason: &str, message: String) -> Option<Note> {
    fail(pod, reason, message);
    note_failed(pod)
}

fn fail(pod: &mut PodOutcome, reason: &str, message: String) {
    pod.phase = PodPhase::Failed;
    pod.reason = Some(reason.to_owned());
    pod.message = Some(message);
}

/// Records a final session on its pod.
fn record(pod: &mut PodOutcome, session: &Session) {
    pod.workers = aggregate::workers(session);
    let delivered = session.workers.iter().any(|w| w.state == WorkerState::Done);
    if session.state == SessionState::Completed && delivered {
        pod.phase = PodPhase::Succeeded;
        pod.reason = None;
        pod.message = None;
        return;
    }
    let reason = match session.state {
        SessionState::TimedOut => "ProfileTimedOut",
        SessionState::Cancelled => "ProfileCancelled",
        SessionState::Orphaned => "SidecarRestarted",
        _ => "NoWorkerResult",
    };
    let why = session.error.clone().unwrap_or_else(|| {
        let errors: Vec<String> = pod
            .workers
            .iter()
            .filter_map(|w| w.error.as_ref().map(|e| format!("slot {}: {e}", w.slot)))
            .collect();
        if errors.is_empty() {
            "no worker delivered a result".to_owned()
        } else {
            errors.join("; ")
        }
    });
    fail(pod, reason, why);
}

fn condition(
    generation: Option<i64>,
    now: Timestamp,
    done: bool,
    reason: &str,
    message: String,
) -> Condition {
    Condition {
        type_: "Complete".to_owned(),
        status: if done { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(now),
        observed_generation: generation,
    }
}

/// Sets the `Complete` condition, keeping its transition time when the status did not change.
fn set_condition(status: &mut ProfileRequestStatus, new: Condition) {
    match status.conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) if old.status == new.status => {
            old.reason = new.reason;
            old.message = new.message;
            old.observed_generation = new.observed_generation;
        }
        Some(old) => *old = new,
        None => status.conditions.push(new),
    }
}

/// Marks the whole request failed before any pod ran.
fn failed_request(
    mut status: ProfileRequestStatus,
    req: &RequestRef<'_>,
    now: Timestamp,
    reason: &str,
    message: String,
) -> Step {
    status.phase = Some(Phase::Failed);
    status.completion_time = Some(Time(now));
    status.start_time.get_or_insert(Time(now));
    set_condition(
        &mut status,
        condition(req.generation, now, true, reason, message.clone()),
    );
    Step {
        status,
        notes: vec![Note {
            warning: true,
            reason: reason.to_owned(),
            message,
        }],
        requeue: None,
    }
}

/// Chooses the pods: every eligible pod matching the selector; those without a sidecar port
/// are skipped with the reason.
fn select(status: &mut ProfileRequestStatus, pods: &[PodInfo]) {
    let mut chosen: Vec<PodOutcome> = pods
        .iter()
        .filter(|p| p.eligible)
        .map(|p| {
            let mut out = PodOutcome {
                name: p.name.clone(),
                uid: Some(p.uid.clone()),
                ..PodOutcome::default()
            };
            match &p.sidecar {
                Ok(addr) => out.sidecar = Some(addr.clone()),
                Err(why) => {
                    out.phase = PodPhase::Skipped;
                    out.reason = Some("NoSidecarPort".to_owned());
                    out.message = Some(why.clone());
                }
            }
            out
        })
        .collect();
    chosen.sort_by(|a, b| a.name.cmp(&b.name));
    status.selected_pods = Some(i32::try_from(chosen.len()).unwrap_or(i32::MAX));
    status.pods = chosen;
}

/// Whether `pod` still exists as the same pod.
fn present(pod: &PodOutcome, pods: &[PodInfo]) -> bool {
    pods.iter()
        .any(|p| p.name == pod.name && Some(&p.uid) == pod.uid.as_ref())
}

/// Checks on a running session: done, still tracing, or lost.
async fn collect<S: Sidecars>(
    pod: &mut PodOutcome,
    pods: &[PodInfo],
    sidecars: &S,
    expected: f64,
    now: Timestamp,
    t: &Tunables,
) -> (Option<Note>, Option<(String, Session)>) {
    let mut collected = None;
    let note = collect_into(pod, pods, sidecars, expected, now, t, &mut collected).await;
    (note, collected)
}

async fn collect_into<S: Sidecars>(
    pod: &mut PodOutcome,
    pods: &[PodInfo],
    sidecars: &S,
    expected: f64,
    now: Timestamp,
    t: &Tunables,
    collected: &mut Option<(String, Session)>,
) -> Option<Note> {
    if !present(pod, pods) {
        return failed(
            pod,
            "PodGone",
            "the pod was deleted or replaced during the profile".into(),
        );
    }
    let (Some(addr), Some(id)) = (pod.sidecar.clone(), pod.session_id.clone()) else {
        return failed(pod, "Internal", "running without a session id".into());
    };
    let age = pod
        .start_time
        .as_ref()
        .map_or(0.0, |s| seconds_since(now, s));
    if age < expected {
        return None;
    }
    let overdue = age > expected + t.collect_grace.as_secs_f64();
    match sidecars.get(&addr, &id).await {
        Ok(session) if session.state.is_final() => {
            record(pod, &session);
            *collected = Some((pod.name.clone(), session));
            if pod.phase == PodPhase::Failed {
                return note_failed(pod);
            }
            None
        }
        Ok(_) if overdue => {
            let _ = sidecars.cancel(&addr, &id).await;
            failed(
                pod,
                "ResultTimeout",
                format!(
                    "session {id} delivered no result within {:.0}s of its end",
                    t.collect_grace.as_secs_f64()
                ),
            )
        }
        Ok(_) => None,
        Err(CallError::NotFound) => failed(
            pod,
            "SessionLost",
            format!("the sidecar no longer knows session {id} (it restarted or expired it)"),
        ),
        Err(CallError::Unreachable(e)) if overdue => failed(pod, "SidecarUnreachable", e),
        Err(CallError::Unreachable(_) | CallError::Busy { .. }) => None,
        Err(e) => failed(pod, "SidecarError", e.to_string()),
    }
}

fn note_failed(pod: &PodOutcome) -> Option<Note> {
    Some(Note {
        warning: true,
        reason: "PodFailed".to_owned(),
        message: format!(
            "{}: {}: {}",
            pod.name,
            pod.reason.as_deref().unwrap_or("Failed"),
            pod.message.as_deref().unwrap_or("")
        ),
    })
}

/// Starts (or adopts) the session of a pending pod.
async fn start<S: Sidecars>(
    pod: &mut PodOutcome,
    pods: &[PodInfo],
    sidecars: &S,
    sreq: &api::ProfileRequest,
    request_start: Option<&Time>,
    now: Timestamp,
    t: &Tunables,
) -> Option<Note> {
    if !present(pod, pods) {
        return failed(
            pod,
            "PodGone",
            "the pod was deleted or replaced before its turn".into(),
        );
    }
    let Some(addr) = pod.sidecar.clone() else {
        return failed(pod, "Internal", "pending without a sidecar address".into());
    };
    // A session this request started earlier (an operator that stopped between starting it and
    // recording it) is adopted: never a second profile on the same pod.
    match sidecars.list(&addr).await {
        Ok(list) => {
            if let Some(mine) = list
                .sessions
                .iter()
                .filter(|s| s.request.owner == sreq.owner)
                .max_by(|a, b| a.created_at.total_cmp(&b.created_at))
            {
                pod.session_id = Some(mine.id.clone());
                pod.phase = PodPhase::Running;
                let started =
                    Timestamp::from_millisecond((mine.created_at * 1000.0) as i64).unwrap_or(now);
                pod.start_time = Some(Time(started));
                return None;
            }
        }
        Err(CallError::Unreachable(e)) => {
            return failed(pod, "SidecarUnreachable", e);
        }
        Err(_) => {}
    }
    match sidecars.start(&addr, sreq).await {
        Ok(session) => {
            pod.session_id = Some(session.id.clone());
            pod.phase = PodPhase::Running;
            pod.start_time = Some(Time(now));
            None
        }
        Err(CallError::Busy { holder }) => {
            pod.busy_retries = Some(pod.busy_retries.unwrap_or(0) + 1);
            let waited = request_start.map_or(0.0, |s| seconds_since(now, s));
            if waited >= t.busy_wait.as_secs_f64() {
                return failed(
                    pod,
                    "WorkerBusy",
                    format!(
                        "a worker stayed busy with another profile session ({holder}) for {:.0}s",
                        t.busy_wait.as_secs_f64()
                    ),
                );
            }
            None
        }
        Err(CallError::Unreachable(e)) => failed(pod, "SidecarUnreachable", e),
        Err(CallError::Rejected { status, reason }) => {
            failed(pod, "SidecarRejected", format!("HTTP {status}: {reason}"))
        }
        Err(e) => failed(pod, "SidecarError", e.to_string()),
    }
}

/// One step of the request. `status` is the request's current status (default when new),
/// `pods` the pods matching its selector now, `cache` the sessions collected so far (kept by
/// the caller between steps; refilled from the sidecars when empty).
pub async fn advance<S: Sidecars>(
    req: &RequestRef<'_>,
    mut status: ProfileRequestStatus,
    pods: &[PodInfo],
    sidecars: &S,
    cache: &mut HashMap<String, Session>,
    now: Timestamp,
    t: &Tunables,
) -> Step {
    let mut notes = Vec::new();
    status.observed_generation = req.generation;
    if status.phase.is_some_and(Phase::is_finished) {
        return Step {
            status,
            notes,
            requeue: None,
        };
    }
    if matches!(status.phase, None | Some(Phase::Pending)) {
        select(&mut status, pods);
        if status.pods.is_empty() {
            return failed_request(
                status,
                req,
                now,
                "NoPodsSelected",
                "no Running and Ready pod matches spec.selector in this namespace".into(),
            );
        }
        if status.pods.iter().all(|p| p.phase == PodPhase::Skipped) {
            let message = format!(
                "none of the {} selected pods has the sidecar port {}",
                status.pods.len(),
                port_text(req.spec)
            );
            return failed_request(status, req, now, "NoSidecarPort", message);
        }
        let skipped = status
            .pods
            .iter()
            .filter(|p| p.phase == PodPhase::Skipped)
            .count();
        status.phase = Some(Phase::Running);
        status.start_time = Some(Time(now));
        set_condition(
            &mut status,
            condition(
                req.generation,
                now,
                false,
                "Running",
                "profiling the selected pods".into(),
            ),
        );
        notes.push(Note {
            warning: false,
            reason: "Started".to_owned(),
            message: format!(
                "profiling {} pod(s) ({}), {skipped} skipped",
                status.pods.len() - skipped,
                match req.spec.kind {
                    ProfileKind::HeapDiff => format!("heap diff over {}", req.spec.duration),
                    ProfileKind::Stacks => "stacks".to_owned(),
                }
            ),
        });
        for p in status.pods.iter().filter(|p| p.phase == PodPhase::Skipped) {
            notes.extend(note_failed(p).map(|mut n| {
                n.reason = "PodSkipped".into();
                n
            }));
        }
    }

    let expected = expected_seconds(req.spec);
    let parallelism = usize::try_from(req.spec.parallelism).unwrap_or(1).max(1);
    let request_start = status.start_time.clone();

    // Collect what is due.
    // (A plain loop builds the futures: a closure here trips the compiler's higher-ranked
    // lifetime inference once the future must be `Send`.)
    let mut collecting = Vec::new();
    for pod in status
        .pods
        .iter_mut()
        .filter(|p| p.phase == PodPhase::Running)
    {
        collecting.push(collect(pod, pods, sidecars, expected, now, t));
    }
    let collected: Vec<_> = futures::stream::iter(collecting)
        .buffer_unordered(parallelism)
        .collect()
        .await;
    for (note, session) in collected {
        notes.extend(note);
        cache.extend(session);
    }

    // Start pending pods while there is room.
    let busy_now = status
        .pods
        .iter()
        .filter(|p| p.phase == PodPhase::Running)
        .count();
    let room = parallelism.saturating_sub(busy_now);
    let sreq = sidecar_request(req);
    let mut starting = Vec::new();
    for pod in status
        .pods
        .iter_mut()
        .filter(|p| p.phase == PodPhase::Pending)
        .take(room)
    {
        starting.push(start(
            pod,
            pods,
            sidecars,
            &sreq,
            request_start.as_ref(),
            now,
            t,
        ));
    }
    let started: Vec<_> = futures::stream::iter(starting)
        .buffer_unordered(parallelism)
        .collect()
        .await;
    notes.extend(started.into_iter().flatten());

    if status.pods.iter().all(|p| p.phase.is_finished()) {
        finish(&mut status, req, sidecars, cache, now, &mut notes).await;
        return Step {
            status,
            notes,
            requeue: None,
        };
    }
    let requeue = next_look(&status, expected, now, t);
    Step {
        status,
        notes,
        requeue: Some(requeue),
    }
}

fn port_text(spec: &ProfileRequestSpec) -> String {
    match &spec.sidecar_port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => {
            format!("named {s:?}")
        }
    }
}

/// When the next step is due: at the earliest expected end of a running session (or soon, when
/// one is already due), and with a growing backoff for pods waiting on busy workers.
fn next_look(
    status: &ProfileRequestStatus,
    expected: f64,
    now: Timestamp,
    t: &Tunables,
) -> Duration {
    let mut next = Duration::from_secs(30);
    for pod in &status.pods {
        let wait = match pod.phase {
            PodPhase::Running => {
                let age = pod
                    .start_time
                    .as_ref()
                    .map_or(0.0, |s| seconds_since(now, s));
                if age < expected {
                    Duration::from_secs_f64(expected - age) + Duration::from_millis(200)
                } else {
                    t.poll
                }
            }
            // Waiting for a busy worker; a pod that only waits for its turn starts when a running
            // one finishes, which is polled anyway.
            PodPhase::Pending if pod.busy_retries.is_some() => {
                let tries = pod.busy_retries.unwrap_or(0).clamp(0, 4);
                t.poll * 2u32.pow(u32::try_from(tries).unwrap_or(0))
            }
            _ => continue,
        };
        next = next.min(wait);
    }
    next
}

/// Aggregates the collected sessions and sets the final phase.
async fn finish<S: Sidecars>(
    status: &mut ProfileRequestStatus,
    req: &RequestRef<'_>,
    sidecars: &S,
    cache: &mut HashMap<String, Session>,
    now: Timestamp,
    notes: &mut Vec<Note>,
) {
    // A restarted operator has an empty cache: fetch what it lacks again.
    for pod in status.pods.iter_mut() {
        if pod.phase != PodPhase::Succeeded || cache.contains_key(&pod.name) {
            continue;
        }
        let (Some(addr), Some(id)) = (pod.sidecar.as_deref(), pod.session_id.as_deref()) else {
            continue;
        };
        match sidecars.get(addr, id).await {
            Ok(session) => {
                cache.insert(pod.name.clone(), session);
            }
            Err(e) => fail(
                pod,
                "ResultLost",
                format!("the result of session {id} could not be fetched again: {e}"),
            ),
        }
    }
    let succeeded: Vec<(&str, &Session)> = status
        .pods
        .iter()
        .filter(|p| p.phase == PodPhase::Succeeded)
        .filter_map(|p| cache.get(&p.name).map(|s| (p.name.as_str(), s)))
        .collect();
    let top = usize::try_from(req.spec.top).unwrap_or(20);
    match req.spec.kind {
        ProfileKind::HeapDiff => {
            status.top_sites = aggregate::top_sites(succeeded.iter().copied(), top);
            status.top_site = status.top_sites.first().map(|s| s.site.clone());
        }
        ProfileKind::Stacks => {
            status.top_stacks = aggregate::top_stacks(succeeded.iter().copied(), top);
            status.top_site = status
                .top_stacks
                .first()
                .and_then(|s| s.frames.first())
                .map(|f| f.split(" in ").next().unwrap_or(f).to_owned());
        }
    }
    let ok = status
        .pods
        .iter()
        .filter(|p| p.phase == PodPhase::Succeeded)
        .count();
    let failed = status.pods.len() - ok;
    status.succeeded_pods = Some(i32::try_from(ok).unwrap_or(i32::MAX));
    status.failed_pods = Some(i32::try_from(failed).unwrap_or(i32::MAX));
    let (phase, reason, message) = if failed == 0 {
        (
            Phase::Succeeded,
            "Succeeded",
            format!("all {ok} pod(s) delivered results"),
        )
    } else if ok > 0 {
        (
            Phase::PartiallySucceeded,
            "PartiallySucceeded",
            format!(
                "{ok} pod(s) delivered results, {failed} failed: {}",
                failed_names(status)
            ),
        )
    } else {
        (
            Phase::Failed,
            "AllPodsFailed",
            format!("no pod delivered a result: {}", failed_names(status)),
        )
    };
    status.phase = Some(phase);
    status.completion_time = Some(Time(now));
    set_condition(
        status,
        condition(req.generation, now, true, reason, message.clone()),
    );
    let message = match &status.top_site {
        Some(site) => format!("{message}; top site {site}"),
        None => message,
    };
    notes.push(Note {
        warning: phase != Phase::Succeeded,
        reason: "Completed".to_owned(),
        message,
    });
}

fn failed_names(status: &ProfileRequestStatus) -> String {
    let names: Vec<String> = status
        .pods
        .iter()
        .filter(|p| p.phase != PodPhase::Succeeded)
        .take(5)
        .map(|p| format!("{} ({})", p.name, p.reason.as_deref().unwrap_or("Failed")))
        .collect();
    let more = status
        .pods
        .iter()
        .filter(|p| p.phase != PodPhase::Succeeded)
        .count()
        .saturating_sub(names.len());
    if more > 0 {
        format!("{} and {more} more", names.join(", "))
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests;
