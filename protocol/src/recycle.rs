//! Why a worker was recycled, with the evidence: `{runtime_dir}/{leader_pid}/recycles/{pid}.json`.
//!
//! A leader with `--max-worker-memory` retires a worker whose private memory stays over the
//! limit. With a watch threshold, the worker was tracing since it crossed the threshold, and
//! the leader captured a heap diff before retiring it: the record carries that diff, so "worker
//! 3 was recycled at 512 MiB" comes with the allocation sites that grew. The leader keeps the
//! newest [`KEPT`] records; the sidecar lists them.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::result::CommandResult;

/// Records a leader keeps (oldest removed first).
pub const KEPT: usize = 20;

/// The largest record a reader accepts (a heap diff is capped to [`crate::result::MAX_RESULT_BYTES`]).
pub const MAX_RECYCLE_BYTES: u64 = crate::result::MAX_RESULT_BYTES + 64 * 1024;

/// Why a worker was retired and replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecycleReason {
    /// Its private memory stayed over `--max-worker-memory`.
    Memory,
    /// It served `--max-requests` requests.
    MaxRequests,
    /// A request ran longer than `--timeout`.
    Timeout,
}

impl RecycleReason {
    /// Every reason, in the order of their counters (see [`crate::requests`]).
    pub const ALL: [RecycleReason; 3] = [Self::Memory, Self::MaxRequests, Self::Timeout];

    /// The name in JSON and in the `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::MaxRequests => "max_requests",
            Self::Timeout => "timeout",
        }
    }
}

/// One recycled worker, as the leader recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Recycle {
    /// Format version, [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// Why.
    pub reason: RecycleReason,
    /// The leader's PID.
    pub leader_pid: u32,
    /// The application (`module:callable`).
    pub app: String,
    /// The worker's slot (refilled at once).
    pub slot: u32,
    /// The worker's PID.
    pub pid: u32,
    /// When it was told to stop, seconds since the Unix epoch.
    pub at: f64,
    /// Its private memory (USS) at the last check, bytes.
    pub uss_bytes: u64,
    /// `--max-worker-memory`, bytes.
    pub limit_bytes: u64,
    /// The heap diff captured before it was retired (its outcome says why there is none, when
    /// the capture failed); `None` when it was not tracing (no watch threshold, or it crossed
    /// the limit before the threshold was checked).
    pub capture: Option<CommandResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_named_for_labels_and_json() {
        for r in RecycleReason::ALL {
            assert_eq!(
                serde_json::to_value(r).expect("json"),
                serde_json::Value::String(r.as_str().to_owned())
            );
        }
    }
}
