//! Where each file of the runtime directory lives (see the crate docs for the tree).

use std::path::{Path, PathBuf};

/// A runtime directory root, with the paths of every file the contract names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    root: PathBuf,
}

impl RuntimeDir {
    /// Wraps `root`; nothing is created or checked here.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder that belongs to process `pid` (a leader or a worker).
    pub fn process_dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// `process.json` of `pid`.
    pub fn process_info(&self, pid: u32) -> PathBuf {
        self.process_dir(pid).join("process.json")
    }

    /// The per-slot request counters of leader `pid` (see [`crate::requests`]).
    pub fn requests(&self, pid: u32) -> PathBuf {
        self.process_dir(pid).join("requests.bin")
    }

    /// The records of workers leader `pid` recycled (see [`crate::recycle`]).
    pub fn recycles_dir(&self, pid: u32) -> PathBuf {
        self.process_dir(pid).join("recycles")
    }

    /// The command file a program writes before it rings the doorbell of worker `pid`.
    pub fn command(&self, pid: u32) -> PathBuf {
        self.process_dir(pid).join("command.json")
    }

    /// The folder of results written by worker `pid`.
    pub fn results_dir(&self, pid: u32) -> PathBuf {
        self.process_dir(pid).join("results")
    }

    /// The result file for command `request_id` with `action` on worker `pid`.
    ///
    /// `request_id` must already be validated with [`crate::command::valid_request_id`], so it
    /// cannot climb out of the folder.
    pub fn result(&self, pid: u32, request_id: &str, action: crate::Action) -> PathBuf {
        self.results_dir(pid)
            .join(format!("{request_id}.{}.json", action.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Action;

    #[test]
    fn result_path_names_id_and_action() {
        let dir = RuntimeDir::new("/run/forkscope");
        assert_eq!(
            dir.result(42, "req-1", Action::Capture),
            PathBuf::from("/run/forkscope/42/results/req-1.capture.json")
        );
        assert_eq!(
            dir.command(42),
            PathBuf::from("/run/forkscope/42/command.json")
        );
    }
}
