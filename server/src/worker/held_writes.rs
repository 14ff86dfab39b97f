//! Finished responses that wait for the end of their batch of events, written by a timer thread
//! if the loop stays in a request for too long.
//!
//! A loop writes the responses of one batch together, after the batch's requests ran (see
//! `EventLoop::flush_deferred`). The loop cannot write while the app runs, so before it calls
//! the app with responses still unwritten it parks them here; the worker's timer thread writes
//! whatever has waited [`AT_MOST`] and the loop takes back what is left when the app returns.
//! So a slow request never holds the fast responses before it for longer than about twice
//! [`AT_MOST`] (the timer's tick and its lateness).
//!
//! The timer ticks only while some loop is busy, and parks itself after a quiet spell: it costs
//! nothing to an idle worker, and a loop wakes it (one futex call) only when it was parked.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::wsgi::output::Output;

/// How long a finished response may wait for the end of its batch.
pub const AT_MOST: Duration = Duration::from_millis(1);

/// Ticks without parked responses after which the timer parks itself.
const QUIET_TICKS: u32 = 100;

/// Response bytes of one connection, parked while its loop runs another client's request.
#[derive(Debug)]
pub struct Parked {
    /// The connection's key in its loop.
    pub key: usize,
    fd: RawFd,
    /// What is not written yet.
    pub bytes: Vec<u8>,
}

/// The parked responses of one loop.
#[derive(Debug, Default)]
struct Lot {
    /// When the oldest of them was finished (monotonic clock).
    since: Option<Duration>,
    parked: Vec<Parked>,
}

#[derive(Debug)]
struct Inner {
    lots: Vec<Mutex<Lot>>,
    /// The timer waits on this when quiet.
    sleeping: Mutex<bool>,
    wake: Condvar,
    /// Mirrors `sleeping`, read without the lock on the loop's path.
    asleep: AtomicBool,
}

/// The parked responses of every loop of a worker, and the timer thread that writes them.
#[derive(Debug, Clone)]
pub struct HeldWrites {
    inner: Arc<Inner>,
}

impl HeldWrites {
    /// One lot per loop, and the timer thread (started now, asleep until needed).
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(loops: usize) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            lots: (0..loops).map(|_| Mutex::new(Lot::default())).collect(),
            sleeping: Mutex::new(true),
            wake: Condvar::new(),
            asleep: AtomicBool::new(true),
        });
        let timer = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("held-writes".into())
            .spawn(move || timer.run())?;
        Ok(Self { inner })
    }

    /// Parks the responses of loop `index` (finished at `since`) while it runs a request. The
    /// connections stay open until the loop takes them back through the returned guard
    /// ([`Unpark::take_back`]): the loop closes none while in the app. Dropped without that (a
    /// panic unwinding the loop, whose sockets then close and whose numbers may be reused
    /// before the timer ticks), the guard drops what is still parked.
    pub fn park(
        &self,
        index: usize,
        since: Duration,
        parked: impl Iterator<Item = Parked>,
    ) -> Unpark {
        {
            let mut lot = self.inner.lots[index].lock();
            lot.parked.extend(parked);
            lot.since.get_or_insert(since);
        }
        if self.inner.asleep.load(Ordering::SeqCst) {
            let mut sleeping = self.inner.sleeping.lock();
            *sleeping = false;
            self.inner.asleep.store(false, Ordering::SeqCst);
            self.inner.wake.notify_one();
        }
        Unpark {
            held: self.clone(),
            index,
            taken: false,
        }
    }
}

/// A loop's parked responses, to take back when its request ends (see [`HeldWrites::park`]).
#[derive(Debug)]
pub struct Unpark {
    held: HeldWrites,
    index: usize,
    taken: bool,
}

impl Unpark {
    /// Takes back what the timer did not write, into `out` (emptied first; both buffers keep
    /// their capacity for the next request).
    pub fn take_back(mut self, out: &mut Vec<Parked>) {
        out.clear();
        out.append(&mut self.lot().parked);
        self.taken = true;
    }

    /// The loop's lot, no longer watched by the timer.
    fn lot(&self) -> parking_lot::MutexGuard<'_, Lot> {
        let mut lot = self.held.inner.lots[self.index].lock();
        lot.since = None;
        lot
    }
}

impl Drop for Unpark {
    fn drop(&mut self) {
        if !self.taken {
            self.lot().parked.clear();
        }
    }
}

impl Parked {
    /// Bytes for connection `key` on socket `fd`.
    pub fn new(key: usize, fd: RawFd, bytes: Vec<u8>) -> Self {
        Self { key, fd, bytes }
    }

    /// Writes what the socket takes now (the loop keeps the connection open while its bytes
    /// are parked: it is inside a request until it takes them back). An error leaves the bytes
    /// for the loop, whose own write meets the same error and closes the connection.
    fn write(&mut self) {
        let mut output = Output::new(self.fd, std::mem::take(&mut self.bytes), Duration::ZERO);
        let _ = output.try_flush();
        self.bytes = output.buf;
    }
}

impl Inner {
    fn run(&self) {
        let mut quiet = 0;
        loop {
            if quiet >= QUIET_TICKS {
                self.sleep_until_woken();
                quiet = 0;
            }
            std::thread::sleep(AT_MOST);
            let now = crate::heartbeat::monotonic();
            let mut any = false;
            for lot in &self.lots {
                let mut lot = lot.lock();
                let Some(since) = lot.since else { continue };
                any = true;
                if now.saturating_sub(since) < AT_MOST {
                    continue;
                }
                for p in &mut lot.parked {
                    p.write();
                }
                // Written (or failed): the loop settles the rest when it takes them back.
                lot.since = None;
            }
            quiet = if any { 0 } else { quiet + 1 };
        }
    }

    /// Parks the timer until a loop parks responses. A loop that parked them just before
    /// `asleep` was set is seen by the look at the lots after it (the lots' locks order the
    /// two), so no response waits for a timer that went to sleep.
    fn sleep_until_woken(&self) {
        let mut sleeping = self.sleeping.lock();
        *sleeping = true;
        self.asleep.store(true, Ordering::SeqCst);
        if self.lots.iter().any(|lot| lot.lock().since.is_some()) {
            *sleeping = false;
            self.asleep.store(false, Ordering::SeqCst);
            return;
        }
        while *sleeping {
            self.wake.wait(&mut sleeping);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn the_timer_writes_parked_bytes_that_waited_long_enough() {
        let held = HeldWrites::start(2).expect("timer");
        let (ours, mut peer) = UnixStream::pair().expect("pair");
        let since = crate::heartbeat::monotonic();
        let parked = held.park(
            1,
            since,
            [Parked::new(7, ours.as_raw_fd(), b"answer".to_vec())].into_iter(),
        );
        // The loop never takes them back here: only the timer can write them.
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut got = [0u8; 6];
        peer.read_exact(&mut got)
            .expect("the timer wrote the parked bytes");
        assert_eq!(&got, b"answer");
        let mut back = Vec::new();
        parked.take_back(&mut back);
        assert!(back.iter().all(|p| p.key == 7 && p.bytes.is_empty()));
    }

    #[test]
    fn what_the_socket_does_not_take_goes_back_to_the_loop_in_order() {
        let held = HeldWrites::start(1).expect("timer");
        let (ours, mut peer) = UnixStream::pair().expect("pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let big: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let parked = held.park(
            0,
            crate::heartbeat::monotonic(),
            [Parked::new(3, ours.as_raw_fd(), big.clone())].into_iter(),
        );
        // The first bytes arrive: the timer wrote what the socket buffer takes.
        let mut first = [0u8; 1];
        peer.read_exact(&mut first).expect("first byte");
        let mut back = Vec::new();
        parked.take_back(&mut back);
        assert_eq!(back.len(), 1);
        let left = &back[0].bytes;
        assert!(
            !left.is_empty() && left.len() < big.len(),
            "a partial write"
        );
        assert_eq!(left.as_slice(), &big[big.len() - left.len()..]);
    }
}
