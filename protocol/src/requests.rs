//! Per-worker request counters: `{runtime_dir}/{leader_pid}/requests.bin`.
//!
//! gunicorn apps that want request metrics per worker need `prometheus_client`'s multiprocess
//! mode: a file per worker and metric, written on every request, cleaned up by a hook. Here the
//! leader maps one small file before it forks, every worker adds to its slot's counters with
//! atomic operations on the mapping (no lock, no allocation, no system call per request), and
//! the sidecar reads the file when it is scraped. Counters live per *slot*, in the leader's
//! file, so a worker's restart does not reset them; they start over only with a new leader.
//!
//! # Layout
//!
//! Native-endian `u64` words (little-endian on every platform forkscope supports):
//!
//! ```text
//! header   HEADER_WORDS words: MAGIC, FORMAT_VERSION, SLOTS, SLOT_WORDS, BUCKETS_MICROS.len(),
//!          WORKERS, then zeros
//! slots    SLOTS records of SLOT_WORDS words, slot i at HEADER_WORDS + i * SLOT_WORDS:
//!            [0..6)    responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx, none sent
//!            [6..23)   request durations: one count per bucket of BUCKETS_MICROS, then +Inf
//!                      (not cumulative)
//!            23        sum of request durations, microseconds
//!            24        response body bytes sent
//!            25        requests that ended in an exception
//!            [26..29)  workers of the slot recycled: memory, max_requests, timeout
//!                      (RecycleReason::ALL order)
//! workers  WORKERS records of 2 words, one per live worker process: its slot + 1 (0 = free),
//!          and its requests in flight (the leader clears a record when it reaps the worker,
//!          so a worker killed mid-request leaves no phantom request behind)
//! ```

use std::path::Path;

use crate::files::{FileError, read_limited};

/// The first word: "FSREQS01" in ASCII.
pub const MAGIC: u64 = u64::from_le_bytes(*b"FSREQS01");
/// The version of this layout.
pub const FORMAT_VERSION: u64 = 1;
/// Words of the header.
pub const HEADER_WORDS: usize = 16;
/// Slots recorded; a worker in a higher slot is served but not counted.
pub const SLOTS: usize = 1024;
/// Words of one slot's record (a few spare, so it can grow without moving others).
pub const SLOT_WORDS: usize = 32;
/// Worker records (live workers of a leader, including those finishing during a reload).
pub const WORKERS: usize = 2048;

/// Upper bounds of the request-duration buckets, in microseconds (100 µs to 10 s).
pub const BUCKETS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Offsets inside a slot's record.
pub mod word {
    /// First of the six status-class counters (1xx, 2xx, 3xx, 4xx, 5xx, none).
    pub const STATUS: usize = 0;
    /// First bucket counter; `BUCKETS_MICROS.len() + 1` of them.
    pub const BUCKETS: usize = 6;
    /// Sum of durations in microseconds.
    pub const DURATION_SUM: usize = BUCKETS + super::BUCKETS_MICROS.len() + 1;
    /// Body bytes sent.
    pub const BYTES_OUT: usize = DURATION_SUM + 1;
    /// Requests that ended in an exception.
    pub const EXCEPTIONS: usize = BYTES_OUT + 1;
    /// First of the recycle counters, one per [`crate::recycle::RecycleReason::ALL`].
    pub const RECYCLES: usize = EXCEPTIONS + 1;
}

/// Status classes in the order of their counters, as the `code` label shows them.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Where in the record a response with `status` is counted (`0` = no response was sent).
pub fn status_class(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100) - 1,
        _ => 5,
    }
}

/// The bucket a request that took `micros` falls in (the last one is +Inf).
pub fn bucket(micros: u64) -> usize {
    BUCKETS_MICROS.partition_point(|&b| b < micros)
}

const _: () = assert!(
    word::RECYCLES + crate::recycle::RecycleReason::ALL.len() <= SLOT_WORDS,
    "a slot's counters fit its record"
);

/// Words of the whole file.
pub const FILE_WORDS: usize = HEADER_WORDS + SLOTS * SLOT_WORDS + WORKERS * 2;
/// Bytes of the whole file.
pub const FILE_BYTES: usize = FILE_WORDS * 8;

/// The header's words, as the leader writes them.
pub fn header() -> [u64; 6] {
    [
        MAGIC,
        FORMAT_VERSION,
        SLOTS as u64,
        SLOT_WORDS as u64,
        BUCKETS_MICROS.len() as u64,
        WORKERS as u64,
    ]
}

/// The index of the first word of worker record `cell`.
pub fn worker_word(cell: usize) -> usize {
    HEADER_WORDS + SLOTS * SLOT_WORDS + cell * 2
}

/// One slot's counters, as read from the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotRequests {
    /// The slot.
    pub slot: u32,
    /// Responses by class, in the order of [`STATUS_CLASSES`].
    pub by_status: [u64; 6],
    /// Requests per duration bucket (not cumulative), the last one +Inf.
    pub buckets: Vec<u64>,
    /// Sum of durations, microseconds.
    pub duration_sum_micros: u64,
    /// Body bytes sent.
    pub bytes_out: u64,
    /// Requests that ended in an exception.
    pub exceptions: u64,
    /// Workers recycled, by [`crate::recycle::RecycleReason::ALL`].
    pub recycles: [u64; 3],
    /// Requests running now, summed over the slot's live workers.
    pub in_flight: u64,
}

impl SlotRequests {
    /// Every request counted (the histogram's count).
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Why a counters file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestsError {
    /// It could not be read.
    #[error(transparent)]
    File(#[from] FileError),
    /// It is not a counters file of this version.
    #[error("{0}: not a forkscope request-counters file of format {FORMAT_VERSION}")]
    Format(String),
}

/// Reads the counters of every slot that has served a request or has one running.
///
/// # Errors
/// The file is missing, unreadable or of another layout.
pub fn read(path: &Path) -> Result<Vec<SlotRequests>, RequestsError> {
    let bytes = read_limited(path, FILE_BYTES as u64)?;
    if bytes.len() != FILE_BYTES {
        return Err(RequestsError::Format(path.display().to_string()));
    }
    let words: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("chunks of eight")))
        .collect();
    if words[..6] != header() {
        return Err(RequestsError::Format(path.display().to_string()));
    }
    Ok(decode(&words))
}

fn decode(words: &[u64]) -> Vec<SlotRequests> {
    let mut in_flight = vec![0u64; SLOTS];
    for cell in 0..WORKERS {
        let at = worker_word(cell);
        let (slot, running) = (words[at], words[at + 1]);
        if let Some(n) = (slot as usize)
            .checked_sub(1)
            .and_then(|s| in_flight.get_mut(s))
        {
            // A worker's count is a wrapping u64 that can be read mid-update: never below 0.
            *n += running.min(i64::MAX as u64);
        }
    }
    (0..SLOTS)
        .filter_map(|slot| {
            let r = &words[HEADER_WORDS + slot * SLOT_WORDS..][..SLOT_WORDS];
            let buckets = r[word::BUCKETS..word::DURATION_SUM].to_vec();
            let counts = SlotRequests {
                slot: slot as u32,
                by_status: r[word::STATUS..word::BUCKETS]
                    .try_into()
                    .expect("six status words"),
                buckets,
                duration_sum_micros: r[word::DURATION_SUM],
                bytes_out: r[word::BYTES_OUT],
                exceptions: r[word::EXCEPTIONS],
                recycles: r[word::RECYCLES..word::RECYCLES + 3]
                    .try_into()
                    .expect("three recycle words"),
                in_flight: in_flight[slot],
            };
            let active = counts.count() > 0
                || counts.in_flight > 0
                || counts.by_status.iter().any(|&n| n > 0)
                || counts.recycles.iter().any(|&n| n > 0);
            active.then_some(counts)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_words() -> Vec<u64> {
        let mut w = vec![0u64; FILE_WORDS];
        w[..6].copy_from_slice(&header());
        w
    }

    fn write(words: &[u64]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("requests.bin");
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        std::fs::write(&path, bytes).expect("write");
        (dir, path)
    }

    #[test]
    fn classes_and_buckets_follow_the_bounds() {
        assert_eq!(status_class(200), 1);
        assert_eq!(status_class(404), 3);
        assert_eq!(status_class(503), 4);
        assert_eq!(status_class(0), 5);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100), 0, "a bound is inclusive (Prometheus' le)");
        assert_eq!(bucket(101), 1);
        assert_eq!(bucket(10_000_000), 15);
        assert_eq!(bucket(10_000_001), 16, "+Inf");
        assert_eq!(word::EXCEPTIONS, 25);
    }

    #[test]
    fn reads_the_slots_that_served_and_sums_in_flight_over_workers() {
        let mut w = file_words();
        let slot2 = HEADER_WORDS + 2 * SLOT_WORDS;
        w[slot2 + word::STATUS + 1] = 7;
        w[slot2 + word::STATUS + 4] = 1;
        w[slot2 + word::BUCKETS] = 6;
        w[slot2 + word::BUCKETS + 16] = 2;
        w[slot2 + word::DURATION_SUM] = 12_345;
        w[slot2 + word::BYTES_OUT] = 91;
        w[slot2 + word::EXCEPTIONS] = 1;
        // Two live workers of slot 2 (a reload), one request each; a free record; slot 5 has
        // a request running and has served none yet.
        for (cell, slot, running) in [(0, 3, 1), (1, 3, 1), (2, 0, 9), (3, 6, 1)] {
            w[worker_word(cell)] = slot;
            w[worker_word(cell) + 1] = running;
        }
        let (_dir, path) = write(&w);
        let read = read(&path).expect("read");
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].slot, 2);
        assert_eq!(read[0].by_status, [0, 7, 0, 0, 1, 0]);
        assert_eq!(read[0].count(), 8);
        assert_eq!(read[0].duration_sum_micros, 12_345);
        assert_eq!((read[0].bytes_out, read[0].exceptions), (91, 1));
        assert_eq!(read[0].in_flight, 2);
        assert_eq!(
            (read[1].slot, read[1].in_flight, read[1].count()),
            (5, 1, 0)
        );
    }

    #[test]
    fn another_layout_is_refused() {
        let mut w = file_words();
        w[3] = 16;
        let (_dir, path) = write(&w);
        assert!(matches!(read(&path), Err(RequestsError::Format(_))));
        let (_dir, short) = write(&file_words()[..100]);
        assert!(matches!(read(&short), Err(RequestsError::Format(_))));
    }
}
