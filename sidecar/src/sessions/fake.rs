//! A fake of "the workers" for the state machine's unit tests: each worker has a command
//! slot, a doorbell that does not queue (rings merge while one is pending), a tracing flag,
//! and takes a configurable time per action, measured on Tokio's (paused) clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use forkscope_protocol::{Action, Command, CommandResult, FORMAT_VERSION, HeapDiff, Outcome};
use tokio::time::Instant;

use super::select::{Candidate, LeaderCandidates};
use super::workers::{Answer, Io, Now, RingError, Workers};
use crate::api::ServerKind;
use crate::discovery::ProcessKey;

/// The leader every fake worker belongs to.
pub(crate) const LEADER: u32 = 1;

/// One fake worker.
#[derive(Debug, Default)]
pub(crate) struct FakeWorker {
    pub(crate) slot: u32,
    pub(crate) alive: bool,
    pub(crate) tracing: bool,
    pub(crate) command: Option<Command>,
    /// When the doorbell rang, while it waits to be answered.
    pub(crate) pending: Option<Instant>,
    /// The doorbell is answered no earlier than this (a stopped process).
    pub(crate) frozen_until: Option<Instant>,
    /// How long each action takes once the worker took it.
    pub(crate) takes: HashMap<Action, Duration>,
    /// The answer being worked on and when it is written.
    busy: Option<(Instant, CommandResult)>,
    free_at: Option<Instant>,
    pub(crate) results: HashMap<(String, Action), CommandResult>,
    /// Every doorbell rung, and every bare toggle (a ring with no command file).
    pub(crate) rings: u32,
    pub(crate) toggles: u32,
}

impl FakeWorker {
    /// Answers what the doorbell asked, as far as the clock has come.
    fn advance(&mut self, pid: u32, now: Instant) {
        loop {
            if let Some((at, _)) = &self.busy {
                if *at > now {
                    return;
                }
                let (at, result) = self.busy.take().expect("checked above");
                self.results
                    .insert((result.request_id.clone(), result.action), result);
                self.free_at = Some(at);
                continue;
            }
            let Some(rung) = self.pending else {
                return;
            };
            let start = [Some(rung), self.free_at, self.frozen_until]
                .into_iter()
                .flatten()
                .max()
                .expect("rung is there");
            if start > now || !self.alive {
                return;
            }
            self.pending = None;
            let cmd = self.command.take().unwrap_or_else(|| {
                self.toggles += 1;
                Command::new(
                    "manual",
                    if self.tracing {
                        Action::Capture
                    } else {
                        Action::Start
                    },
                )
            });
            let outcome = self.handle(&cmd);
            let takes = self.takes.get(&cmd.action).copied().unwrap_or_default();
            self.busy = Some((
                start + takes,
                CommandResult {
                    version: FORMAT_VERSION,
                    request_id: cmd.request_id.clone(),
                    action: cmd.action,
                    pid,
                    slot: self.slot,
                    started_at: 0.0,
                    finished_at: 0.0,
                    outcome,
                },
            ));
        }
    }

    fn handle(&mut self, cmd: &Command) -> Outcome {
        let error = |reason: &str| Outcome::Error {
            reason: reason.into(),
        };
        match cmd.action {
            Action::Start if self.tracing => error("already tracing"),
            Action::Start => {
                self.tracing = true;
                Outcome::Started {
                    frames: cmd.frames,
                    pss_bytes: None,
                }
            }
            Action::Capture if !self.tracing => error("not tracing"),
            Action::Capture => Outcome::HeapDiff(diff()),
            Action::Stop if !self.tracing => error("not tracing"),
            Action::Stop => {
                self.tracing = false;
                Outcome::Stopped
            }
            Action::Stacks => Outcome::Stacks { threads: vec![] },
            Action::Exit | Action::Invalid => error("cannot be requested"),
        }
    }
}

fn diff() -> HeapDiff {
    HeapDiff {
        frames: 1,
        total_size_diff: 100,
        ..HeapDiff::default()
    }
}

/// Fake workers of one forkscope-server leader ([`LEADER`]).
#[derive(Default)]
pub(crate) struct FakeWorkers {
    workers: Mutex<HashMap<ProcessKey, FakeWorker>>,
}

impl FakeWorkers {
    /// Workers with PIDs `pids` in slots 0, 1, ...
    pub(crate) fn new(pids: &[u32]) -> Self {
        let fake = Self::default();
        for (slot, pid) in pids.iter().enumerate() {
            fake.workers.lock().expect("lock").insert(
                key(*pid),
                FakeWorker {
                    slot: slot as u32,
                    alive: true,
                    ..FakeWorker::default()
                },
            );
        }
        fake
    }

    /// Runs `f` on worker `pid`, brought up to now first.
    pub(crate) fn with<T>(&self, pid: u32, f: impl FnOnce(&mut FakeWorker) -> T) -> T {
        let mut all = self.workers.lock().expect("lock");
        let w = all.get_mut(&key(pid)).expect("a fake worker");
        w.advance(pid, Instant::now());
        f(w)
    }

    fn each<T>(&self, k: ProcessKey, f: impl FnOnce(Option<&mut FakeWorker>) -> T) -> T {
        let mut all = self.workers.lock().expect("lock");
        let mut w = all.get_mut(&k);
        if let Some(w) = w.as_deref_mut() {
            w.advance(k.pid, Instant::now());
        }
        f(w)
    }
}

/// The key of fake worker `pid`.
pub(crate) fn key(pid: u32) -> ProcessKey {
    ProcessKey {
        pid,
        start_ticks: 1,
    }
}

impl Workers for FakeWorkers {
    fn candidates(&self, _pss: bool) -> Io<'_, Vec<LeaderCandidates>> {
        let all = self.workers.lock().expect("lock");
        let workers = all
            .iter()
            .filter(|(_, w)| w.alive)
            .map(|(k, w)| Candidate {
                key: *k,
                slot: w.slot,
                pss_bytes: Some(u64::from(k.pid)),
                doorbell: true,
            })
            .collect();
        Box::pin(std::future::ready(vec![LeaderCandidates {
            pid: LEADER,
            server: ServerKind::Forkscope,
            workers,
        }]))
    }

    fn alive(&self, k: ProcessKey) -> Io<'_, bool> {
        let alive = self.each(k, |w| w.is_some_and(|w| w.alive));
        Box::pin(std::future::ready(alive))
    }

    fn now(&self, k: ProcessKey) -> Io<'_, Now> {
        let now = self.each(k, |w| match w {
            Some(w) if w.alive => Now::Worker,
            _ => Now::Gone,
        });
        Box::pin(std::future::ready(now))
    }

    fn write_command(&self, k: ProcessKey, cmd: &Command) -> Io<'_, Result<(), String>> {
        let cmd = cmd.clone();
        let done = self.each(k, |w| match w {
            Some(w) => {
                w.results.remove(&(cmd.request_id.clone(), cmd.action));
                w.command = Some(cmd);
                Ok(())
            }
            None => Err("no folder".into()),
        });
        Box::pin(std::future::ready(done))
    }

    fn command_waiting(&self, k: ProcessKey) -> Io<'_, bool> {
        let waiting = self.each(k, |w| w.is_some_and(|w| w.command.is_some()));
        Box::pin(std::future::ready(waiting))
    }

    fn remove_command(&self, k: ProcessKey) -> Io<'_, ()> {
        self.each(k, |w| {
            if let Some(w) = w {
                w.command = None;
            }
        });
        Box::pin(std::future::ready(()))
    }

    fn ring(&self, k: ProcessKey) -> Io<'_, Result<(), RingError>> {
        let rung = self.each(k, |w| match w {
            Some(w) if w.alive => {
                w.rings += 1;
                // Signals of one kind do not queue: a pending ring absorbs this one.
                w.pending.get_or_insert(Instant::now());
                Ok(())
            }
            _ => Err(RingError::Gone),
        });
        // Let the worker take it at once if it is free.
        self.each(k, |_| ());
        Box::pin(std::future::ready(rung))
    }

    fn take_result(
        &self,
        k: ProcessKey,
        request_id: &str,
        action: Action,
    ) -> Io<'_, Option<Result<Answer, String>>> {
        let taken = self.each(k, |w| {
            let r = w?.results.remove(&(request_id.to_owned(), action))?;
            Some(Ok(Answer {
                bytes: serde_json::to_vec(&r).map_or(0, |b| b.len() as u64),
                result: r,
            }))
        });
        Box::pin(std::future::ready(taken))
    }
}
