//! What a program (the sidecar) asks a worker to do, through `command.json` and `SIGUSR2`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The largest command file a worker reads; anything larger is rejected unread.
pub const MAX_COMMAND_BYTES: u64 = 16 * 1024;

/// Bounds on the tracemalloc traceback depth a command may ask for.
pub const MAX_FRAMES: u32 = 100;

/// Bounds on how many allocation sites a heap diff may list.
pub const MAX_TOP: u32 = 10_000;

/// The most workers one session may name (slots listed, or the top-by-PSS count); the
/// sidecar's API and the operator's CRD both take their bound from here.
pub const MAX_TARGET_WORKERS: u32 = 1024;

/// One instruction for one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Format version, [`crate::FORMAT_VERSION`].
    pub version: u32,
    /// Caller-chosen id, echoed in the result and used in its file name
    /// (1–64 characters of `[A-Za-z0-9_-]`).
    pub request_id: String,
    /// What to do.
    pub action: Action,
    /// Traceback depth to record when tracing starts (tracemalloc's `nframe`), 1..=100.
    #[serde(default = "default_frames")]
    pub frames: u32,
    /// How many allocation sites a capture lists, largest growth first, 1..=10000.
    #[serde(default = "default_top")]
    pub top: u32,
    /// How a capture groups allocations.
    #[serde(default)]
    pub group_by: GroupBy,
}

fn default_frames() -> u32 {
    1
}

fn default_top() -> u32 {
    50
}

/// The profiler actions a worker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Start tracemalloc and take the baseline snapshot.
    Start,
    /// Snapshot, diff against the baseline, write the result; tracing goes on.
    Capture,
    /// Stop tracing and release tracemalloc's memory; a capture is not written.
    Stop,
    /// Dump every thread's Python stack.
    Stacks,
    /// Written by the worker itself: it exited while tracing (never sent by a program).
    Exit,
    /// Written by the worker itself: the error result for a command file it could not read or
    /// whose action it does not know (never sent by a program).
    Invalid,
}

impl Action {
    /// The name used in JSON and in result file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Capture => "capture",
            Action::Stop => "stop",
            Action::Stacks => "stacks",
            Action::Exit => "exit",
            Action::Invalid => "invalid",
        }
    }
}

/// Grouping of a heap diff, as `tracemalloc.Snapshot.compare_to(key_type=...)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// By the most recent frame's file and line.
    #[default]
    Lineno,
    /// By the whole recorded traceback.
    Traceback,
    /// By file only.
    Filename,
}

impl GroupBy {
    /// The `key_type` string tracemalloc expects.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Lineno => "lineno",
            GroupBy::Traceback => "traceback",
            GroupBy::Filename => "filename",
        }
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The format version is not [`crate::FORMAT_VERSION`].
    #[error("unsupported command version {0}")]
    Version(u32),
    /// The request id is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("invalid request_id: 1-64 characters of [A-Za-z0-9_-] are allowed")]
    RequestId,
    /// `frames` is out of range.
    #[error("frames must be between 1 and {MAX_FRAMES}, got {0}")]
    Frames(u32),
    /// `top` is out of range.
    #[error("top must be between 1 and {MAX_TOP}, got {0}")]
    Top(u32),
    /// `exit` is written by workers only.
    #[error("action 'exit' cannot be requested")]
    ExitRequested,
    /// `invalid` is written by workers only.
    #[error("action 'invalid' cannot be requested")]
    InvalidRequested,
}

/// True when `id` can be used as a request id (and so in a file name).
pub fn valid_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Command {
    /// A command with the default parameters.
    pub fn new(request_id: impl Into<String>, action: Action) -> Self {
        Self {
            version: crate::FORMAT_VERSION,
            request_id: request_id.into(),
            action,
            frames: default_frames(),
            top: default_top(),
            group_by: GroupBy::default(),
        }
    }

    /// Checks every field against its documented range.
    ///
    /// # Errors
    /// The first field that is out of range.
    pub fn validate(&self) -> Result<(), CommandError> {
        if self.version != crate::FORMAT_VERSION {
            return Err(CommandError::Version(self.version));
        }
        if !valid_request_id(&self.request_id) {
            return Err(CommandError::RequestId);
        }
        if !(1..=MAX_FRAMES).contains(&self.frames) {
            return Err(CommandError::Frames(self.frames));
        }
        if !(1..=MAX_TOP).contains(&self.top) {
            return Err(CommandError::Top(self.top));
        }
        if self.action == Action::Exit {
            return Err(CommandError::ExitRequested);
        }
        if self.action == Action::Invalid {
            return Err(CommandError::InvalidRequested);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_optional_fields() {
        let cmd: Command =
            serde_json::from_str(r#"{"version":1,"request_id":"a1","action":"capture"}"#)
                .expect("valid json");
        assert_eq!(cmd.frames, 1);
        assert_eq!(cmd.top, 50);
        assert_eq!(cmd.group_by, GroupBy::Lineno);
        assert_eq!(cmd.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_and_actions_are_rejected() {
        assert!(
            serde_json::from_str::<Command>(r#"{"version":1,"request_id":"a","action":"dance"}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<Command>(
                r#"{"version":1,"request_id":"a","action":"start","pid":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn request_id_cannot_escape_the_folder() {
        for bad in ["", "../x", "a/b", "a.b", &"x".repeat(65)] {
            let cmd = Command::new(bad, Action::Start);
            assert_eq!(cmd.validate(), Err(CommandError::RequestId), "{bad:?}");
        }
    }

    #[test]
    fn ranges_are_checked() {
        let mut cmd = Command::new("r", Action::Start);
        cmd.frames = 0;
        assert_eq!(cmd.validate(), Err(CommandError::Frames(0)));
        cmd.frames = 10;
        cmd.top = MAX_TOP + 1;
        assert_eq!(cmd.validate(), Err(CommandError::Top(MAX_TOP + 1)));
    }

    #[test]
    fn worker_only_actions_cannot_be_requested() {
        assert_eq!(
            Command::new("r", Action::Exit).validate(),
            Err(CommandError::ExitRequested)
        );
        assert_eq!(
            Command::new("r", Action::Invalid).validate(),
            Err(CommandError::InvalidRequested)
        );
        assert_eq!(Action::Invalid.as_str(), "invalid");
    }
}
