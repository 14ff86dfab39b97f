//! The writing side of [`forkscope_protocol::requests`]: the leader maps its counters file
//! before forking, and each worker adds every request it serves to its slot's record with a
//! few relaxed atomic additions (no lock, no allocation, no system call). The sidecar reads the
//! file when Prometheus scrapes it.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use forkscope_protocol::requests::{
    FILE_BYTES, FILE_WORDS, HEADER_WORDS, SLOT_WORDS, SLOTS, WORKERS, bucket, header, status_class,
    word, worker_word,
};

use crate::slot_table::SlotTable;
use forkscope_protocol::recycle::RecycleReason;

/// The mapped counters file of one leader; a copy is a pointer to memory that stays mapped
/// until the process exits.
#[derive(Clone, Copy, Debug)]
pub struct RequestCounts {
    words: SlotTable,
}

impl RequestCounts {
    /// Creates the file at `path` (which must not exist: the leader's folder is new) and maps
    /// it, shared with every child forked afterwards.
    ///
    /// # Errors
    /// The file cannot be created, sized or mapped.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(path)?;
        file.set_len(FILE_BYTES as u64)?;
        let counts = Self {
            words: SlotTable::file(&file, FILE_WORDS).map_err(io::Error::from)?,
        };
        for (i, w) in header().into_iter().enumerate() {
            counts.word(i).store(w, Ordering::Relaxed);
        }
        Ok(counts)
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        self.words
            .word(index)
            .expect("counter offsets come from the layout, inside the file")
    }

    /// In the leader, before forking a worker into `slot` with worker record `cell`.
    pub fn claim(&self, cell: u32, slot: u32) {
        let at = worker_word(cell as usize);
        if (cell as usize) < WORKERS && (slot as usize) < SLOTS {
            self.word(at + 1).store(0, Ordering::Relaxed);
            self.word(at).store(u64::from(slot) + 1, Ordering::Release);
        }
    }

    /// In the leader, once the worker of record `cell` is reaped: its requests in flight ended
    /// with it.
    pub fn release(&self, cell: u32) {
        if (cell as usize) < WORKERS {
            let at = worker_word(cell as usize);
            self.word(at).store(0, Ordering::Relaxed);
            self.word(at + 1).store(0, Ordering::Relaxed);
        }
    }

    /// A worker of `slot` was recycled (the leader books memory and timeouts).
    pub fn recycled(&self, slot: u32, reason: RecycleReason) {
        if (slot as usize) < SLOTS {
            let at = HEADER_WORDS + slot as usize * SLOT_WORDS + recycle_word(reason);
            self.word(at).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What a worker in `slot` with record `cell` counts into (`None` past the file's slots).
    pub fn worker(&self, slot: u32, cell: Option<u32>) -> Option<WorkerCounts> {
        ((slot as usize) < SLOTS).then(|| WorkerCounts {
            counts: *self,
            record: HEADER_WORDS + slot as usize * SLOT_WORDS,
            in_flight: cell
                .filter(|&c| (c as usize) < WORKERS)
                .map(|c| worker_word(c as usize) + 1),
        })
    }
}

/// One worker's view: its slot's record and its own in-flight word.
#[derive(Clone, Copy, Debug)]
pub struct WorkerCounts {
    counts: RequestCounts,
    record: usize,
    in_flight: Option<usize>,
}

impl WorkerCounts {
    fn add(&self, offset: usize, n: u64) {
        self.counts
            .word(self.record + offset)
            .fetch_add(n, Ordering::Relaxed);
    }

    /// This worker retires itself (`--max-requests`).
    pub fn recycled(&self, reason: RecycleReason) {
        self.add(recycle_word(reason), 1);
    }

    /// A request goes to the app.
    pub fn begin(&self) {
        if let Some(at) = self.in_flight {
            self.counts.word(at).fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The request ended: answered with `status` (0 = nothing sent), `bytes` of body, after
    /// `took`; `raised` when it ended in an exception.
    pub fn end(&self, status: u16, took: Duration, bytes: u64, raised: bool) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.add(word::STATUS + status_class(status), 1);
        self.add(word::BUCKETS + bucket(micros), 1);
        self.add(word::DURATION_SUM, micros);
        if bytes > 0 {
            self.add(word::BYTES_OUT, bytes);
        }
        if raised {
            self.add(word::EXCEPTIONS, 1);
        }
        if let Some(at) = self.in_flight {
            self.counts.word(at).fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn recycle_word(reason: RecycleReason) -> usize {
    let index = RecycleReason::ALL
        .iter()
        .position(|r| *r == reason)
        .expect("every reason is listed");
    word::RECYCLES + index
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkscope_protocol::requests::read;

    #[test]
    fn what_workers_count_is_what_the_sidecar_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("requests.bin");
        let counts = RequestCounts::create(&path).expect("create");
        assert!(
            RequestCounts::create(&path).is_err(),
            "an existing file is never reused"
        );
        counts.claim(0, 3);
        counts.claim(1, 3);
        let w = counts.worker(3, Some(0)).expect("slot in range");
        let other = counts.worker(3, Some(1)).expect("slot in range");
        // SAFETY: the child only adds to shared memory and exits.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                w.begin();
                w.end(200, Duration::from_micros(80), 13, false);
                w.begin();
                w.end(500, Duration::from_millis(30), 0, true);
                w.begin();
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("wait");
            }
        }
        other.begin();
        let slots = read(&path).expect("read");
        assert_eq!(slots.len(), 1);
        let s = &slots[0];
        assert_eq!(s.slot, 3);
        assert_eq!(s.by_status, [0, 1, 0, 0, 1, 0]);
        assert_eq!((s.buckets[0], s.buckets[8], s.count()), (1, 1, 2));
        assert_eq!(s.duration_sum_micros, 30_080);
        assert_eq!((s.bytes_out, s.exceptions), (13, 1));
        assert_eq!(
            s.in_flight, 2,
            "the dead worker's request until it is reaped"
        );
        counts.release(0);
        assert_eq!(read(&path).expect("read")[0].in_flight, 1);
        assert!(counts.worker(SLOTS as u32, None).is_none());
    }
}
