//! The contract between `forkscope-server` and `forkscope-sidecar` (DESIGN.md, "server ↔ sidecar").
//!
//! Both processes share one runtime directory (an `emptyDir` in Kubernetes). The server owns the
//! layout and writes results; the sidecar writes commands and reads results. Keeping the paths
//! and the JSON types in one small crate means neither side can drift from the other, and the
//! sidecar never links libpython.
//!
//! # Layout
//!
//! ```text
//! {runtime_dir}/
//!   {pid}/                     one folder per leader or worker process, named by its PID
//!     process.json             ProcessInfo, written when the process starts
//!     requests.bin             a leader's per-slot request counters (see `requests`)
//!     recycles/{pid}.json      a leader's record of a worker it recycled (see `recycle`)
//!     command.json             Command, written by a program before it rings the doorbell (SIGUSR2)
//!     results/{id}.{action}.json   CommandResult, one per handled command
//! ```
//!
//! Every file is written atomically (a temporary file in the same folder, then `rename`), see
//! [`write_json_atomic`]. Readers must still treat content as untrusted: [`read_json_limited`]
//! caps the size it reads.
//!
//! # Modules
//! - [`paths`]: where each file lives.
//! - [`command`]: what a program asks a worker to do.
//! - [`result`]: what a worker answers: heap diffs and stack dumps.
//! - [`title`]: the process titles the server sets and the sidecar discovers roles by.
//! - [`recycle`]: why a worker was recycled, with the heap diff captured before.
//! - [`requests`]: per-slot request counters, shared by the workers through a mapped file.
//! - [`smaps`]: memory counters from `smaps_rollup`, read by both.
//! - [`files`]: safe opens, bounded reads, atomic writes.

pub mod command;
pub mod files;
pub mod paths;
pub mod recycle;
pub mod requests;
pub mod result;
pub mod smaps;
pub mod title;

pub use command::{Action, Command, GroupBy};
pub use files::{FileError, read_json_limited, write_json_atomic};
pub use paths::RuntimeDir;
pub use result::{
    CommandResult, Frame, HeapDiff, Outcome, ProcessInfo, Role, SiteDiff, ThreadStack, TracedMemory,
};

/// The version of the file formats in this crate; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Default runtime directory when neither `--runtime-dir` nor `FORKSCOPE_RUNTIME_DIR` is set.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/forkscope";

/// Environment variable that names the runtime directory for every forkscope program.
pub const RUNTIME_DIR_ENV: &str = "FORKSCOPE_RUNTIME_DIR";
