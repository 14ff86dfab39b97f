//! Checking a profile request and choosing its workers. Pure: the candidates come from a
//! `/proc` scan made elsewhere ([`super::workers::Workers::candidates`]).

use forkscope_protocol::command::{MAX_FRAMES, MAX_TARGET_WORKERS, MAX_TOP};

use crate::api::{MAX_OWNER_BYTES, ProfileRequest, ServerKind, Targets};
use crate::discovery::ProcessKey;
use crate::error::ApiError;

/// A leader found in the pod, with its workers.
#[derive(Debug, Clone)]
pub(crate) struct LeaderCandidates {
    pub(crate) pid: u32,
    pub(crate) server: ServerKind,
    pub(crate) workers: Vec<Candidate>,
}

/// A worker that may be profiled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub(crate) key: ProcessKey,
    pub(crate) slot: u32,
    /// Its PSS, when the request needs it (`top_pss`) and `/proc` told.
    pub(crate) pss_bytes: Option<u64>,
    /// It answers the doorbell: every forkscope-server worker; a gunicorn worker once
    /// `forkscope.gunicorn`'s hook announced it in the runtime directory.
    pub(crate) doorbell: bool,
}

impl LeaderCandidates {
    /// True when at least one of its workers can be profiled.
    fn profilable(&self) -> bool {
        self.server == ServerKind::Forkscope || self.workers.iter().any(|w| w.doorbell)
    }

    /// Why a leader none of whose workers has the doorbell cannot be profiled, and the fix.
    fn no_doorbell(&self) -> ApiError {
        ApiError::Unprocessable(match self.server {
            ServerKind::Gunicorn => format!(
                "the workers of gunicorn leader {} have no forkscope profiler: add the line \
                 `from forkscope.gunicorn import *` to its gunicorn.conf.py (pip install \
                 forkscope), then reload it (HUP) or restart it (docs/GUNICORN.md)",
                self.pid
            ),
            ServerKind::Forkscope => format!("leader {} has no workers to profile", self.pid),
        })
    }
}

/// The leader and the workers a request targets, ordered by slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chosen {
    pub(crate) leader_pid: u32,
    pub(crate) workers: Vec<(ProcessKey, u32)>,
}

/// Checks every field of a profile request against its documented range.
///
/// # Errors
/// 400 naming the first field out of range.
pub(crate) fn validate(req: &ProfileRequest) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::InvalidRequest(m));
    if !(1..=MAX_FRAMES).contains(&req.frames) {
        return bad(format!(
            "frames must be 1..={MAX_FRAMES}, got {}",
            req.frames
        ));
    }
    if !(1..=MAX_TOP).contains(&req.top) {
        return bad(format!("top must be 1..={MAX_TOP}, got {}", req.top));
    }
    if let Some(d) = req.duration_seconds
        && !(0.1..=3600.0).contains(&d)
    {
        return bad(format!("duration_seconds must be 0.1..=3600, got {d}"));
    }
    if let Some(t) = req.timeout_seconds
        && !(1.0..=86400.0).contains(&t)
    {
        return bad(format!("timeout_seconds must be 1..=86400, got {t}"));
    }
    if let Some(owner) = &req.owner
        && (owner.len() > MAX_OWNER_BYTES
            || !owner.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
    {
        return bad(format!(
            "owner must be printable ASCII of at most {MAX_OWNER_BYTES} bytes"
        ));
    }
    match &req.targets {
        Targets::Slots { slots }
            if slots.is_empty() || slots.len() > MAX_TARGET_WORKERS as usize =>
        {
            bad(format!(
                "targets.slots must list 1..={MAX_TARGET_WORKERS} slots"
            ))
        }
        Targets::TopPss { count } if !(1..=MAX_TARGET_WORKERS).contains(count) => bad(format!(
            "targets.count must be 1..={MAX_TARGET_WORKERS}, got {count}"
        )),
        _ => Ok(()),
    }
}

/// Picks the leader (the one named, or the only one whose workers can be profiled:
/// forkscope-server, or gunicorn with `forkscope.gunicorn`'s hook) and its targeted workers.
///
/// # Errors
/// 422 for an unknown leader or slot, a gunicorn leader without the hook (the reason names the
/// line to add), or no worker to profile.
pub(crate) fn select(
    req: &ProfileRequest,
    leaders: &[LeaderCandidates],
) -> Result<Chosen, ApiError> {
    let leader = match req.leader_pid {
        Some(pid) => {
            let l = leaders.iter().find(|l| l.pid == pid).ok_or_else(|| {
                ApiError::NotAWorker(format!("process {pid} is not a discovered leader"))
            })?;
            if !l.profilable() {
                return Err(l.no_doorbell());
            }
            l
        }
        None => {
            let mut profilable = leaders.iter().filter(|l| l.profilable());
            match (profilable.next(), profilable.next()) {
                (Some(one), None) => one,
                (None, _) => {
                    return Err(match leaders.iter().find(|l| !l.profilable()) {
                        Some(l) => l.no_doorbell(),
                        None => ApiError::Unprocessable(
                            "no forkscope-server or gunicorn leader found in this pod".into(),
                        ),
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(ApiError::Unprocessable(
                        "several leaders can be profiled: name one with leader_pid".into(),
                    ));
                }
            }
        }
    };
    let candidates = || leader.workers.iter().filter(|w| w.doorbell);
    let mut workers: Vec<(ProcessKey, u32)> = match &req.targets {
        Targets::All => candidates().map(|w| (w.key, w.slot)).collect(),
        Targets::Slots { slots } => {
            let mut out = Vec::new();
            for slot in slots {
                let before = out.len();
                out.extend(
                    candidates()
                        .filter(|w| w.slot == *slot)
                        .map(|w| (w.key, w.slot)),
                );
                if out.len() == before {
                    return Err(ApiError::Unprocessable(format!(
                        "leader {} has no worker in slot {slot}",
                        leader.pid
                    )));
                }
            }
            out.sort();
            out.dedup();
            out
        }
        Targets::TopPss { count } => {
            let mut by_pss: Vec<(u64, ProcessKey, u32)> = candidates()
                .filter_map(|w| Some((w.pss_bytes?, w.key, w.slot)))
                .collect();
            by_pss.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(&b.2)));
            by_pss
                .into_iter()
                .take(*count as usize)
                .map(|(_, k, s)| (k, s))
                .collect()
        }
    };
    workers.sort_by_key(|(k, slot)| (*slot, k.pid));
    if workers.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "leader {} has no workers to profile",
            leader.pid
        )));
    }
    Ok(Chosen {
        leader_pid: leader.pid,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> ProfileRequest {
        serde_json::from_str(json).expect("request")
    }

    fn leader(
        pid: u32,
        server: ServerKind,
        workers: &[(u32, u32, Option<u64>)],
    ) -> LeaderCandidates {
        LeaderCandidates {
            pid,
            server,
            workers: workers
                .iter()
                .map(|(slot, wpid, pss)| Candidate {
                    key: ProcessKey {
                        pid: *wpid,
                        start_ticks: 1,
                    },
                    slot: *slot,
                    pss_bytes: *pss,
                    doorbell: server == ServerKind::Forkscope,
                })
                .collect(),
        }
    }

    fn pids(c: &Chosen) -> Vec<u32> {
        c.workers.iter().map(|(k, _)| k.pid).collect()
    }

    #[test]
    fn out_of_range_fields_are_refused() {
        for bad in [
            r#"{"frames": 0}"#,
            r#"{"top": 0}"#,
            r#"{"duration_seconds": 0.01}"#,
            r#"{"timeout_seconds": 0.5}"#,
            r#"{"owner": "a\u0001b"}"#,
            r#"{"targets": {"mode": "slots", "slots": []}}"#,
            r#"{"targets": {"mode": "top_pss", "count": 0}}"#,
        ] {
            let r = req(bad);
            assert!(
                matches!(validate(&r), Err(ApiError::InvalidRequest(_))),
                "{bad}"
            );
        }
        validate(&req("{}")).expect("defaults are valid");
    }

    #[test]
    fn picks_the_only_forkscope_leader_and_orders_by_slot() {
        let leaders = [
            leader(5, ServerKind::Gunicorn, &[(0, 6, None)]),
            leader(10, ServerKind::Forkscope, &[(1, 12, None), (0, 11, None)]),
        ];
        let c = select(&req("{}"), &leaders).expect("chosen");
        assert_eq!((c.leader_pid, pids(&c)), (10, vec![11, 12]));
        let e = select(&req(r#"{"leader_pid": 5}"#), &leaders).expect_err("gunicorn");
        assert!(matches!(e, ApiError::Unprocessable(_)), "{e:?}");
        let e = select(&req(r#"{"leader_pid": 99}"#), &leaders).expect_err("unknown");
        assert!(matches!(e, ApiError::NotAWorker(_)), "{e:?}");
    }

    #[test]
    fn gunicorn_workers_with_the_hook_are_chosen_and_without_it_the_reason_names_the_line() {
        let mut hooked = leader(5, ServerKind::Gunicorn, &[(0, 6, None), (1, 7, None)]);
        // Worker 6 is still booting (not announced yet); 7 has the doorbell.
        hooked.workers[1].doorbell = true;
        let bare = leader(8, ServerKind::Gunicorn, &[(0, 9, None)]);
        let c = select(&req("{}"), &[hooked.clone(), bare.clone()]).expect("chosen");
        assert_eq!((c.leader_pid, pids(&c)), (5, vec![7]));
        let named = select(&req(r#"{"leader_pid": 8}"#), &[hooked, bare.clone()]);
        for e in [named, select(&req("{}"), &[bare])] {
            match e {
                Err(ApiError::Unprocessable(reason)) => {
                    assert!(reason.contains("gunicorn leader 8"), "{reason}");
                    assert!(
                        reason.contains("`from forkscope.gunicorn import *`"),
                        "{reason}"
                    );
                }
                other => panic!("expected a 422: {other:?}"),
            }
        }
    }

    #[test]
    fn slots_and_top_pss() {
        let leaders = [leader(
            10,
            ServerKind::Forkscope,
            &[
                (0, 11, Some(100)),
                (1, 12, Some(300)),
                (2, 13, Some(200)),
                (3, 14, None),
            ],
        )];
        let c = select(
            &req(r#"{"targets": {"mode": "slots", "slots": [2, 0, 2]}}"#),
            &leaders,
        )
        .expect("slots");
        assert_eq!(pids(&c), vec![11, 13]);
        let e = select(
            &req(r#"{"targets": {"mode": "slots", "slots": [7]}}"#),
            &leaders,
        )
        .expect_err("slot 7");
        assert!(matches!(e, ApiError::Unprocessable(_)));
        let c = select(
            &req(r#"{"targets": {"mode": "top_pss", "count": 2}}"#),
            &leaders,
        )
        .expect("top");
        assert_eq!(pids(&c), vec![12, 13]);
    }
}
