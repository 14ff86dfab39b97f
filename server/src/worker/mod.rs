//! One worker process: the event loop, its connections, and request dispatch to the app.
//!
//! A single `mio` loop on the main thread owns every socket. It accepts, reads and parses
//! without the GIL, so idle keep-alive connections and slow clients cost nothing while requests
//! run. A complete request goes to the app:
//! - with `--threads 1`, inline on the loop thread (no hand-off: the fast path);
//! - with `--threads N`, to a pool of N Python threads, which write the response themselves
//!   and hand the connection back through a channel and a `mio::Waker`.
//!
//! The loop beats the leader's heartbeat on every turn, unless a request has been running for
//! longer than `--timeout`: then the leader notices the silence and aborts the worker.

pub mod conn;
pub mod pool;
pub mod signals;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener as MioTcpListener, UnixListener as MioUnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use pyo3::prelude::*;

use crate::heartbeat::Heartbeats;
use crate::http::Limits;
use crate::listeners::Listener;
use crate::wsgi::environ::{Peer, TrustedProxies};
use crate::wsgi::{Completion, Wsgi};
use conn::{Conn, Next, Stream};

/// How a worker process ends; the leader reads it from the exit status (gunicorn's numbers).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// A normal stop (signal, max-requests).
    Normal = 0,
    /// The worker could not start (before the app was involved).
    BootError = 3,
    /// The application could not be imported in the worker.
    AppLoadError = 4,
}

impl WorkerExit {
    /// Maps an exit status back.
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            0 => Some(Self::Normal),
            3 => Some(Self::BootError),
            4 => Some(Self::AppLoadError),
            _ => None,
        }
    }
}

/// The values the worker loop needs, resolved from the settings by the leader.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Python threads that run requests (1 = inline on the loop thread).
    pub threads: usize,
    /// How long an idle keep-alive connection stays open.
    pub keepalive: Duration,
    /// `--timeout`: a request running longer stops the heartbeat; also bounds slow clients.
    pub timeout: Duration,
    /// Requests after which the worker retires (0 = never); jitter already applied.
    pub max_requests: u64,
    /// HTTP parser limits.
    pub limits: Limits,
    /// Whose forwarding headers are believed.
    pub trusted: TrustedProxies,
    /// More than one worker (for `wsgi.multiprocess`).
    pub multiprocess: bool,
    /// Open connections above which the worker stops accepting.
    pub max_connections: usize,
}

/// Who this worker is.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    /// The stable slot.
    pub slot: u32,
    /// The shared heartbeat table.
    pub heartbeats: Heartbeats,
}

const WAKEUP: Token = Token(usize::MAX - 1);
const POOL_DONE: Token = Token(usize::MAX - 2);
const FIRST_CONN: usize = 1 << 20;

/// Runs the worker's event loop until it stops. The GIL is held on entry and on return.
///
/// # Errors
/// The poller cannot be created or a listener cannot be registered.
pub fn serve(
    py: Python<'_>,
    id: Identity,
    config: &WorkerConfig,
    listeners: &[Listener],
    wsgi: Wsgi,
    wakeup: OwnedFd,
) -> std::io::Result<WorkerExit> {
    let wsgi = Arc::new(wsgi);
    py.detach(|| {
        let mut event_loop = EventLoop::new(id, config, listeners, wsgi, wakeup)?;
        event_loop.run()
    })
}

enum Accepting {
    Tcp(MioTcpListener),
    Unix(MioUnixListener),
}

impl Accepting {
    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Accepting::Tcp(l) => l,
            Accepting::Unix(l) => l,
        }
    }
}

struct EventLoop<'a> {
    id: Identity,
    config: &'a WorkerConfig,
    poll: Poll,
    listeners: Vec<Accepting>,
    accepting: bool,
    wakeup: OwnedFd,
    conns: HashMap<usize, Conn>,
    next_key: usize,
    wsgi: Arc<Wsgi>,
    pool: Option<pool::Pool>,
    /// When each connection's in-flight request started (threaded mode).
    busy_since: HashMap<usize, Instant>,
    served: u64,
    stopping: bool,
    last_sweep: Instant,
}

impl<'a> EventLoop<'a> {
    fn new(
        id: Identity,
        config: &'a WorkerConfig,
        listeners: &[Listener],
        wsgi: Arc<Wsgi>,
        wakeup: OwnedFd,
    ) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let mut accepting = Vec::new();
        for (i, l) in listeners.iter().enumerate() {
            let mut a = match l {
                Listener::Tcp(t) => {
                    let t = t.try_clone()?;
                    t.set_nonblocking(true)?;
                    Accepting::Tcp(MioTcpListener::from_std(t))
                }
                Listener::Unix(u, _) => {
                    let u = u.try_clone()?;
                    u.set_nonblocking(true)?;
                    Accepting::Unix(MioUnixListener::from_std(u))
                }
            };
            poll.registry()
                .register(a.source(), Token(i), Interest::READABLE)?;
            accepting.push(a);
        }
        poll.registry().register(
            &mut SourceFd(&wakeup.as_raw_fd()),
            WAKEUP,
            Interest::READABLE,
        )?;
        let pool = if config.threads > 1 {
            let waker = Arc::new(mio::Waker::new(poll.registry(), POOL_DONE)?);
            Some(pool::Pool::start(config.threads, Arc::clone(&wsgi), waker))
        } else {
            None
        };
        Ok(Self {
            id,
            config,
            poll,
            listeners: accepting,
            accepting: true,
            wakeup,
            conns: HashMap::new(),
            next_key: FIRST_CONN,
            wsgi,
            pool,
            busy_since: HashMap::new(),
            served: 0,
            stopping: false,
            last_sweep: Instant::now(),
        })
    }

    fn run(&mut self) -> std::io::Result<WorkerExit> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.beat();
            if self.stopping && self.drained() {
                return Ok(WorkerExit::Normal);
            }
            let wait = if self.stopping {
                Duration::from_millis(100)
            } else {
                Duration::from_secs(1)
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            for event in &events {
                match event.token() {
                    WAKEUP => {
                        if self.on_signals() {
                            return Ok(WorkerExit::Normal);
                        }
                    }
                    POOL_DONE => self.collect_pool(),
                    Token(i) if i < FIRST_CONN => self.accept(i),
                    Token(key) => {
                        if (event.is_readable() || event.is_read_closed() || event.is_error())
                            && let Some(conn) = self.conns.get_mut(&key)
                        {
                            conn.readable();
                        }
                        if self.drive(key) {
                            return Ok(WorkerExit::Normal);
                        }
                    }
                }
            }
            if signals::GRACEFUL_STOP.load(Ordering::Relaxed) {
                self.begin_stop("received TERM");
            }
            if self.last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep();
            }
        }
    }

    /// Beats unless a threaded request has been running for longer than `--timeout`.
    fn beat(&self) {
        let stuck = !self.config.timeout.is_zero()
            && self
                .busy_since
                .values()
                .any(|t| t.elapsed() > self.config.timeout);
        if !stuck {
            self.id.heartbeats.beat(self.id.slot);
        }
    }

    fn drained(&self) -> bool {
        self.conns
            .values()
            .all(|c| !c.is_busy() && !c.mid_request() && c.out.is_empty())
    }

    /// Runs the Python-level handlers of pending signals. Returns true to exit now.
    fn on_signals(&mut self) -> bool {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.wakeup, &mut buf), Ok(n) if n > 0) {}
        let result = Python::attach(|py| {
            py.check_signals()
                .map_err(|e| (e.is_instance_of::<pyo3::exceptions::PySystemExit>(py), e))
        });
        if let Err((is_exit, err)) = result {
            if is_exit {
                log::info!("Worker exiting (pid: {})", std::process::id());
                return true;
            }
            log::error!(
                "signal handler failed:\n{}",
                crate::python::format_exception(err)
            );
        }
        if signals::REOPEN_LOGS.swap(false, Ordering::SeqCst) {
            if let Err(e) = crate::logging::reopen() {
                log::error!("cannot reopen log files: {e}");
            }
            self.wsgi.reopen_access_log();
        }
        false
    }

    fn begin_stop(&mut self, why: &str) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        log::debug!("worker {} stopping: {why}", std::process::id());
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l.source());
        }
        self.accepting = false;
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_idle())
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            self.close(key);
        }
    }

    fn accept(&mut self, index: usize) {
        while self.accepting && self.conns.len() < self.config.max_connections {
            let accepted = match &self.listeners[index] {
                Accepting::Tcp(l) => l.accept().map(|(s, remote)| {
                    let _ = s.set_nodelay(true);
                    let local = s.local_addr().ok();
                    let trusted = self.config.trusted.allows(Some(remote.ip()));
                    (
                        Stream::Tcp(s),
                        Peer {
                            remote: Some(remote),
                            local,
                            trusted_proxy: trusted,
                        },
                    )
                }),
                Accepting::Unix(l) => l.accept().map(|(s, _)| {
                    (
                        Stream::Unix(s),
                        Peer {
                            remote: None,
                            local: None,
                            trusted_proxy: true,
                        },
                    )
                }),
            };
            match accepted {
                Ok((stream, peer)) => {
                    let key = self.next_key;
                    self.next_key += 1;
                    let mut conn = Conn::new(stream, peer);
                    if self
                        .poll
                        .registry()
                        .register(
                            conn.stream.source(),
                            Token(key),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    self.conns.insert(key, conn);
                    if self.drive(key) {
                        // A quick-stop signal arrived while serving: handled on the next turn.
                        signals::GRACEFUL_STOP.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: back off until a connection closes.
                    log::error!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Moves one connection forward. Returns true when the worker must exit now.
    fn drive(&mut self, key: usize) -> bool {
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return false;
            };
            match conn.advance(&self.config.limits) {
                Next::Wait => return false,
                Next::Close => {
                    self.close(key);
                    return false;
                }
                Next::Dispatch(req) => {
                    let fd = conn.stream.fd();
                    let pending = std::mem::take(&mut conn.out);
                    if let Some(pool) = &self.pool {
                        self.busy_since.insert(key, Instant::now());
                        pool.submit(pool::Job {
                            key,
                            req,
                            fd,
                            pending,
                        });
                        return false;
                    }
                    let done = Python::attach(|py| self.wsgi.handle(py, req, fd, pending));
                    if self.complete(key, done) {
                        return true;
                    }
                }
            }
        }
    }

    /// Books a finished request. Returns true when the worker must exit now.
    fn complete(&mut self, key: usize, done: Completion) -> bool {
        self.served += 1;
        let retire = self.config.max_requests > 0 && self.served >= self.config.max_requests;
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.finish_request(done.keep_alive && !self.stopping && !retire, done.pending);
        }
        if done.exit {
            return true;
        }
        if retire && !self.stopping {
            log::info!("Autorestarting worker after current request.");
            self.begin_stop("max requests");
        }
        false
    }

    fn collect_pool(&mut self) {
        let finished = match &self.pool {
            Some(pool) => pool.finished(),
            None => Vec::new(),
        };
        for (key, done) in finished {
            self.busy_since.remove(&key);
            let exit = done.exit;
            self.complete(key, done);
            if exit {
                self.begin_stop("SystemExit in a request");
            }
            // Edge-triggered: bytes that arrived while the app ran produced no new event.
            self.drive(key);
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let _ = self.poll.registry().deregister(conn.stream.source());
        }
        self.busy_since.remove(&key);
    }

    /// Closes idle keep-alive connections and clients too slow to send a request.
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        let keepalive = self.config.keepalive;
        let slow = if self.config.timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            self.config.timeout
        };
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let quiet = c.last_active.elapsed();
                if c.is_busy() {
                    false
                } else if c.is_idle() {
                    quiet > keepalive.max(Duration::from_millis(100))
                } else {
                    quiet > slow
                }
            })
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.close(key);
        }
        // Listeners that were full may have waiting clients (edge-triggered: no new event).
        if self.accepting {
            for i in 0..self.listeners.len() {
                self.accept(i);
            }
        }
    }
}
