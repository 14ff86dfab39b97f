//! The journal of running heap-diff sessions: `{runtime_dir}/sidecar/sessions/{id}.json`,
//! written when a session starts tracing and removed when it ends, so a sidecar that restarts
//! mid-session finds the tracing its predecessor left behind. Every file operation (an fsync
//! included) runs on the blocking pool.

use std::path::PathBuf;

use forkscope_protocol::files::{ensure_real_dir, is_real_dir};
use forkscope_protocol::{read_json_limited, write_json_atomic};
use serde::{Deserialize, Serialize};

use crate::api::ProfileRequest;

/// The largest journal entry read back.
const MAX_JOURNAL_BYTES: u64 = 1024 * 1024;

/// What a journal entry remembers of a running session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct JournalEntry {
    pub(crate) id: String,
    pub(crate) leader_pid: u32,
    pub(crate) created_at: f64,
    pub(crate) request: ProfileRequest,
    /// `(pid, start_ticks, slot)` of every worker.
    pub(crate) workers: Vec<(u32, u64, Option<u32>)>,
}

/// The journal folder.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn path(dir: &std::path::Path, id: &str) -> PathBuf {
        dir.join(format!("{id}.json"))
    }

    /// Records a session that is about to start tracing.
    ///
    /// # Errors
    /// The folder or the file cannot be written.
    pub(crate) async fn write(&self, entry: JournalEntry) -> Result<(), String> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            // `{runtime}/sidecar/sessions`, each a real directory: the application shares the
            // runtime directory and could plant a symlink to redirect the journal.
            if let Some(parent) = dir.parent() {
                ensure_real_dir(parent).map_err(|e| e.to_string())?;
            }
            ensure_real_dir(&dir).map_err(|e| e.to_string())?;
            write_json_atomic(&Self::path(&dir, &entry.id), &entry).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Forgets a session that ended.
    pub(crate) async fn remove(&self, id: &str) {
        let path = Self::path(&self.dir, id);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(path)).await;
    }

    /// Every valid entry an earlier process left; unreadable or invalid ones are removed.
    pub(crate) async fn entries(&self) -> Vec<JournalEntry> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            if !dir.parent().is_some_and(is_real_dir) || !is_real_dir(&dir) {
                return Vec::new();
            }
            let Ok(listing) = std::fs::read_dir(&dir) else {
                return Vec::new();
            };
            let mut out = Vec::new();
            for entry in listing.flatten() {
                let path = entry.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                match read_json_limited::<JournalEntry>(&path, MAX_JOURNAL_BYTES) {
                    Ok(j) if forkscope_protocol::command::valid_request_id(&j.id) => out.push(j),
                    Ok(_) => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Err(e) => {
                        tracing::warn!("unreadable session journal: {e}");
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> JournalEntry {
        JournalEntry {
            id: id.into(),
            leader_pid: 1,
            created_at: 0.0,
            request: serde_json::from_str("{}").expect("request"),
            workers: vec![(10, 1, Some(0))],
        }
    }

    #[tokio::test]
    async fn entries_round_trip_and_a_planted_symlink_redirects_nothing() {
        let runtime = tempfile::tempdir().expect("runtime");
        let journal = Journal::new(runtime.path().join("sidecar").join("sessions"));
        journal.write(entry("fs-1")).await.expect("write");
        let back = journal.entries().await;
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].id, "fs-1");
        journal.remove("fs-1").await;
        assert!(journal.entries().await.is_empty());

        // The application plants `sidecar -> elsewhere` in a fresh runtime directory.
        let runtime = tempfile::tempdir().expect("runtime");
        let elsewhere = tempfile::tempdir().expect("elsewhere");
        std::os::unix::fs::symlink(elsewhere.path(), runtime.path().join("sidecar"))
            .expect("symlink");
        std::fs::create_dir(elsewhere.path().join("sessions")).expect("mkdir");
        let journal = Journal::new(runtime.path().join("sidecar").join("sessions"));
        journal.write(entry("fs-2")).await.expect_err("refused");
        assert_eq!(
            std::fs::read_dir(elsewhere.path().join("sessions"))
                .expect("list")
                .count(),
            0
        );
        assert!(journal.entries().await.is_empty());
    }
}
