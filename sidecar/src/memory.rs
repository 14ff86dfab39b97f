//! Per-process memory from `/proc/PID/smaps_rollup`, falling back to summing `/proc/PID/smaps`
//! on kernels without the rollup (before 4.14); both parsed by the contract shared with the
//! server, [`forkscope_protocol::smaps`].

use std::io::Read;

use procfs::process::Process;

use crate::api::Memory;

/// The largest `smaps` text read (a process with tens of thousands of mappings).
const MAX_SMAPS_BYTES: u64 = 64 * 1024 * 1024;

fn read_text(process: &Process, name: &str) -> Option<String> {
    let file = process.open_relative(name).ok()?;
    let mut text = String::new();
    file.take(MAX_SMAPS_BYTES).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Reads the memory of an opened process; `None` when it vanished or smaps is unreadable.
pub fn read(process: &Process) -> Option<Memory> {
    let rollup = read_text(process, "smaps_rollup")
        .and_then(|text| forkscope_protocol::smaps::parse(&text))
        // Rollup missing (old kernel) or empty: the slower full smaps.
        .or_else(|| forkscope_protocol::smaps::parse(&read_text(process, "smaps")?))?;
    Some(Memory {
        pss_bytes: rollup.pss,
        rss_bytes: rollup.rss,
        uss_bytes: rollup.uss(),
        shared_bytes: rollup.shared(),
        swap_bytes: rollup.swap,
    })
}
