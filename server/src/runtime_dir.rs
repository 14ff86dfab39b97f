//! This process' folder in the runtime directory shared with the sidecar.
//!
//! Every leader and worker announces itself with `{runtime_dir}/{pid}/process.json`
//! ([`forkscope_protocol::ProcessInfo`]); the profiler writes results below the same folder.
//! The leader removes its own folder when it exits and a worker's folder when it reaps the
//! worker; a folder that still holds results (the sidecar may still collect them) is removed
//! once they are collected, or after an hour ([`Leftovers`]).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Removes the folder of a process that is gone, unless it holds results nobody collected;
/// true when the folder is gone.
pub fn remove_if_empty(runtime: &RuntimeDir, pid: u32) -> bool {
    let results = runtime.results_dir(pid);
    let has_results = std::fs::read_dir(&results)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if !has_results {
        let _ = std::fs::remove_dir_all(runtime.process_dir(pid));
    }
    !has_results
}

/// How long results of a reaped worker wait for collection before its folder goes anyway.
pub const LEFTOVER_TTL: Duration = Duration::from_secs(3600);

/// How many reaped workers' folders are watched at most; beyond, the oldest goes at once.
pub const MAX_LEFTOVERS: usize = 256;

/// The folders of reaped workers that still held results (the sidecar collects exit results
/// after the worker is gone): each is removed once its results are collected, or after
/// [`LEFTOVER_TTL`], so a pod whose workers keep dying does not fill its `emptyDir`.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// PID, the `started_at` of its `process.json` (so a new process that got the same PID and
    /// announced itself in the same folder is never taken for it), and when it was reaped.
    pending: VecDeque<(u32, Option<f64>, Instant)>,
    last_sweep: Option<Instant>,
}

fn started_at(runtime: &RuntimeDir, pid: u32) -> Option<f64> {
    forkscope_protocol::read_json_limited::<ProcessInfo>(&runtime.process_info(pid), 64 * 1024)
        .ok()
        .map(|info| info.started_at)
}

impl Leftovers {
    /// Worker `pid` was reaped at `now`: its folder goes now if nothing in it awaits
    /// collection, or is watched.
    pub fn reaped(&mut self, runtime: &RuntimeDir, pid: u32, now: Instant) {
        let identity = started_at(runtime, pid);
        if remove_if_empty(runtime, pid) {
            return;
        }
        self.pending.push_back((pid, identity, now));
        while self.pending.len() > MAX_LEFTOVERS {
            if let Some((old, identity, _)) = self.pending.pop_front()
                && started_at(runtime, old) == identity
            {
                let _ = std::fs::remove_dir_all(runtime.process_dir(old));
            }
        }
    }

    /// Removes the watched folders whose results were collected or that outlived
    /// [`LEFTOVER_TTL`]; does nothing more than once a second.
    pub fn sweep(&mut self, runtime: &RuntimeDir, now: Instant) {
        if self.pending.is_empty()
            || self
                .last_sweep
                .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_sweep = Some(now);
        self.pending.retain(|(pid, identity, reaped)| {
            if started_at(runtime, *pid) != *identity {
                // Gone already, or the folder of a new process with this PID now.
                return false;
            }
            if now.saturating_duration_since(*reaped) >= LEFTOVER_TTL {
                let _ = std::fs::remove_dir_all(runtime.process_dir(*pid));
                return false;
            }
            !remove_if_empty(runtime, *pid)
        });
    }

    /// How many folders are watched.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when no folder is watched.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
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

    /// Issue 14: folders of dead workers that held results were never removed.
    #[test]
    fn a_reaped_workers_folder_goes_once_its_results_are_collected_or_stale() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let runtime = RuntimeDir::new(tmp.path());
        let t0 = Instant::now();
        let mut left = Leftovers::default();
        // Three dead workers' folders with a result each, one folder without.
        for pid in [101, 102, 103, 104] {
            std::fs::create_dir_all(runtime.results_dir(pid)).expect("mkdir");
            let info = ProcessInfo {
                version: FORMAT_VERSION,
                pid,
                role: Role::Worker,
                slot: Some(0),
                leader_pid: 1,
                app: "a:a".into(),
                server_version: "test".into(),
                started_at: f64::from(pid),
            };
            write_json_atomic(&runtime.process_info(pid), &info).expect("info");
            if pid != 104 {
                std::fs::write(
                    runtime.result(pid, "r", forkscope_protocol::Action::Exit),
                    b"{}",
                )
                .expect("result");
            }
            left.reaped(&runtime, pid, t0);
        }
        assert!(!runtime.process_dir(104).exists());
        assert_eq!(left.len(), 3);
        // The sidecar collects 101's result; 102's PID goes to a new process, whose folder
        // must stay.
        std::fs::remove_file(runtime.result(101, "r", forkscope_protocol::Action::Exit))
            .expect("collect");
        let mut info: ProcessInfo =
            forkscope_protocol::read_json_limited(&runtime.process_info(102), 4096).expect("info");
        info.started_at = 9999.0;
        write_json_atomic(&runtime.process_info(102), &info).expect("new process");
        left.sweep(&runtime, t0 + Duration::from_secs(2));
        assert!(!runtime.process_dir(101).exists());
        assert!(runtime.process_dir(102).exists());
        assert!(runtime.process_dir(103).exists());
        assert_eq!(left.len(), 1);
        // Nobody collects 103's: it goes after the TTL.
        left.sweep(&runtime, t0 + LEFTOVER_TTL + Duration::from_secs(2));
        assert!(!runtime.process_dir(103).exists());
        assert!(left.is_empty());
    }
}
