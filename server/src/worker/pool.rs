//! The request thread pool of `--threads N`: Python threads that run the app and write the
//! response, then hand the connection back to the event loop.

use std::os::fd::RawFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use pyo3::Python;

use crate::wsgi::{Completion, Request, Wsgi};

/// One request for a pool thread.
pub struct Job {
    /// The connection's key in the event loop.
    pub key: usize,
    /// The complete request.
    pub req: Request,
    /// The connection's socket.
    pub fd: RawFd,
    /// Response bytes of earlier requests not yet written.
    pub pending: Vec<u8>,
}

/// The threads and the two channels that connect them to the event loop.
pub struct Pool {
    jobs: Sender<Job>,
    done: Receiver<(usize, Completion)>,
}

impl Pool {
    /// Starts `threads` request threads.
    pub fn start(threads: usize, wsgi: Arc<Wsgi>, waker: Arc<mio::Waker>) -> Self {
        let (jobs, job_rx) = channel::<Job>();
        let (done_tx, done) = channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let wsgi = Arc::clone(&wsgi);
            let waker = Arc::clone(&waker);
            let spawned = std::thread::Builder::new()
                .name(format!("request-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let completion =
                            Python::attach(|py| wsgi.handle(py, job.req, job.fd, job.pending));
                        if done_tx.send((job.key, completion)).is_err() {
                            return;
                        }
                        let _ = waker.wake();
                    }
                });
            if let Err(e) = spawned {
                log::error!("cannot start request thread {i}: {e}");
            }
        }
        Self { jobs, done }
    }

    /// Queues a request.
    pub fn submit(&self, job: Job) {
        if self.jobs.send(job).is_err() {
            log::error!("request threads are gone");
        }
    }

    /// Requests finished since the last call.
    pub fn finished(&self) -> Vec<(usize, Completion)> {
        self.done.try_iter().collect()
    }
}
