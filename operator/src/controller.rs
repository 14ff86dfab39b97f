//! The Kubernetes side of the operator: watches `ProfileRequest`s, keeps a finalizer so a request
//! deleted mid-run cancels its sidecar sessions, lists the selected pods, runs one
//! [`request::advance`] step per reconcile, writes the status (server-side apply on the status
//! subresource), spills a large result into an owned ConfigMap, publishes events, and deletes
//! finished requests after `ttlSecondsAfterFinished`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forkscope_sidecar::api::Session;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{self, finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::crd::{
    PodPhase, ProfileRequest, ProfileRequestSpec, ProfileRequestStatus, ResultReference,
};
use crate::metrics::Metrics;
use crate::request::{self, PodInfo, RequestRef, Tunables};
use crate::sidecar::Sidecars;

/// The finalizer that makes deletion wait for running sessions to be cancelled.
pub const FINALIZER: &str = "forkscope.dev/cancel-sessions";

/// The field manager of the operator's writes.
pub const MANAGER: &str = "forkscope-operator";

/// A status larger than this (serialized) moves the full result into a ConfigMap.
pub const STATUS_BUDGET_BYTES: usize = 256 * 1024;

/// The ConfigMap key holding the full result.
pub const RESULT_KEY: &str = "result.json";

/// What every reconcile shares.
pub struct Context<S> {
    /// The Kubernetes client.
    pub client: Client,
    /// The sidecars.
    pub sidecars: S,
    /// Publishes events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Metrics,
    /// Timing rules.
    pub tunables: Tunables,
    /// Sessions collected so far, by request uid then pod name (results are fetched once).
    cache: Mutex<HashMap<String, HashMap<String, Session>>>,
    /// Consecutive failures by request uid, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl<S> Context<S> {
    /// A context for `client`, naming itself `reporter` in events.
    pub fn new(
        client: Client,
        sidecars: S,
        metrics: Metrics,
        tunables: Tunables,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            sidecars,
            metrics,
            tunables,
            cache: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// Why a reconcile failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    /// The object lacks what the API always sets (namespace, uid).
    #[error("{0}")]
    Invalid(String),
}

/// Reads what the controller needs of a pod: whether it may be selected, and its sidecar.
pub fn pod_info(pod: &Pod, port: &IntOrString) -> PodInfo {
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let deleting = pod.metadata.deletion_timestamp.is_some();
    let ip = status.and_then(|s| s.pod_ip.clone());
    let number = match port {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(name) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port)
            .ok_or_else(|| format!("no container of the pod has a port named {name:?}")),
    };
    let sidecar = match (number, ip) {
        (Ok(n), Some(ip)) if ip.contains(':') => Ok(format!("[{ip}]:{n}")),
        (Ok(n), Some(ip)) => Ok(format!("{ip}:{n}")),
        (Ok(_), None) => Err("the pod has no IP".to_owned()),
        (Err(e), _) => Err(e),
    };
    PodInfo {
        name: pod.name_any(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        eligible: running && ready && !deleting,
        sidecar,
    }
}

async fn selected_pods(
    client: &Client,
    ns: &str,
    spec: &ProfileRequestSpec,
) -> Result<Vec<PodInfo>, Error> {
    let selector: kube::core::Selector = spec
        .selector
        .clone()
        .try_into()
        .map_err(|e| Error::Invalid(format!("spec.selector: {e}")))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels_from(&selector))
        .await?;
    Ok(list
        .iter()
        .map(|p| pod_info(p, &spec.sidecar_port))
        .collect())
}

/// Runs the controller until `shutdown` completes. `namespace` restricts it to one namespace.
pub async fn run<S: Sidecars + 'static>(
    ctx: Arc<Context<S>>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    on_store: impl FnOnce(Store<ProfileRequest>),
) {
    let api: Api<ProfileRequest> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let controller =
        Controller::new(api, watcher::Config::default()).graceful_shutdown_on(shutdown);
    on_store(controller.store());
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(namespace = obj.namespace.as_deref().unwrap_or(""), name = %obj.name, "reconciled"),
                Err(e) => tracing::warn!("reconcile failed: {e}"),
            }
        })
        .await;
}

async fn reconcile<S: Sidecars>(
    pr: Arc<ProfileRequest>,
    ctx: Arc<Context<S>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = pr
        .namespace()
        .ok_or_else(|| Error::Invalid("a ProfileRequest without a namespace".into()))?;
    let api: Api<ProfileRequest> = Api::namespaced(ctx.client.clone(), &ns);
    let out = finalizer(&api, FINALIZER, pr, |event| async {
        match event {
            finalizer::Event::Apply(pr) => apply(&pr, &api, &ctx).await,
            finalizer::Event::Cleanup(pr) => cleanup(&pr, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(out.is_ok(), started.elapsed());
    out
}

fn error_policy<S: Sidecars>(pr: Arc<ProfileRequest>, err: &Error, ctx: Arc<Context<S>>) -> Action {
    let uid = pr.uid().unwrap_or_default();
    let n = {
        let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(uid).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    // 1 s, 2 s, 4 s ... up to 5 min: a persistent error never becomes a hot loop.
    let wait =
        Duration::from_secs(1u64 << n.min(8).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::warn!(
        namespace = pr.namespace().as_deref().unwrap_or(""),
        name = %pr.name_any(),
        "reconcile failed ({n} in a row), retrying in {wait:?}: {err}"
    );
    Action::requeue(wait)
}

/// One step of a live request.
async fn apply<S: Sidecars>(
    pr: &ProfileRequest,
    api: &Api<ProfileRequest>,
    ctx: &Context<S>,
) -> Result<Action, Error> {
    let name = pr.name_any();
    let ns = pr.namespace().unwrap_or_default();
    let uid = pr
        .uid()
        .ok_or_else(|| Error::Invalid("a ProfileRequest without a uid".into()))?;
    // Act on the newest status, not the watch cache's: a step that started sessions must never
    // be repeated from a stale copy.
    let Some(pr) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    let status = pr.status.clone().unwrap_or_default();
    if status.phase.is_some_and(|p| p.is_finished()) {
        forget(ctx, &uid);
        return expire(&pr, api, &status).await;
    }
    let pods = selected_pods(&ctx.client, &ns, &pr.spec).await?;
    let req = RequestRef {
        owner: format!("profilerequest/{ns}/{name}/{uid}"),
        spec: &pr.spec,
        generation: pr.metadata.generation,
    };
    let mut cache = {
        let mut all = ctx.cache.lock().unwrap_or_else(|e| e.into_inner());
        all.remove(&uid).unwrap_or_default()
    };
    let step = request::advance(
        &req,
        status,
        &pods,
        &ctx.sidecars,
        &mut cache,
        Timestamp::now(),
        &ctx.tunables,
    )
    .await;
    let mut status = step.status;
    if status.phase.is_some_and(|p| p.is_finished()) {
        fit_status(&pr, &ctx.client, &mut status).await?;
    }
    // Only changes are written: a poll that found nothing new costs no write (and no watch
    // event that would wake this reconcile again).
    if pr.status.as_ref() != Some(&status) {
        write_status(api, &name, &status).await?;
        ctx.metrics.status_written();
    }
    let reference = pr.object_ref(&());
    for note in &step.notes {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.clone(),
            note: Some(truncate(&note.message, 1000)),
            action: "Profile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = %ns, name = %name, "publishing event {}: {e}", note.reason);
        }
    }
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&uid);
    match step.requeue {
        Some(wait) => {
            ctx.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid, cache);
            Ok(Action::requeue(wait))
        }
        None => {
            tracing::info!(namespace = %ns, name = %name, phase = ?status.phase, top_site = status.top_site.as_deref().unwrap_or(""), "finished");
            let mut finished = pr.clone();
            finished.status = Some(status.clone());
            expire(&finished, api, &status).await
        }
    }
}

fn forget<S>(ctx: &Context<S>, uid: &str) {
    ctx.cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
}

/// Deletes a finished request whose TTL ran out, or wakes up when it will.
async fn expire(
    pr: &ProfileRequest,
    api: &Api<ProfileRequest>,
    status: &ProfileRequestStatus,
) -> Result<Action, Error> {
    let (Some(ttl), Some(done)) = (
        pr.spec.ttl_seconds_after_finished,
        status.completion_time.as_ref(),
    ) else {
        return Ok(Action::await_change());
    };
    let age = Timestamp::now().duration_since(done.0).as_secs_f64();
    let left = f64::from(ttl) - age;
    if left > 0.0 {
        return Ok(Action::requeue(
            Duration::from_secs_f64(left) + Duration::from_millis(100),
        ));
    }
    if pr.metadata.deletion_timestamp.is_none() {
        tracing::info!(namespace = pr.namespace().as_deref().unwrap_or(""), name = %pr.name_any(), "ttlSecondsAfterFinished passed: deleting");
        api.delete(&pr.name_any(), &DeleteParams::background())
            .await?;
    }
    Ok(Action::await_change())
}

/// Cancels the sessions of a request deleted mid-run, so no worker is left tracing.
async fn cleanup<S: Sidecars>(pr: &ProfileRequest, ctx: &Context<S>) -> Result<Action, Error> {
    let uid = pr.uid().unwrap_or_default();
    forget(ctx, &uid);
    let Some(status) = pr.status.as_ref() else {
        return Ok(Action::await_change());
    };
    for pod in status.pods.iter().filter(|p| p.phase == PodPhase::Running) {
        let (Some(addr), Some(id)) = (pod.sidecar.as_deref(), pod.session_id.as_deref()) else {
            continue;
        };
        match ctx.sidecars.cancel(addr, id).await {
            Ok(()) => {
                tracing::info!(pod = %pod.name, session = %id, "cancelled: the request was deleted")
            }
            // Best effort: an unreachable sidecar cannot be helped, and must not block deletion.
            Err(e) => tracing::warn!(pod = %pod.name, session = %id, "cancelling on deletion: {e}"),
        }
    }
    Ok(Action::await_change())
}

async fn write_status(
    api: &Api<ProfileRequest>,
    name: &str,
    status: &ProfileRequestStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "forkscope.dev/v1alpha1",
        "kind": "ProfileRequest",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn size(status: &ProfileRequestStatus) -> usize {
    serde_json::to_vec(status).map_or(usize::MAX, |v| v.len())
}

/// The largest result text put in a ConfigMap (whose limit is 1 MiB, metadata included).
pub const CONFIG_MAP_BUDGET_BYTES: usize = 900 * 1024;

/// When `status` exceeds [`STATUS_BUDGET_BYTES`], returns the full result as JSON (pods and
/// ranked lists; the lists cut to fit [`CONFIG_MAP_BUDGET_BYTES`], never the per-pod outcomes)
/// and trims the status to fit: fewer top entries, then no per-worker detail.
pub fn split_large_result(status: &mut ProfileRequestStatus) -> Option<String> {
    if size(status) <= STATUS_BUDGET_BYTES {
        return None;
    }
    let full = |keep: usize| {
        let mut doc = serde_json::json!({
            "pods": status.pods,
            "topSites": status.top_sites.iter().take(keep).collect::<Vec<_>>(),
            "topStacks": status.top_stacks.iter().take(keep).collect::<Vec<_>>(),
        });
        if keep < status.top_sites.len().max(status.top_stacks.len()) {
            doc["truncatedTo"] = keep.into();
        }
        serde_json::to_string(&doc).unwrap_or_default()
    };
    let mut keep = status.top_sites.len().max(status.top_stacks.len());
    let mut text = full(keep);
    while text.len() > CONFIG_MAP_BUDGET_BYTES && keep > 1 {
        keep /= 2;
        text = full(keep);
    }
    while size(status) > STATUS_BUDGET_BYTES
        && (status.top_sites.len() > 1 || status.top_stacks.len() > 1)
    {
        let half_sites = status.top_sites.len().div_ceil(2);
        let half_stacks = status.top_stacks.len().div_ceil(2);
        status.top_sites.truncate(half_sites);
        status.top_stacks.truncate(half_stacks);
    }
    if size(status) > STATUS_BUDGET_BYTES {
        // Thousands of pods: the per-worker detail stays in the ConfigMap only.
        for pod in &mut status.pods {
            pod.workers.clear();
        }
    }
    Some(text)
}

/// Keeps the status within [`STATUS_BUDGET_BYTES`]: when the full result is larger, it goes to a
/// ConfigMap owned by the request (garbage-collected with it), named in the status.
async fn fit_status(
    pr: &ProfileRequest,
    client: &Client,
    status: &mut ProfileRequestStatus,
) -> Result<(), Error> {
    let Some(text) = split_large_result(status) else {
        return Ok(());
    };
    let ns = pr.namespace().unwrap_or_default();
    let name = format!("{}-result", truncate_name(&pr.name_any(), 246));
    let owner = pr
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Invalid("no owner reference".into()))?;
    let label = truncate_name(&pr.name_any(), 63);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "app.kubernetes.io/managed-by": MANAGER,
                "forkscope.dev/profilerequest": label.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()),
            },
            "ownerReferences": [owner],
        },
        "data": {RESULT_KEY: text},
    });
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await?;
    status.result_config_map = Some(ResultReference {
        name,
        key: RESULT_KEY.to_owned(),
    });
    Ok(())
}

fn truncate_name(name: &str, max: usize) -> String {
    name.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PodOutcome, SiteSummary, WorkerOutcome};

    fn site(i: usize) -> SiteSummary {
        SiteSummary {
            site: format!("/srv/app/module_{i}/views.py:{i}"),
            traceback: vec![format!("/srv/app/module_{i}/urls.py:{i}"); 3],
            size_diff_bytes: 1_000_000 - i as i64,
            count_diff: 10,
            workers: 8,
            pods: 100,
            max_worker_size_diff_bytes: 1000,
        }
    }

    #[test]
    fn a_small_result_stays_in_the_status() {
        let mut status = ProfileRequestStatus {
            top_sites: (0..20).map(site).collect(),
            ..ProfileRequestStatus::default()
        };
        let before = status.clone();
        assert_eq!(split_large_result(&mut status), None);
        assert_eq!(status, before);
    }

    #[test]
    fn a_large_result_moves_to_the_config_map_and_the_status_keeps_the_top() {
        let pods: Vec<PodOutcome> = (0..100)
            .map(|p| PodOutcome {
                name: format!("web-{p}"),
                workers: (0..8)
                    .map(|slot| WorkerOutcome {
                        slot,
                        pss_after_bytes: Some(1),
                        ..WorkerOutcome::default()
                    })
                    .collect(),
                ..PodOutcome::default()
            })
            .collect();
        let mut status = ProfileRequestStatus {
            top_sites: (0..5000).map(site).collect(),
            pods,
            ..ProfileRequestStatus::default()
        };
        let full = split_large_result(&mut status).expect("spilled");
        assert!(size(&status) <= STATUS_BUDGET_BYTES, "{}", size(&status));
        assert!(full.len() <= CONFIG_MAP_BUDGET_BYTES, "{}", full.len());
        assert_eq!(
            status.top_sites[0],
            site(0),
            "the status keeps the top of the ranking"
        );
        assert!(
            status.top_sites.len() > 100,
            "as many as fit: {}",
            status.top_sites.len()
        );
        assert_eq!(
            status.pods[0].workers.len(),
            8,
            "per-worker detail kept while it fits"
        );
        let doc: serde_json::Value = serde_json::from_str(&full).expect("JSON");
        assert_eq!(doc["pods"].as_array().map(Vec::len), Some(100));
        let kept = doc["topSites"].as_array().map_or(0, Vec::len);
        assert!(
            kept >= status.top_sites.len(),
            "the ConfigMap has at least the status' sites"
        );
        assert_eq!(doc["topSites"][0]["site"], site(0).site);
    }
}
