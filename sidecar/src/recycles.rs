//! `GET /v1/recycles`: the records running forkscope leaders keep of the workers they recycled
//! on memory (`forkscope_protocol::recycle`), read from each leader's folder.

use forkscope_protocol::RuntimeDir;
use forkscope_protocol::recycle::{MAX_RECYCLE_BYTES, Recycle};

use crate::api::{RecycleList, ServerKind};
use crate::discovery::Snapshot;

/// Every record of the forkscope leaders in `snap`, newest first. A file that is not a record
/// of that leader (planted, or half-written by an older version) is left out.
pub fn list(snap: &Snapshot, runtime: &RuntimeDir) -> RecycleList {
    let mut recycles: Vec<Recycle> = snap
        .leaders
        .iter()
        .filter(|l| l.server == ServerKind::Forkscope)
        .flat_map(|l| {
            let pid = l.leader.key.pid;
            let entries = std::fs::read_dir(runtime.recycles_dir(pid))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default();
            entries.into_iter().filter_map(move |path| {
                let r: Recycle =
                    forkscope_protocol::read_json_limited(&path, MAX_RECYCLE_BYTES).ok()?;
                (r.leader_pid == pid).then_some(r)
            })
        })
        .collect();
    recycles.sort_by(|a, b| b.at.total_cmp(&a.at));
    RecycleList { recycles }
}
