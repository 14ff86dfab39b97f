//! The worker's proportional set size (PSS), read from `/proc/self/smaps_rollup`.
//!
//! PSS charges each shared page to the processes that map it in equal parts, so the PSS of the
//! workers of one leader adds up to what they cost together; heap diffs report it at the
//! baseline and at the capture beside tracemalloc's own figures.

use std::path::Path;

/// Where the kernel publishes this process' summed memory map.
const SMAPS_ROLLUP: &str = "/proc/self/smaps_rollup";

/// The PSS of an `smaps_rollup` (or `smaps`) text, in bytes, parsed by the contract shared
/// with the sidecar ([`forkscope_protocol::smaps`]); `None` when it has no well-formed figure.
pub fn parse_pss(text: &str) -> Option<u64> {
    forkscope_protocol::smaps::parse(text).map(|r| r.pss)
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

    // The parse itself is tested in forkscope_protocol::smaps.
    #[test]
    fn pss_in_bytes() {
        assert_eq!(parse_pss("Rss: 9 kB\nPss: 7 kB\n"), Some(7 * 1024));
    }

    #[test]
    fn this_process_has_a_pss() {
        let pss = self_pss().expect("Linux publishes /proc/self/smaps_rollup");
        assert!(pss > 0);
    }
}
