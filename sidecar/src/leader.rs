//! Leader management through signals: reload (HUP), reopen logs (USR1), and setting the worker
//! count with one TTIN/TTOU at a time until the count is reached (signals of one kind do not
//! queue, so sending N at once could be counted as one).

use std::time::{Duration, Instant};

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

/// Workers of the leader now (0 when it is gone).
fn count(source: &ProcSource, leader: &LeaderEntry) -> usize {
    source
        .scan()
        .leader(leader.leader.key.pid)
        .filter(|l| l.leader.key == leader.leader.key)
        .map_or(0, |l| l.workers.len())
}

/// Sends TTIN or TTOU one at a time, each time waiting until the leader's worker count moved,
/// until it equals `req.workers`.
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
    let leader = pick(source, req.leader_pid)?;
    let want = req.workers as usize;
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let mut sent = 0u32;
    let mut last_signal = Signal::Ttin;
    loop {
        let now = count(source, &leader);
        if now == want {
            return Ok(LeaderActionResult {
                leader_pid: leader.leader.key.pid,
                signal: last_signal.name().to_owned(),
                signals_sent: sent,
                workers: u32::try_from(now).unwrap_or(u32::MAX),
            });
        }
        let signal = if now < want {
            Signal::Ttin
        } else {
            Signal::Ttou
        };
        last_signal = signal;
        signals::send(source, leader.leader.key, signal).map_err(signal_error)?;
        sent += 1;
        // Wait for this one step to show before sending the next signal.
        loop {
            let moved = count(source, &leader);
            if moved != now {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ApiError::Timeout(format!(
                    "leader {} still has {moved} workers after {sent} {}; wanted {want}",
                    leader.leader.key.pid,
                    signal.name()
                )));
            }
            tokio::time::sleep(poll).await;
        }
    }
}
