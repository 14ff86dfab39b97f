//! The `/v1` request and response types (serde + JSON Schema), shared with the operator.
//!
//! Everything the sidecar answers or accepts over HTTP is declared here once: the routes
//! serialize these types, [`crate::openapi`] derives the OpenAPI document from them, and
//! [`crate::client::Client`] deserializes them. JSON field names are `snake_case`.

use std::collections::BTreeMap;

use forkscope_protocol::{CommandResult, Frame, GroupBy};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API version prefix of every route but health and metrics.
pub const API_PREFIX: &str = "/v1";

/// Which pre-fork server a process belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ServerKind {
    /// forkscope-server (titles `forkscope-server: leader|worker N [APP]`); can be profiled.
    Forkscope,
    /// gunicorn (titles `gunicorn: master|worker [APP]`, or a Python process running gunicorn);
    /// discovery, memory and leader management only.
    Gunicorn,
}

impl ServerKind {
    /// The name used in JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ServerKind::Forkscope => "forkscope",
            ServerKind::Gunicorn => "gunicorn",
        }
    }
}

/// Memory of one process in bytes, as the kernel reports it in `/proc/PID/smaps_rollup`
/// (or summed over `/proc/PID/smaps` on kernels without the rollup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Memory {
    /// Proportional set size: private pages plus each shared page divided by its sharers.
    /// Summing PSS over a pod's processes gives the pod's real footprint.
    pub pss_bytes: u64,
    /// Resident set size: every resident page, shared ones counted in full.
    pub rss_bytes: u64,
    /// Unique set size: `Private_Clean + Private_Dirty`, what exiting the process would free.
    pub uss_bytes: u64,
    /// `Shared_Clean + Shared_Dirty`: resident pages also mapped by another process.
    pub shared_bytes: u64,
    /// Swapped-out anonymous memory.
    pub swap_bytes: u64,
}

/// A leader or worker process as discovered in `/proc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessView {
    /// The process id (in the pod's PID namespace).
    pub pid: u32,
    /// Start time since boot in clock ticks (`/proc/PID/stat` field 22); with `pid` it
    /// identifies the process across PID reuse.
    pub start_ticks: u64,
    /// Start time, seconds since the Unix epoch.
    pub started_at: f64,
    /// The worker slot: stable across respawns for forkscope-server; for gunicorn, which has no
    /// slots, the worker's age rank (0 = oldest), which is not stable.
    pub slot: Option<u32>,
    /// The process title (its command line).
    pub title: String,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Memory, or `None` when the kernel would not tell (the process vanished mid-read, or
    /// smaps is not readable for this user).
    pub memory: Option<Memory>,
}

/// A leader and its workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LeaderView {
    /// forkscope-server or gunicorn.
    pub server: ServerKind,
    /// The application as the title names it (`module:callable`, or gunicorn's proc name).
    pub app: String,
    /// The leader process.
    pub leader: ProcessView,
    /// Its workers, by slot (forkscope-server) or age (gunicorn).
    pub workers: Vec<ProcessView>,
}

/// `GET /v1/processes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessList {
    /// Every leader found, with its workers.
    pub leaders: Vec<LeaderView>,
}

/// `GET /v1/recycles`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RecycleList {
    /// What each running leader recorded (it keeps its newest
    /// [`forkscope_protocol::recycle::KEPT`]).
    pub recycles: Vec<forkscope_protocol::recycle::Recycle>,
}

/// What a profile session collects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProfileKind {
    /// tracemalloc baseline at the start, capture at the end, diffed per allocation site.
    #[default]
    HeapDiff,
    /// One dump of every Python thread's stack.
    Stacks,
}

/// Which workers of the leader a session profiles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Targets {
    /// Every worker.
    #[default]
    All,
    /// The workers in these slots; an unknown slot is a 422.
    Slots {
        /// 0-based slots, as in `forkscope-server: worker N`.
        slots: Vec<u32>,
    },
    /// The `count` workers with the largest PSS at the moment the session starts.
    TopPss {
        /// How many, 1..=1024.
        count: u32,
    },
}

/// `POST /v1/profiles`: start a profile session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileRequest {
    /// The leader whose workers are profiled; may be left out when the pod has exactly one
    /// forkscope-server leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_pid: Option<u32>,
    /// Which workers.
    #[serde(default)]
    pub targets: Targets,
    /// Heap diff or stacks.
    #[serde(default)]
    pub kind: ProfileKind,
    /// Heap diff only: seconds between baseline and capture, 0.1..=3600. Left out, the session
    /// traces until `POST /v1/profiles/{id}/capture` (or its timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Traceback depth recorded (tracemalloc frames), 1..=100.
    #[serde(default = "default_frames")]
    pub frames: u32,
    /// Sites listed per worker and in the summary, 1..=10000.
    #[serde(default = "default_top")]
    pub top: u32,
    /// How sites are grouped.
    #[serde(default)]
    pub group_by: GroupBy,
    /// Heap diff without `duration_seconds`: how long the session may trace before it is
    /// stopped as timed out, 1..=86400 (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
    /// Who asked, as the caller names itself (the operator sends
    /// `profilerequest/NAMESPACE/NAME/UID`): printable ASCII, at most 256 bytes. It is kept in
    /// the session, so a caller that lost track of a session it started finds it in
    /// `GET /v1/profiles` instead of starting a second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The longest `owner` a profile request may carry.
pub const MAX_OWNER_BYTES: usize = 256;

/// Default traceback depth of a session.
pub fn default_frames() -> u32 {
    1
}

/// Default number of sites listed.
pub fn default_top() -> u32 {
    50
}

impl ProfileRequest {
    /// A heap diff over every worker of the only leader, with default parameters.
    pub fn heap_diff(duration_seconds: Option<f64>) -> Self {
        Self {
            leader_pid: None,
            targets: Targets::All,
            kind: ProfileKind::HeapDiff,
            duration_seconds,
            frames: default_frames(),
            top: default_top(),
            group_by: GroupBy::Lineno,
            timeout_seconds: None,
            owner: None,
        }
    }

    /// A stack dump of every worker of the only leader.
    pub fn stacks() -> Self {
        Self {
            kind: ProfileKind::Stacks,
            ..Self::heap_diff(None)
        }
    }
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Commands are being delivered to the workers.
    Starting,
    /// Tracing in every worker, waiting for the duration or a capture call.
    Tracing,
    /// Capturing and stopping.
    Capturing,
    /// Finished; every worker answered (some may have exited: see their states).
    Completed,
    /// Finished without a usable result from any worker.
    Failed,
    /// Cancelled through `DELETE`; tracing was stopped.
    Cancelled,
    /// Stopped because it traced longer than its timeout.
    TimedOut,
    /// Started by an earlier sidecar process that ended mid-session; this one stopped the
    /// tracing it left behind.
    Orphaned,
}

impl SessionState {
    /// True once the session can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            SessionState::Starting | SessionState::Tracing | SessionState::Capturing
        )
    }

    /// The name used in JSON and as the `outcome` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Tracing => "tracing",
            SessionState::Capturing => "capturing",
            SessionState::Completed => "completed",
            SessionState::Failed => "failed",
            SessionState::Cancelled => "cancelled",
            SessionState::TimedOut => "timed_out",
            SessionState::Orphaned => "orphaned",
        }
    }
}

/// Where one worker of a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Its command was sent; no answer yet.
    Pending,
    /// Tracing started.
    Tracing,
    /// Its result is in `result`.
    Done,
    /// The worker refused or did not answer in time: see `error`.
    Failed,
    /// The worker exited during the session: see `error` (and `result` when it wrote one).
    Exited,
    /// Tracing was stopped without a capture (cancel, timeout, orphan clean-up).
    Stopped,
}

/// One worker's part in a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerRun {
    /// The worker's PID.
    pub pid: u32,
    /// Its start time in clock ticks since boot (identifies it with `pid`).
    pub start_ticks: u64,
    /// Its slot.
    pub slot: Option<u32>,
    /// Where it stands.
    pub state: WorkerState,
    /// Why it failed or exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The worker's result file for the capture (heap diff), stacks, or exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<CommandResult>,
}

/// One allocation site summed over every worker of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SummarySite {
    /// The site's traceback (most recent call first), as the workers reported it.
    pub traceback: Vec<Frame>,
    /// Sum of `size_diff` over the workers that list the site.
    pub size_diff: i64,
    /// Sum of `count_diff`.
    pub count_diff: i64,
    /// Sum of `size_after`.
    pub size_after: u64,
    /// In how many workers' results the site appears.
    pub workers: u32,
}

/// A heap-diff session's result across workers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Summary {
    /// How many workers contributed a heap diff.
    pub workers: u32,
    /// Sum of every worker's `total_size_diff` (all sites, listed or not).
    pub total_size_diff: i64,
    /// Sum over workers of PSS at capture minus PSS at baseline, where both are known.
    pub pss_growth_bytes: i64,
    /// Sites ranked by summed `size_diff`, largest growth first, cut to the session's `top`.
    pub sites: Vec<SummarySite>,
}

/// A profile session, as `GET /v1/profiles/{id}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Session {
    /// The session id; also the request id in the workers' command and result files.
    pub id: String,
    /// Where it stands.
    pub state: SessionState,
    /// What was asked.
    pub request: ProfileRequest,
    /// The leader whose workers are profiled.
    pub leader_pid: u32,
    /// Created, seconds since the Unix epoch.
    pub created_at: f64,
    /// Finished, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<f64>,
    /// A heap-diff session without a duration: when it times out, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<f64>,
    /// Why it failed, timed out or was orphaned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per worker.
    pub workers: Vec<WorkerRun>,
    /// Heap diffs aggregated across workers (heap-diff sessions with at least one result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

/// `GET /v1/profiles`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionList {
    /// Running sessions and the finished ones still retained, oldest first; the workers'
    /// `result` payloads are left out (get one session for them), the summary is kept.
    pub sessions: Vec<Session>,
}

/// Names a leader in a management call; may be left out when the pod has exactly one leader.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaderSelector {
    /// The leader's PID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_pid: Option<u32>,
}

/// `PUT /v1/leader/workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// The leader's PID; may be left out when the pod has exactly one leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_pid: Option<u32>,
    /// The wanted number of workers, 1..=1024.
    pub workers: u32,
    /// How long to wait for the count to be reached, 1..=600 seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<f64>,
}

/// The answer to a leader management call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LeaderActionResult {
    /// The leader that was signalled.
    pub leader_pid: u32,
    /// The signal(s) sent, e.g. `SIGHUP`.
    pub signal: String,
    /// How many signals were sent.
    pub signals_sent: u32,
    /// Workers counted after the action.
    pub workers: u32,
}

/// Every error the API answers, with a machine-readable `code` and a human `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// Stable identifier: `unauthorized`, `forbidden`, `not_found`, `conflict`, `invalid_request`,
    /// `payload_too_large`, `not_a_worker`, `unprocessable`, `internal`, `timeout`.
    pub code: String,
    /// What went wrong, for people.
    pub reason: String,
    /// On a `conflict`, the session that holds the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// `GET /healthz` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    /// `ok`, or why not ready.
    pub status: String,
    /// Extra detail per check (readiness only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<String, String>,
}
