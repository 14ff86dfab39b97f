//! Aggregation of per-worker heap diffs into one ranking: sites keyed by their traceback,
//! summed across workers, ranked by total growth, with the number of workers each appears in.

use std::collections::HashMap;

use forkscope_protocol::{Frame, HeapDiff};

use crate::api::{Summary, SummarySite};

/// Sums `diffs` site by site and keeps the `top` sites with the largest summed `size_diff`.
///
/// Ties are broken by the traceback text so the order is deterministic.
pub fn summarize<'a>(diffs: impl IntoIterator<Item = &'a HeapDiff>, top: usize) -> Summary {
    let mut out = Summary::default();
    let mut sites: HashMap<&'a [Frame], SummarySite> = HashMap::new();
    for diff in diffs {
        out.workers += 1;
        out.total_size_diff = out.total_size_diff.saturating_add(diff.total_size_diff);
        if let (Some(before), Some(after)) = (diff.pss_before_bytes, diff.pss_after_bytes) {
            let growth = i64::try_from(after).unwrap_or(i64::MAX)
                - i64::try_from(before).unwrap_or(i64::MAX);
            out.pss_growth_bytes = out.pss_growth_bytes.saturating_add(growth);
        }
        for site in &diff.sites {
            let entry = sites
                .entry(site.traceback.as_slice())
                .or_insert_with(|| SummarySite {
                    traceback: site.traceback.clone(),
                    size_diff: 0,
                    count_diff: 0,
                    size_after: 0,
                    workers: 0,
                });
            entry.size_diff = entry.size_diff.saturating_add(site.size_diff);
            entry.count_diff = entry.count_diff.saturating_add(site.count_diff);
            entry.size_after = entry.size_after.saturating_add(site.size_after);
            entry.workers += 1;
        }
    }
    let mut ranked: Vec<SummarySite> = sites.into_values().collect();
    let key = |s: &SummarySite| {
        s.traceback
            .iter()
            .map(Frame::location)
            .collect::<Vec<_>>()
            .join(" < ")
    };
    ranked.sort_by(|a, b| {
        b.size_diff
            .cmp(&a.size_diff)
            .then_with(|| key(a).cmp(&key(b)))
    });
    ranked.truncate(top);
    out.sites = ranked;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkscope_protocol::{GroupBy, SiteDiff, TracedMemory};

    fn frame(file: &str, line: u32) -> Frame {
        Frame {
            filename: file.into(),
            lineno: line,
            function: None,
        }
    }

    fn site(line: u32, size_diff: i64) -> SiteDiff {
        SiteDiff {
            traceback: vec![frame("app.py", line)],
            size_before: 0,
            size_after: size_diff.max(0) as u64,
            size_diff,
            count_before: 0,
            count_after: 1,
            count_diff: 1,
        }
    }

    fn diff(sites: Vec<SiteDiff>, pss: (u64, u64)) -> HeapDiff {
        HeapDiff {
            frames: 1,
            group_by: GroupBy::Lineno,
            baseline_at: 0.0,
            captured_at: 1.0,
            traced_before: TracedMemory::default(),
            traced_after: TracedMemory::default(),
            tracemalloc_overhead_bytes: 0,
            pss_before_bytes: Some(pss.0),
            pss_after_bytes: Some(pss.1),
            total_size_diff: sites.iter().map(|s| s.size_diff).sum(),
            total_sites: sites.len() as u64,
            sites,
        }
    }

    #[test]
    fn sums_across_workers_and_ranks_by_total_growth() {
        let a = diff(vec![site(10, 100), site(20, 300)], (1000, 1500));
        let b = diff(vec![site(10, 250), site(30, -50)], (2000, 1900));
        let s = summarize([&a, &b], 10);
        assert_eq!(s.workers, 2);
        assert_eq!(s.total_size_diff, 600);
        assert_eq!(s.pss_growth_bytes, 400);
        let lines: Vec<(u32, i64, u32)> = s
            .sites
            .iter()
            .map(|x| (x.traceback[0].lineno, x.size_diff, x.workers))
            .collect();
        assert_eq!(lines, vec![(10, 350, 2), (20, 300, 1), (30, -50, 1)]);
    }

    #[test]
    fn cuts_to_top_and_breaks_ties_by_location() {
        let a = diff(vec![site(2, 5), site(1, 5), site(3, 1)], (0, 0));
        let s = summarize([&a], 2);
        let lines: Vec<u32> = s.sites.iter().map(|x| x.traceback[0].lineno).collect();
        assert_eq!(lines, vec![1, 2]);
    }

    #[test]
    fn unknown_pss_does_not_count_as_growth() {
        let mut a = diff(vec![], (0, 0));
        a.pss_after_bytes = None;
        assert_eq!(summarize([&a], 5).pss_growth_bytes, 0);
    }
}
