//! The `ProfileRequest` custom resource (`forkscope.dev/v1alpha1`): what a user asks the
//! operator to profile (the spec) and what the operator found (the status).
//!
//! These Rust types *are* the schema. The CRD YAML in `crds/` is generated from them by
//! `forkscope-operator crd`, and a test fails when the committed file is stale. Validation lives
//! in the schema (ranges, enums, required fields, CEL rules) so that the apiserver rejects a bad
//! spec with a clear message before the operator ever sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

// The bounds the sidecar's API enforces; the CRD takes the same ones.
use forkscope_protocol::command::{MAX_FRAMES, MAX_TARGET_WORKERS, MAX_TOP};

/// Name under which the generated CRD is installed (`PLURAL.GROUP`).
pub const CRD_NAME: &str = "profilerequests.forkscope.dev";

/// Asks forkscope to profile the workers of a set of pods in this namespace.
///
/// The operator talks to the forkscope sidecar of every selected pod, profiles the selected
/// workers for `duration` (heap diff) or takes one snapshot (stacks), and writes per-pod and
/// per-worker outcomes plus the top allocation sites aggregated across all of them to the status.
/// The spec cannot change after creation: create a new request instead.
// Several `printcolumn(type_ = "string", ..)` entries look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[cfg_attr(test, derive(Default))]
#[kube(
    group = "forkscope.dev",
    version = "v1alpha1",
    kind = "ProfileRequest",
    plural = "profilerequests",
    shortname = "profreq",
    category = "forkscope",
    namespaced,
    status = "ProfileRequestStatus",
    derive = "PartialEq",
    doc = "ProfileRequest asks forkscope to profile the Python workers of selected pods.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Where the request is in its life cycle"
    ),
    printcolumn(
        name = "Pods",
        type_ = "integer",
        json_path = ".status.selectedPods",
        description = "Pods selected for profiling"
    ),
    printcolumn(
        name = "Top site",
        type_ = "string",
        json_path = ".status.topSite",
        description = "The allocation site that grew most, across all workers and pods"
    ),
    printcolumn(
        name = "Kind",
        type_ = "string",
        json_path = ".spec.kind",
        priority = "1",
        description = "HeapDiff or Stacks"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new ProfileRequest instead"))]
#[serde(rename_all = "camelCase")]
pub struct ProfileRequestSpec {
    /// Which pods of this namespace to profile. It must not be empty: an empty selector would
    /// select every pod in the namespace.
    #[x_kube(validation = Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("selector must not be empty: set matchLabels or matchExpressions"))]
    pub selector: LabelSelector,

    /// The forkscope sidecar's container port: a number (1-65535) or a port name.
    #[serde(default = "default_sidecar_port")]
    #[schemars(schema_with = "int_or_string_schema")]
    #[x_kube(validation = Rule::new(
        "type(self) == int ? (self >= 1 && self <= 65535) : (size(self) <= 15 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("sidecarPort must be a port number 1-65535 or a port name (lowercase letters, digits and '-', at most 15 characters)"))]
    pub sidecar_port: IntOrString,

    /// What to collect: `HeapDiff` (tracemalloc snapshots at start and after `duration`, diffed)
    /// or `Stacks` (one snapshot of every selected worker's Python stacks).
    #[serde(default)]
    pub kind: ProfileKind,

    /// How long to trace before capturing the heap diff, as a duration such as `30s`, `2m` or
    /// `1m30s` (between 1s and 1h). Ignored for `Stacks`.
    #[serde(default = "default_duration")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(
        "self.matches('^([0-9]+(\\\\.[0-9]+)?(ms|s|m|h))+$') && duration(self) >= duration('1s') && duration(self) <= duration('1h')"
    ).message("duration must be a duration between 1s and 1h, such as 30s, 2m or 1m30s"))]
    pub duration: String,

    /// Which workers of each selected pod to profile. Set exactly one of `all`, `topByPss`,
    /// `slots`. Defaults to all workers.
    #[serde(default = "WorkerSelection::all")]
    pub workers: WorkerSelection,

    /// Traceback depth recorded per allocation (tracemalloc frames), 1-100. Deeper tracebacks
    /// cost the worker more memory and time while tracing.
    #[serde(default = "default_frames")]
    #[schemars(range(min = 1, max = MAX_FRAMES))]
    pub frames: i32,

    /// How many allocation sites to report (per worker, and in the aggregate), 1-10000. The
    /// status keeps as many as fit; the full list then goes to `status.resultConfigMap`.
    #[serde(default = "default_top")]
    #[schemars(range(min = 1, max = MAX_TOP))]
    pub top: i32,

    /// How many pods are profiled at once, 1-100.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 100))]
    pub parallelism: i32,

    /// Seconds after the request finished (Succeeded, PartiallySucceeded or Failed) after which
    /// the operator deletes it. Kept forever when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
}

fn default_sidecar_port() -> IntOrString {
    IntOrString::String("forkscope".to_owned())
}

/// `IntOrString` as a non-nullable int-or-string (the generated schema would also allow null,
/// which would bypass the default and the port rule).
fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true, "nullable": false })
}

fn default_duration() -> String {
    "30s".to_owned()
}

fn default_frames() -> i32 {
    1
}

fn default_top() -> i32 {
    20
}

fn default_parallelism() -> i32 {
    5
}

/// What a profile session collects.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProfileKind {
    /// tracemalloc baseline at start, capture after `duration`, diffed per allocation site.
    #[default]
    HeapDiff,
    /// One snapshot of the Python stacks of every selected worker.
    Stacks,
}

/// Which workers of a pod to profile: exactly one of the three modes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new(
    "[has(self.all), has(self.topByPss), has(self.slots)].exists_one(x, x)"
).message("workers: set exactly one of all, topByPss or slots"))]
#[serde(rename_all = "camelCase")]
pub struct WorkerSelection {
    /// Every worker of the pod. Only `true` is meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self").message("workers.all can only be true; use topByPss or slots to narrow the selection"))]
    pub all: Option<bool>,

    /// The N workers with the largest proportional set size (PSS), 1-1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TARGET_WORKERS))]
    pub top_by_pss: Option<i32>,

    /// The workers in these stable slots (0-based, as in `forkscope-server: worker N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_TARGET_WORKERS), inner(range(min = 0, max = 4095)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub slots: Option<Vec<i32>>,
}

impl WorkerSelection {
    /// Every worker of each selected pod (the default).
    pub fn all() -> Self {
        Self {
            all: Some(true),
            ..Self::default()
        }
    }
}

/// Where a request is in its life cycle.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, no pod contacted yet.
    #[default]
    Pending,
    /// Profile sessions are in progress on at least one pod.
    Running,
    /// Every selected worker of every selected pod delivered a result.
    Succeeded,
    /// Some workers or pods delivered results, others failed.
    PartiallySucceeded,
    /// No result could be collected (or no pod matched the selector).
    Failed,
}

impl Phase {
    /// Every phase, in life-cycle order.
    pub const ALL: [Phase; 5] = [
        Phase::Pending,
        Phase::Running,
        Phase::Succeeded,
        Phase::PartiallySucceeded,
        Phase::Failed,
    ];

    /// The name in the status and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Succeeded => "Succeeded",
            Phase::PartiallySucceeded => "PartiallySucceeded",
            Phase::Failed => "Failed",
        }
    }

    /// Whether the request has finished (its `ttlSecondsAfterFinished` clock runs).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::PartiallySucceeded | Self::Failed
        )
    }
}

/// What the operator found. Written only by the operator, through the status subresource.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfileRequestStatus {
    /// Where the request is in its life cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Standard conditions (e.g. `Ready`, `Complete`), one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// When the operator started contacting pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the request finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// How many pods the selector matched when the request started (skipped ones included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub selected_pods: Option<i32>,

    /// How many pods delivered a result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub succeeded_pods: Option<i32>,

    /// How many pods failed or were skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub failed_pods: Option<i32>,

    /// The outcome of every selected pod, one entry per pod name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub pods: Vec<PodOutcome>,

    /// HeapDiff: the allocation sites that grew most, aggregated across all workers and pods,
    /// largest growth first (at most `spec.top`, and fewer when the status would grow too large:
    /// see `resultConfigMap`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_sites: Vec<SiteSummary>,

    /// Stacks: identical stacks across all workers and pods, the most frequent first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_stacks: Vec<StackSummary>,

    /// `FILE:LINE` of the site that grew most (HeapDiff), or the innermost frame of the most
    /// frequent stack (Stacks), for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_site: Option<String>,

    /// A ConfigMap owned by this request that holds the full result, set when the result is too
    /// large for the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_config_map: Option<ResultReference>,
}

/// Progress of one selected pod.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PodPhase {
    /// Waiting for its turn (`spec.parallelism`) or for a busy worker.
    #[default]
    Pending,
    /// A sidecar session runs; its id is in `sessionId`.
    Running,
    /// The session delivered a result for at least one worker.
    Succeeded,
    /// No result: see `reason` and `message`.
    Failed,
    /// Not profiled: the pod has no sidecar port (see `reason`).
    Skipped,
}

impl PodPhase {
    /// Whether this pod is done (successfully or not).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}

/// What happened on one selected pod.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodOutcome {
    /// The pod's name.
    pub name: String,

    /// The pod's uid: a pod re-created under the same name is another pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,

    /// The sidecar's address (`IP:PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<String>,

    /// Progress of this pod.
    pub phase: PodPhase,

    /// Why the pod failed or was skipped, in `PascalCase` (e.g. `SidecarUnreachable`,
    /// `WorkerBusy`, `PodGone`, `NoSidecarPort`); see docs/OPERATOR.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// The details of `reason`, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The sidecar's profile session id, recorded as soon as the session exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,

    /// When the session started on this pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// Start attempts refused because a worker was busy with another session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub busy_retries: Option<i32>,

    /// One entry per profiled worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerOutcome>,
}

/// What happened to one worker of a pod.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerOutcome {
    /// The worker's stable slot.
    #[schemars(range(min = 0))]
    pub slot: i32,

    /// The worker's process id inside the pod when it was profiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,

    /// Proportional set size when profiling started, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub pss_before_bytes: Option<i64>,

    /// Proportional set size at capture, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub pss_after_bytes: Option<i64>,

    /// Growth of the memory tracemalloc traced, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traced_growth_bytes: Option<i64>,

    /// True when PSS grew far more than tracemalloc saw (after tracemalloc's own overhead):
    /// memory that Python's allocator did not hand out, typically a C extension's leak.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub native_growth_suspected: bool,

    /// Why this worker delivered no result; unset on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One allocation site in the aggregate over all profiled workers and pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteSummary {
    /// `file:line` of the innermost frame.
    pub site: String,

    /// The outer frames (`file:line`), innermost first, up to `spec.frames - 1` of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traceback: Vec<String>,

    /// Growth in bytes between start and capture, summed over workers.
    pub size_diff_bytes: i64,

    /// Growth in allocated blocks between start and capture, summed over workers.
    pub count_diff: i64,

    /// In how many workers the site grew.
    #[schemars(range(min = 0))]
    pub workers: i32,

    /// In how many pods the site grew.
    #[schemars(range(min = 0))]
    pub pods: i32,

    /// The largest growth of the site in a single worker, in bytes.
    pub max_worker_size_diff_bytes: i64,
}

/// One distinct Python stack, counted across all profiled workers and pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StackSummary {
    /// Frames as `file:line in function`, innermost first.
    pub frames: Vec<String>,

    /// How many threads were in exactly this stack.
    #[schemars(range(min = 0))]
    pub threads: i32,

    /// In how many workers.
    #[schemars(range(min = 0))]
    pub workers: i32,

    /// In how many pods.
    #[schemars(range(min = 0))]
    pub pods: i32,
}

/// Points at the ConfigMap key that holds the full result JSON.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultReference {
    /// ConfigMap name, in the request's namespace.
    pub name: String,
    /// Key within the ConfigMap.
    pub key: String,
}

/// The CRD as YAML, exactly as committed in `crds/profilerequests.forkscope.dev.yaml`.
///
/// # Errors
/// Only if the CRD cannot be serialized, which would be a bug in the types.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&ProfileRequest::crd())?;
    Ok(format!(
        "# Generated from operator/src/crd.rs by `forkscope-operator crd`. Do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed copies of the CRD, relative to the repository: the one `kubectl apply`
    /// uses, and the Helm chart's (Helm installs a chart's `crds/` before anything else).
    const COMMITTED: [&str; 2] = [
        "crds/profilerequests.forkscope.dev.yaml",
        "charts/forkscope/crds/profilerequests.forkscope.dev.yaml",
    ];

    #[test]
    fn committed_crd_is_current() {
        let generated = crd_yaml().expect("the CRD serializes");
        for file in COMMITTED {
            let path = format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"));
            let committed = std::fs::read_to_string(path).unwrap_or_default();
            assert!(
                committed == generated,
                "{file} is stale; regenerate it with\n  \
                 cargo run -q -p forkscope-operator -- crd | tee {} >/dev/null",
                COMMITTED.join(" ")
            );
        }
    }

    #[test]
    fn crd_names_and_subresources() {
        let crd = ProfileRequest::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
        assert_eq!(crd.spec.group, "forkscope.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "ProfileRequest");
        assert_eq!(crd.spec.names.short_names, Some(vec!["profreq".to_owned()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Phase", "Pods", "Top site", "Kind", "Age"]);
    }

    /// The CRD accepts exactly what the sidecar's API accepts, so a valid request can never be
    /// refused by a sidecar for its size (both take the bounds from `forkscope_protocol`).
    #[test]
    fn crd_bounds_equal_the_sidecars() {
        let crd = serde_json::to_value(ProfileRequest::crd()).expect("serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let number = |v: &serde_json::Value| v.as_f64().expect("a number");
        assert_eq!(number(&spec["top"]["maximum"]), f64::from(MAX_TOP));
        assert_eq!(number(&spec["frames"]["maximum"]), f64::from(MAX_FRAMES));
        let workers = &spec["workers"]["properties"];
        let max_workers = f64::from(MAX_TARGET_WORKERS);
        assert_eq!(number(&workers["topByPss"]["maximum"]), max_workers);
        assert_eq!(number(&workers["slots"]["maxItems"]), max_workers);
    }

    #[test]
    fn a_minimal_spec_gets_the_documented_defaults() {
        let spec: ProfileRequestSpec = serde_json::from_value(
            serde_json::json!({"selector": {"matchLabels": {"app": "web"}}}),
        )
        .expect("a selector alone is a valid spec");
        assert_eq!(spec.sidecar_port, IntOrString::String("forkscope".into()));
        assert_eq!(spec.kind, ProfileKind::HeapDiff);
        assert_eq!(spec.duration, "30s");
        assert_eq!(spec.workers, WorkerSelection::all());
        assert_eq!((spec.frames, spec.top, spec.parallelism), (1, 20, 5));
        assert_eq!(spec.ttl_seconds_after_finished, None);
    }

    #[test]
    fn finished_phases() {
        let finished: Vec<Phase> = [
            Phase::Pending,
            Phase::Running,
            Phase::Succeeded,
            Phase::PartiallySucceeded,
            Phase::Failed,
        ]
        .into_iter()
        .filter(|p| p.is_finished())
        .collect();
        assert_eq!(
            finished,
            [Phase::Succeeded, Phase::PartiallySucceeded, Phase::Failed]
        );
    }

    #[test]
    fn status_round_trips_in_camel_case() {
        let status = ProfileRequestStatus {
            phase: Some(Phase::PartiallySucceeded),
            selected_pods: Some(2),
            pods: vec![PodOutcome {
                name: "web-0".into(),
                phase: PodPhase::Succeeded,
                workers: vec![WorkerOutcome {
                    slot: 3,
                    pss_before_bytes: Some(10),
                    pss_after_bytes: Some(20),
                    ..WorkerOutcome::default()
                }],
                ..PodOutcome::default()
            }],
            ..ProfileRequestStatus::default()
        };
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["selectedPods"], 2);
        assert_eq!(json["pods"][0]["workers"][0]["pssAfterBytes"], 20);
        assert!(json.get("conditions").is_none(), "empty lists are omitted");
        let back: ProfileRequestStatus = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, status);
    }
}
