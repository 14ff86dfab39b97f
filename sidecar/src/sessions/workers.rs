//! "The workers" as the session state machine sees them: who can be profiled, whether a worker
//! still lives, its command file, its doorbell and its result files. [`ProcWorkers`] is the
//! real thing (`/proc`, the runtime directory, pidfd signals), and runs every read, write,
//! fsync and JSON parse on the blocking pool, never on the async runtime's threads; the unit
//! tests use a fake (`super::fake`).

use std::future::Future;
use std::pin::Pin;

use forkscope_protocol::files::is_real_dir;
use forkscope_protocol::{
    Action, Command, CommandResult, FileError, ProcessInfo, Role, RuntimeDir,
};

use super::MAX_RESULT_BYTES;
use super::select::{Candidate, LeaderCandidates};
use crate::api::ServerKind;
use crate::discovery::{LeaderEntry, ProcSource, ProcessKey, WorkerEntry};
use crate::signals::{self, Signal, SignalError};

/// A boxed future, as the trait's methods return (the trait is used as `dyn Workers`).
pub(crate) type Io<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a process named in a journal is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Now {
    /// The same process, discovered as a worker with the doorbell.
    Worker,
    /// The same process, but not (or no longer) a worker with the doorbell.
    Other,
    /// Exited, or its PID belongs to another process.
    Gone,
}

/// Why the doorbell did not ring.
#[derive(Debug)]
pub(crate) enum RingError {
    /// The worker exited.
    Gone,
    /// The kernel refused.
    Refused(String),
}

/// A result file that was read (and removed).
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) result: CommandResult,
    /// The file's size, counted against the retained-results budget.
    pub(crate) bytes: u64,
}

/// The workers of this pod, seen by the session state machine.
pub(crate) trait Workers: Send + Sync + 'static {
    /// Every leader and its workers; with `pss`, each worker's PSS (for `top_pss`).
    fn candidates(&self, pss: bool) -> Io<'_, Vec<LeaderCandidates>>;
    /// Whether `key` is still the process it was.
    fn alive(&self, key: ProcessKey) -> Io<'_, bool>;
    /// What `key` is now (orphan recovery signals only live workers with the doorbell).
    fn now(&self, key: ProcessKey) -> Io<'_, Now>;
    /// Clears any old result for `cmd` and writes `cmd` as the worker's command file.
    fn write_command(&self, key: ProcessKey, cmd: &Command) -> Io<'_, Result<(), String>>;
    /// Whether a command file waits in the worker's folder (the worker has not taken it).
    fn command_waiting(&self, key: ProcessKey) -> Io<'_, bool>;
    /// Removes the worker's command file.
    fn remove_command(&self, key: ProcessKey) -> Io<'_, ()>;
    /// Rings the doorbell (`SIGUSR2`).
    fn ring(&self, key: ProcessKey) -> Io<'_, Result<(), RingError>>;
    /// Reads and removes the result of `(request_id, action)`; `None` while there is none.
    fn take_result(
        &self,
        key: ProcessKey,
        request_id: &str,
        action: Action,
    ) -> Io<'_, Option<Result<Answer, String>>>;
}

/// Runs `f` on the blocking pool (a panic there is a bug: it is resumed here).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Whether worker `w` of `leader` answers the doorbell: every forkscope-server worker does; a
/// gunicorn worker does once `forkscope.gunicorn`'s hook wrote its `process.json`, naming this
/// process (pid, leader, a start no earlier than the process'; not a folder left by an earlier
/// process with the same PID).
fn has_doorbell(
    source: &ProcSource,
    runtime: &RuntimeDir,
    leader: &LeaderEntry,
    w: &WorkerEntry,
) -> bool {
    match leader.server {
        ServerKind::Forkscope => true,
        ServerKind::Gunicorn => {
            let key = w.process.key;
            let info = forkscope_protocol::read_json_limited::<ProcessInfo>(
                &runtime.process_info(key.pid),
                PROCESS_INFO_BYTES,
            );
            info.is_ok_and(|info| {
                info.role == Role::Worker
                    && info.pid == key.pid
                    && info.leader_pid == leader.leader.key.pid
                    // Start times in ticks: allow one second of rounding.
                    && info.started_at + 1.0 >= source.started_at(key.start_ticks)
            })
        }
    }
}

/// A `process.json` is a few hundred bytes; anything much larger is not one.
const PROCESS_INFO_BYTES: u64 = 64 << 10;

/// The real workers: discovered through `/proc`, reached through the runtime directory.
#[derive(Clone)]
pub(crate) struct ProcWorkers {
    pub(crate) source: ProcSource,
    pub(crate) runtime: RuntimeDir,
}

impl Workers for ProcWorkers {
    fn candidates(&self, pss: bool) -> Io<'_, Vec<LeaderCandidates>> {
        let (source, runtime) = (self.source.clone(), self.runtime.clone());
        Box::pin(blocking(move || {
            source
                .scan()
                .leaders
                .iter()
                .map(|l| LeaderCandidates {
                    pid: l.leader.key.pid,
                    server: l.server,
                    workers: l
                        .workers
                        .iter()
                        .map(|w| Candidate {
                            key: w.process.key,
                            slot: w.slot,
                            pss_bytes: if pss {
                                source.memory(w.process.key).map(|m| m.pss_bytes)
                            } else {
                                None
                            },
                            doorbell: has_doorbell(&source, &runtime, l, w),
                        })
                        .collect(),
                })
                .collect()
        }))
    }

    fn alive(&self, key: ProcessKey) -> Io<'_, bool> {
        let source = self.source.clone();
        Box::pin(blocking(move || source.lookup(key).is_some()))
    }

    fn now(&self, key: ProcessKey) -> Io<'_, Now> {
        let (source, runtime) = (self.source.clone(), self.runtime.clone());
        Box::pin(blocking(move || {
            let snap = source.scan();
            let worker = snap.worker(key.pid).is_some_and(|(l, w)| {
                w.process.key == key && has_doorbell(&source, &runtime, l, w)
            });
            if worker {
                Now::Worker
            } else if source.lookup(key).is_some() {
                Now::Other
            } else {
                Now::Gone
            }
        }))
    }

    fn write_command(&self, key: ProcessKey, cmd: &Command) -> Io<'_, Result<(), String>> {
        let runtime = self.runtime.clone();
        let cmd = cmd.clone();
        Box::pin(blocking(move || {
            let dir = runtime.process_dir(key.pid);
            if !dir.is_dir() {
                return Err(format!(
                    "{} does not exist: is the runtime directory shared with the server (same --runtime-dir)?",
                    dir.display()
                ));
            }
            // The folders are the worker's (the application's): a symlink there would send the
            // command, and the results read back, somewhere else.
            if !is_real_dir(&dir) || !is_real_dir(&runtime.results_dir(key.pid)) {
                return Err(format!(
                    "{} or its results folder is not a real directory",
                    dir.display()
                ));
            }
            let _ = std::fs::remove_file(runtime.result(key.pid, &cmd.request_id, cmd.action));
            forkscope_protocol::write_json_atomic(&runtime.command(key.pid), &cmd)
                .map_err(|e| format!("writing the command: {e}"))
        }))
    }

    fn command_waiting(&self, key: ProcessKey) -> Io<'_, bool> {
        let path = self.runtime.command(key.pid);
        Box::pin(blocking(move || std::fs::symlink_metadata(path).is_ok()))
    }

    fn remove_command(&self, key: ProcessKey) -> Io<'_, ()> {
        let path = self.runtime.command(key.pid);
        Box::pin(blocking(move || {
            let _ = std::fs::remove_file(path);
        }))
    }

    fn ring(&self, key: ProcessKey) -> Io<'_, Result<(), RingError>> {
        let source = self.source.clone();
        Box::pin(blocking(move || {
            signals::send(&source, key, Signal::Usr2).map_err(|e| match e {
                SignalError::Gone(_) => RingError::Gone,
                e => RingError::Refused(e.to_string()),
            })
        }))
    }

    fn take_result(
        &self,
        key: ProcessKey,
        request_id: &str,
        action: Action,
    ) -> Io<'_, Option<Result<Answer, String>>> {
        let path = self.runtime.result(key.pid, request_id, action);
        Box::pin(blocking(move || {
            let read = forkscope_protocol::files::read_limited(&path, MAX_RESULT_BYTES);
            let bytes = match read {
                Err(e) if e.is_not_found() => return None,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Some(Err(format!("unreadable result: {e}")));
                }
                Ok(bytes) => bytes,
            };
            let _ = std::fs::remove_file(&path);
            Some(
                serde_json::from_slice::<CommandResult>(&bytes)
                    .map(|result| Answer {
                        result,
                        bytes: bytes.len() as u64,
                    })
                    .map_err(|e| {
                        format!(
                            "unreadable result: {}",
                            FileError::Json {
                                path: path.clone(),
                                source: e
                            }
                        )
                    }),
            )
        }))
    }
}
