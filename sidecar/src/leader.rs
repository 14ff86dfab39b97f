//! Leader management through signals: reload (HUP), reopen logs (USR1), and setting the worker
//! count with one TTIN/TTOU at a time until the count is reached (signals of one kind do not
//! queue, so sending N at once could be counted as one).

use std::time::Duration;

use crate::api::{LeaderActionResult, ScaleRequest};
use crate::discovery::{LeaderEntry, ProcSource};
use crate::error::ApiError;
use crate::signals::{self, Signal, SignalError};

/// Picks the leader named by `pid`, or the only leader when `pid` is `None`.
///
/// # Errors
/// 422 when `pid` is not a discovered leader, or when it is left out and the pod does not
/// have exactly one leader.
pub fn pick(source: &ProcSource, pid: Option<u32>) -> Result<LeaderEntry, ApiError> {
    let snap = source.scan();
    match pid {
        Some(pid) => snap.leader(pid).cloned().ok_or_else(|| {
            ApiError::NotAWorker(format!("process {pid} is not a discovered leader"))
        }),
        None => match snap.leaders.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ApiError::Unprocessable(
                "no leader found in this pod".into(),
            )),
            _ => Err(ApiError::Unprocessable(
                "several leaders: name one with leader_pid".into(),
            )),
        },
    }
}

fn signal_error(e: SignalError) -> ApiError {
    match e {
        SignalError::Gone(pid) => ApiError::NotAWorker(format!("leader {pid} is gone")),
        SignalError::Refused { .. } => ApiError::Internal(e.to_string()),
    }
}

/// Sends one signal (HUP or USR1) to a discovered leader.
///
/// # Errors
/// See [`pick`]; 500 when the kernel refuses the signal.
pub fn signal_once(
    source: &ProcSource,
    pid: Option<u32>,
    signal: Signal,
) -> Result<LeaderActionResult, ApiError> {
    let leader = pick(source, pid)?;
    signals::send(source, leader.leader.key, signal).map_err(signal_error)?;
    tracing::info!(
        leader = leader.leader.key.pid,
        signal = signal.name(),
        "signalled the leader"
    );
    Ok(LeaderActionResult {
        leader_pid: leader.leader.key.pid,
        signal: signal.name().to_owned(),
        signals_sent: 1,
        workers: u32::try_from(leader.workers.len()).unwrap_or(u32::MAX),
    })
}

/// The worker slots a leader has: a reload's superseded worker, still draining beside its
/// replacement, is not a worker more.
fn slots(leader: &LeaderEntry) -> usize {
    let mut slots: Vec<u32> = leader.workers.iter().map(|w| w.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    slots.len()
}

/// The leader as the scale loop sees it.
trait Scaled {
    /// Its worker slots now (0 when it is gone).
    async fn slots(&mut self) -> usize;
    /// Sends it TTIN or TTOU.
    async fn signal(&mut self, signal: Signal) -> Result<(), SignalError>;
}

/// A discovered leader, read through `/proc` on the blocking pool.
struct Discovered {
    source: ProcSource,
    leader: LeaderEntry,
}

impl Scaled for Discovered {
    async fn slots(&mut self) -> usize {
        let source = self.source.clone();
        let key = self.leader.leader.key;
        tokio::task::spawn_blocking(move || {
            source
                .scan()
                .leader(key.pid)
                .filter(|l| l.leader.key == key)
                .map_or(0, slots)
        })
        .await
        .unwrap_or(0)
    }

    async fn signal(&mut self, signal: Signal) -> Result<(), SignalError> {
        let source = self.source.clone();
        let key = self.leader.leader.key;
        tokio::task::spawn_blocking(move || signals::send(&source, key, signal))
            .await
            .unwrap_or(Err(SignalError::Gone(key.pid)))
    }
}

/// Sends TTIN or TTOU one at a time, each time waiting until the leader's worker count moved
/// that way, until it equals `req.workers`.
///
/// # Errors
/// 400 out-of-range count; see [`pick`]; 504 when the count is not reached in time.
pub async fn scale(
    source: &ProcSource,
    req: &ScaleRequest,
    poll: Duration,
) -> Result<LeaderActionResult, ApiError> {
    if !(1..=1024).contains(&req.workers) {
        return Err(ApiError::InvalidRequest(format!(
            "workers must be 1..=1024, got {}",
            req.workers
        )));
    }
    let timeout = req.timeout_seconds.unwrap_or(60.0);
    if !(1.0..=600.0).contains(&timeout) {
        return Err(ApiError::InvalidRequest(format!(
            "timeout_seconds must be 1..=600, got {timeout}"
        )));
    }
    let leader = {
        let source = source.clone();
        let pid = req.leader_pid;
        tokio::task::spawn_blocking(move || pick(&source, pid))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let pid = leader.leader.key.pid;
    let mut target = Discovered {
        source: source.clone(),
        leader,
    };
    let (signal, sent, workers) = steps(
        &mut target,
        req.workers as usize,
        Duration::from_secs_f64(timeout),
        poll,
    )
    .await
    .map_err(|e| match e {
        StepError::Signal(e) => signal_error(e),
        StepError::Timeout { now, sent, signal } => ApiError::Timeout(format!(
            "leader {pid} still has {now} workers after {sent} {}; wanted {}",
            signal.name(),
            req.workers
        )),
    })?;
    Ok(LeaderActionResult {
        leader_pid: pid,
        signal: signal.name().to_owned(),
        signals_sent: sent,
        workers: u32::try_from(workers).unwrap_or(u32::MAX),
    })
}

/// Why [`steps`] stopped short.
#[derive(Debug)]
enum StepError {
    Signal(SignalError),
    Timeout {
        now: usize,
        sent: u32,
        signal: Signal,
    },
}

/// The scale loop: one signal, then wait (polling, always awaiting) until the count moved the
/// way that signal moves it; a count that moves the other way meanwhile (a worker that died and
/// is being replaced) is waited out, not answered with another signal. Returns the last signal,
/// how many were sent and the final count.
async fn steps(
    leader: &mut impl Scaled,
    want: usize,
    timeout: Duration,
    poll: Duration,
) -> Result<(Signal, u32, usize), StepError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut sent = 0u32;
    let mut last = Signal::Ttin;
    let mut now = leader.slots().await;
    while now != want {
        let signal = if now < want {
            Signal::Ttin
        } else {
            Signal::Ttou
        };
        last = signal;
        leader.signal(signal).await.map_err(StepError::Signal)?;
        sent += 1;
        let before = now;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::Timeout { now, sent, signal });
            }
            tokio::time::sleep(poll).await;
            now = leader.slots().await;
            let moved = match signal {
                Signal::Ttin => now > before,
                _ => now < before,
            };
            if moved || now == want || now == 0 {
                break;
            }
        }
    }
    Ok((last, sent, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader whose slot count follows the signals after `lag` polls, with a worker crash
    /// and respawn while it grows, and a reload's superseded worker counted by `/proc`.
    struct Fake {
        target: usize,
        shown: usize,
        lag: u32,
        polls: u32,
        signals: Vec<Signal>,
        /// Reads of the count without the clock moving: a loop that never awaits.
        reads_at: (tokio::time::Instant, u32),
        /// Polls during which one worker is dead and not yet replaced (polls count from 1).
        crashed: std::ops::RangeInclusive<u32>,
    }

    impl Scaled for Fake {
        async fn slots(&mut self) -> usize {
            let now = tokio::time::Instant::now();
            if self.reads_at.0 == now {
                self.reads_at.1 += 1;
                assert!(
                    self.reads_at.1 < 100,
                    "the scale loop spins without awaiting"
                );
            } else {
                self.reads_at = (now, 0);
            }
            self.polls += 1;
            if self.crashed.contains(&self.polls) {
                // A worker died: one slot fewer until the leader replaces it.
                return self.shown - 1;
            }
            if self.polls.is_multiple_of(self.lag) {
                self.shown = self.target;
            }
            self.shown
        }

        async fn signal(&mut self, signal: Signal) -> Result<(), SignalError> {
            self.signals.push(signal);
            match signal {
                Signal::Ttin => self.target += 1,
                _ => self.target = self.target.saturating_sub(1).max(1),
            }
            Ok(())
        }
    }

    async fn scale_to(
        f: &mut Fake,
        want: usize,
        timeout_s: u64,
    ) -> Result<(Signal, u32, usize), StepError> {
        steps(
            f,
            want,
            Duration::from_secs(timeout_s),
            Duration::from_millis(20),
        )
        .await
    }

    fn fake(workers: usize) -> Fake {
        Fake {
            target: workers,
            shown: workers,
            lag: 3,
            polls: 0,
            signals: Vec::new(),
            reads_at: (tokio::time::Instant::now(), 0),
            crashed: 0..=0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_signal_a_step_up_and_down() {
        let mut f = fake(2);
        let (last, sent, now) = scale_to(&mut f, 4, 60).await.expect("scaled");
        assert_eq!((last, sent, now), (Signal::Ttin, 2, 4));
        let (last, sent, now) = scale_to(&mut f, 1, 60).await.expect("scaled");
        assert_eq!((last, sent, now), (Signal::Ttou, 3, 1));
    }

    /// Issue 14: a count that moved the wrong way (a crash) was answered with another signal,
    /// and the loop could go round without awaiting.
    #[tokio::test(start_paused = true)]
    async fn a_crash_while_growing_does_not_overshoot() {
        let mut f = fake(2);
        f.crashed = 2..=5;
        let (_, sent, now) = scale_to(&mut f, 3, 60).await.expect("scaled");
        assert_eq!((sent, now, f.target), (1, 3, 3), "{:?}", f.signals);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_never_moves_times_out() {
        let mut f = fake(2);
        f.lag = u32::MAX;
        let e = scale_to(&mut f, 3, 5).await.expect_err("never moves");
        assert!(matches!(e, StepError::Timeout { sent: 1, .. }), "{e:?}");
    }

    #[test]
    fn a_superseded_worker_is_not_a_slot() {
        use crate::discovery::{Found, ProcessKey, Title, WorkerEntry};
        let found = |pid| Found {
            key: ProcessKey {
                pid,
                start_ticks: u64::from(pid),
            },
            ppid: 1,
            title: String::new(),
            class: Title::Other,
            cpu_ticks: 0,
        };
        let leader = LeaderEntry {
            server: crate::api::ServerKind::Forkscope,
            app: "a:a".into(),
            leader: found(1),
            workers: [(0, 10), (0, 11), (1, 12)]
                .into_iter()
                .map(|(slot, pid)| WorkerEntry {
                    process: found(pid),
                    slot,
                })
                .collect(),
        };
        assert_eq!(slots(&leader), 2);
    }
}
