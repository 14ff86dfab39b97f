//! Taking the command file a program left before it rang the doorbell.
//!
//! The file is untrusted: it is read with a size limit, removed before it is acted on (so a
//! command runs once even if it makes the worker crash), and checked field by field. Anything
//! wrong becomes a [`Rejected`] that the worker answers with an error result; it never stops
//! the worker.

use std::io;
use std::path::Path;

use forkscope_protocol::command::{MAX_COMMAND_BYTES, valid_request_id};
use forkscope_protocol::{Action, Command, FileError, read_json_limited};

/// What the doorbell found in the worker's folder.
#[derive(Debug, Clone, PartialEq)]
pub enum Intake {
    /// No command file: the bare doorbell, which toggles tracing.
    Toggle,
    /// A valid command.
    Command(Command),
    /// A command file that could not be used.
    Rejected(Rejected),
}

/// A command file the worker refuses, with whatever could be salvaged to name the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The file's request id, when it has a valid one.
    pub request_id: Option<String>,
    /// The file's action, when it names one a program may request.
    pub action: Option<Action>,
    /// Why the command was refused.
    pub reason: String,
}

impl Rejected {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            request_id: None,
            action: None,
            reason: reason.into(),
        }
    }
}

/// Reads and removes the command file at `path`.
pub fn take(path: &Path) -> Intake {
    // A FIFO would block the read forever and a symlink could point anywhere: only a regular
    // file is read.
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Intake::Toggle,
        Err(e) => {
            return Intake::Rejected(Rejected::new(format!("cannot inspect command file: {e}")));
        }
        Ok(meta) if !meta.file_type().is_file() => {
            remove(path, meta.is_dir());
            return Intake::Rejected(Rejected::new("command file is not a regular file"));
        }
        Ok(_) => {}
    }
    let read = read_json_limited::<serde_json::Value>(path, MAX_COMMAND_BYTES);
    remove(path, false);
    match read {
        Ok(value) => parse(value),
        // Taken by someone else between the two calls: nothing was asked of us after all.
        Err(e) if e.is_not_found() => Intake::Toggle,
        Err(FileError::TooLarge { limit, .. }) => Intake::Rejected(Rejected::new(format!(
            "command file is larger than {limit} bytes"
        ))),
        Err(FileError::Json { source, .. }) => {
            Intake::Rejected(Rejected::new(format!("command file is not JSON: {source}")))
        }
        Err(e) => Intake::Rejected(Rejected::new(format!("cannot read command file: {e}"))),
    }
}

fn remove(path: &Path, dir: bool) {
    let removed = if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    if let Err(e) = removed
        && e.kind() != io::ErrorKind::NotFound
    {
        log::warn!("profiler: cannot remove {}: {e}", path.display());
    }
}

/// Checks a parsed JSON document; salvages the request id and action for the error result.
pub fn parse(value: serde_json::Value) -> Intake {
    let request_id = value
        .get("request_id")
        .and_then(|v| v.as_str())
        .filter(|id| valid_request_id(id))
        .map(str::to_owned);
    let action = value
        .get("action")
        .and_then(|v| serde_json::from_value::<Action>(v.clone()).ok())
        .filter(|a| requestable(*a));
    let rejected = |reason: String| {
        Intake::Rejected(Rejected {
            request_id: request_id.clone(),
            action,
            reason,
        })
    };
    match serde_json::from_value::<Command>(value.clone()) {
        Err(e) => rejected(format!("invalid command: {e}")),
        Ok(cmd) => match cmd.validate() {
            Err(e) => rejected(format!("invalid command: {e}")),
            Ok(()) => Intake::Command(cmd),
        },
    }
}

/// True for the actions a program may ask for (the others are written by workers only).
fn requestable(action: Action) -> bool {
    match action {
        Action::Start | Action::Capture | Action::Stop | Action::Stacks => true,
        Action::Exit | Action::Invalid => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkscope_protocol::GroupBy;

    fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join("command.json");
        std::fs::write(&path, bytes).expect("write command");
        path
    }

    #[test]
    fn missing_file_is_the_bare_doorbell() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(take(&dir.path().join("command.json")), Intake::Toggle);
    }

    #[test]
    fn valid_command_is_read_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            br#"{"version":1,"request_id":"r-1","action":"capture","top":5,"group_by":"traceback"}"#,
        );
        let Intake::Command(cmd) = take(&path) else {
            panic!("expected a command");
        };
        assert_eq!(cmd.request_id, "r-1");
        assert_eq!(cmd.action, Action::Capture);
        assert_eq!((cmd.top, cmd.group_by), (5, GroupBy::Traceback));
        assert!(!path.exists(), "the command file is consumed");
    }

    #[test]
    fn garbage_is_rejected_without_a_request_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), b"\x00\xff{{ not json");
        let Intake::Rejected(r) = take(&path) else {
            panic!("expected a rejection");
        };
        assert_eq!((r.request_id, r.action), (None, None));
        assert!(r.reason.contains("not JSON"), "{}", r.reason);
        assert!(!path.exists());
    }

    #[test]
    fn oversized_file_is_rejected_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut big = br#"{"version":1,"request_id":"big","action":"start","pad":""#.to_vec();
        big.resize(MAX_COMMAND_BYTES as usize * 4, b'x');
        let path = write(dir.path(), &big);
        let Intake::Rejected(r) = take(&path) else {
            panic!("expected a rejection");
        };
        assert!(r.reason.contains("larger than"), "{}", r.reason);
        assert!(!path.exists());
    }

    #[test]
    fn unknown_action_keeps_the_request_id() {
        let Intake::Rejected(r) =
            parse(serde_json::json!({"version":1,"request_id":"abc","action":"dance"}))
        else {
            panic!("expected a rejection");
        };
        assert_eq!(r.request_id.as_deref(), Some("abc"));
        assert_eq!(r.action, None);
        assert!(r.reason.contains("dance"), "{}", r.reason);
    }

    #[test]
    fn out_of_range_parameters_keep_id_and_action() {
        let Intake::Rejected(r) =
            parse(serde_json::json!({"version":1,"request_id":"abc","action":"start","frames":0}))
        else {
            panic!("expected a rejection");
        };
        assert_eq!(r.request_id.as_deref(), Some("abc"));
        assert_eq!(r.action, Some(Action::Start));
        assert!(r.reason.contains("frames"), "{}", r.reason);
    }

    #[test]
    fn worker_only_actions_and_bad_ids_are_not_echoed() {
        let Intake::Rejected(r) =
            parse(serde_json::json!({"version":1,"request_id":"../x","action":"exit"}))
        else {
            panic!("expected a rejection");
        };
        assert_eq!((r.request_id, r.action), (None, None));
    }

    #[test]
    fn a_fifo_is_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("command.json");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let Intake::Rejected(r) = take(&path) else {
            panic!("expected a rejection");
        };
        assert!(r.reason.contains("regular file"), "{}", r.reason);
        assert!(!path.exists());
    }
}
