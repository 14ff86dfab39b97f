//! Per-process memory from `/proc/PID/smaps_rollup`, falling back to summing `/proc/PID/smaps`
//! on kernels without the rollup (before 4.14).

use procfs::process::{MemoryMaps, Process};

use crate::api::Memory;

/// Sums the kernel's counters (already in bytes in `procfs`) over every mapping in `maps`.
fn from_maps(maps: &MemoryMaps) -> Memory {
    let mut m = Memory::default();
    for map in &maps.0 {
        let get = |k: &str| map.extension.map.get(k).copied().unwrap_or(0);
        m.pss_bytes += get("Pss");
        m.rss_bytes += get("Rss");
        m.uss_bytes += get("Private_Clean") + get("Private_Dirty");
        m.shared_bytes += get("Shared_Clean") + get("Shared_Dirty");
        m.swap_bytes += get("Swap");
    }
    m
}

/// Reads the memory of an opened process; `None` when it vanished or smaps is unreadable.
pub fn read(process: &Process) -> Option<Memory> {
    match process.smaps_rollup() {
        Ok(rollup) if !rollup.memory_map_rollup.0.is_empty() => {
            Some(from_maps(&rollup.memory_map_rollup))
        }
        // Rollup missing (old kernel) or empty: the slower full smaps.
        _ => process.smaps().ok().map(|maps| from_maps(&maps)),
    }
}
