//! This process' folder in the runtime directory shared with the sidecar.
//!
//! Every leader and worker announces itself with `{runtime_dir}/{pid}/process.json`
//! ([`forkscope_protocol::ProcessInfo`]); the profiler writes results below the same folder.
//! The leader removes its own folder when it exits and a worker's folder when it reaps the
//! worker, unless that worker left results behind (the sidecar may still be waiting for them).

use std::io;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use forkscope_protocol::{FORMAT_VERSION, ProcessInfo, Role, RuntimeDir, write_json_atomic};

/// Seconds since the Unix epoch, as the protocol's timestamps are.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Creates the folder of `pid` and writes its `process.json`.
///
/// # Errors
/// The runtime directory cannot be created or written (permissions, read-only file system).
pub fn announce(
    runtime: &RuntimeDir,
    role: Role,
    slot: Option<u32>,
    leader_pid: u32,
    app: &str,
) -> io::Result<PathBuf> {
    let pid = std::process::id();
    let dir = runtime.process_dir(pid);
    // A folder left by an earlier process with the same PID is stale: start clean.
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(runtime.results_dir(pid))?;
    let info = ProcessInfo {
        version: FORMAT_VERSION,
        pid,
        role,
        slot,
        leader_pid,
        app: app.to_owned(),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: unix_now(),
    };
    write_json_atomic(&runtime.process_info(pid), &info).map_err(io::Error::other)?;
    Ok(dir)
}

/// Removes the folder of a process that is gone, unless it holds results nobody collected.
pub fn remove_if_empty(runtime: &RuntimeDir, pid: u32) {
    let results = runtime.results_dir(pid);
    let has_results = std::fs::read_dir(&results)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if !has_results {
        let _ = std::fs::remove_dir_all(runtime.process_dir(pid));
    }
}

/// Removes the leader's own folder when dropped (the leader holds one for its lifetime).
pub struct FolderGuard {
    path: PathBuf,
}

impl FolderGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

impl Drop for FolderGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_writes_process_info() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runtime = RuntimeDir::new(tmp.path());
        let dir = announce(&runtime, Role::Worker, Some(2), 1, "app:app").expect("announce");
        let info: ProcessInfo =
            forkscope_protocol::read_json_limited(&runtime.process_info(std::process::id()), 4096)
                .expect("read back");
        assert_eq!(info.slot, Some(2));
        assert_eq!(info.role, Role::Worker);
        assert!(dir.join("results").is_dir());
        remove_if_empty(&runtime, std::process::id());
        assert!(!dir.exists());
    }
}
