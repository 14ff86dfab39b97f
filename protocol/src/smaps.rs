//! Memory counters from `/proc/PID/smaps_rollup` (or `/proc/PID/smaps`), parsed the same way
//! by the server (PSS at the start and the capture of a heap diff) and the sidecar (the memory
//! API and metrics).
//!
//! Each counted line is `Key:` followed by a number and `kB`. The rollup has one line per key;
//! the full `smaps` has one per mapping, and the same parse sums them, so kernels before 4.14
//! (no rollup) read the same way.

/// The counters of one process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    /// `Rss`.
    pub rss: u64,
    /// `Pss`: each shared page charged in equal parts to the processes that map it.
    pub pss: u64,
    /// `Shared_Clean`.
    pub shared_clean: u64,
    /// `Shared_Dirty`.
    pub shared_dirty: u64,
    /// `Private_Clean`.
    pub private_clean: u64,
    /// `Private_Dirty`.
    pub private_dirty: u64,
    /// `Swap`.
    pub swap: u64,
}

impl Rollup {
    /// Unique set size: the private pages.
    pub fn uss(&self) -> u64 {
        self.private_clean.saturating_add(self.private_dirty)
    }

    /// Resident pages shared with other processes.
    pub fn shared(&self) -> u64 {
        self.shared_clean.saturating_add(self.shared_dirty)
    }

    fn field(&mut self, key: &str) -> Option<&mut u64> {
        Some(match key {
            "Rss" => &mut self.rss,
            "Pss" => &mut self.pss,
            "Shared_Clean" => &mut self.shared_clean,
            "Shared_Dirty" => &mut self.shared_dirty,
            "Private_Clean" => &mut self.private_clean,
            "Private_Dirty" => &mut self.private_dirty,
            "Swap" => &mut self.swap,
            _ => return None,
        })
    }
}

/// Parses an `smaps_rollup` or `smaps` text.
///
/// Returns `None` when there is no `Pss:` line, or a counted line is malformed (a truncated
/// read, a unit other than `kB`): a wrong figure is worse than none. Other keys (`Pss_Dirty`,
/// `SwapPss`, the mapping header lines) are ignored.
pub fn parse(text: &str) -> Option<Rollup> {
    let mut out = Rollup::default();
    let mut pss_seen = false;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(slot) = out.field(key) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let value: u64 = fields.next()?.parse().ok()?;
        if fields.next() != Some("kB") {
            return None;
        }
        *slot = slot.checked_add(value.checked_mul(1024)?)?;
        pss_seen |= key == "Pss";
    }
    pss_seen.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `smaps_rollup` of a Python worker (Linux 6.x).
    const ROLLUP: &str = "\
55d0c8a4e000-7ffd5a5f3000 ---p 00000000 00:00 0                          [rollup]
Rss:               18932 kB
Pss:               11305 kB
Pss_Dirty:          6420 kB
Pss_Anon:           6388 kB
Pss_File:           4917 kB
Pss_Shmem:             0 kB
Shared_Clean:      10800 kB
Shared_Dirty:        120 kB
Private_Clean:      1700 kB
Private_Dirty:      6312 kB
Referenced:        18932 kB
Anonymous:          6388 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                 12 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn a_rollup_in_bytes() {
        let r = parse(ROLLUP).expect("parses");
        assert_eq!(r.pss, 11305 * 1024);
        assert_eq!(r.rss, 18932 * 1024);
        assert_eq!(r.uss(), (1700 + 6312) * 1024);
        assert_eq!(r.shared(), (10800 + 120) * 1024);
        assert_eq!(r.swap, 12 * 1024);
    }

    #[test]
    fn full_smaps_sums_its_mappings() {
        let text = "\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python3
Rss:                 8 kB
Pss:                 4 kB
VmFlags: rd ex mr mw me dw
00651000-00652000 rw-p 00051000 08:02 173521      /usr/bin/python3
Rss:                 4 kB
Pss:                 4 kB
";
        let r = parse(text).expect("parses");
        assert_eq!((r.rss, r.pss), (12 * 1024, 8 * 1024));
    }

    #[test]
    fn pss_friends_are_not_pss_and_malformed_lines_are_no_figure() {
        assert_eq!(parse("Pss_Dirty: 5 kB\nPss_Anon: 7 kB\n"), None);
        for text in [
            "",
            "Pss:\n",
            "Pss: x kB\n",
            "Pss: 12 MB\n",
            "Pss: 12\n",
            "Rss: 1 kB\n",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }
}
