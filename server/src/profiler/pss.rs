//! The worker's proportional set size (PSS), read from `/proc/self/smaps_rollup`.
//!
//! PSS charges each shared page to the processes that map it in equal parts, so the PSS of the
//! workers of one leader adds up to what they cost together; heap diffs report it at the
//! baseline and at the capture beside tracemalloc's own figures.

use std::path::Path;

/// Where the kernel publishes this process' summed memory map.
const SMAPS_ROLLUP: &str = "/proc/self/smaps_rollup";

/// The `Pss:` line of an `smaps_rollup` (or `smaps`) text, in bytes.
///
/// Returns `None` when there is no well-formed `Pss:` line (a kernel without the file, a
/// truncated read). Only the first `Pss:` line counts: `smaps_rollup` has exactly one.
pub fn parse_pss(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("Pss:")?;
        let mut fields = rest.split_whitespace();
        let value: u64 = fields.next()?.parse().ok()?;
        match fields.next() {
            Some("kB") => value.checked_mul(1024),
            _ => None,
        }
    })
}

/// PSS of the file at `path` (an `smaps_rollup`), bytes; `None` when unreadable.
pub fn read_pss(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| parse_pss(&text))
}

/// PSS of the calling process, bytes; `None` when `/proc` does not tell.
pub fn self_pss() -> Option<u64> {
    read_pss(Path::new(SMAPS_ROLLUP))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `smaps_rollup` of a Python worker (Linux 6.x), trimmed of nothing.
    const FIXTURE: &str = "\
55d0c8a4e000-7ffd3b5f2000 ---p 00000000 00:00 0                          [rollup]
Rss:               24816 kB
Pss:               11305 kB
Pss_Dirty:          6420 kB
Pss_Anon:           6388 kB
Pss_File:           4917 kB
Pss_Shmem:             0 kB
Shared_Clean:      13496 kB
Shared_Dirty:       4880 kB
Private_Clean:       120 kB
Private_Dirty:      6320 kB
Referenced:        24816 kB
Anonymous:         11200 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn pss_line_in_bytes() {
        assert_eq!(parse_pss(FIXTURE), Some(11305 * 1024));
    }

    #[test]
    fn pss_dirty_and_friends_are_not_pss() {
        assert_eq!(parse_pss("Pss_Dirty: 5 kB\nPss_Anon: 7 kB\n"), None);
    }

    #[test]
    fn malformed_lines_give_none() {
        for text in ["", "Pss:\n", "Pss: x kB\n", "Pss: 12 MB\n", "Pss: 12\n"] {
            assert_eq!(parse_pss(text), None, "{text:?}");
        }
    }

    #[test]
    fn this_process_has_a_pss() {
        let pss = self_pss().expect("Linux publishes /proc/self/smaps_rollup");
        assert!(pss > 0);
    }
}
