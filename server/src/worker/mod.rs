//! One worker process: the event loop, its connections, and request dispatch to the app.
//!
//! Each of the worker's `--threads` threads runs its own `mio` event loop over the shared
//! listening sockets. A loop accepts, reads and parses without the GIL, so idle keep-alive
//! connections and slow clients cost nothing, and runs each complete request inline: the
//! thread that parsed a request calls the app, with no hand-off between threads (a hand-off
//! per request cost more than a hello-world request itself). A thread busy in a long request
//! does not accept, so new clients go to the others; clients it accepted that have not sent a
//! request yet are handed to the others when it starts one; its own keep-alive clients wait
//! for it.
//! The main thread's loop also watches CPython's signal wakeup fd.
//!
//! Every loop beats the leader's heartbeat on each turn, unless some request has been running
//! for longer than `--timeout`: then the leader notices the silence and aborts the worker.

pub mod conn;
pub mod held_writes;
pub mod signals;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener as MioTcpListener, UnixListener as MioUnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pyo3::prelude::*;
use rustc_hash::FxHashMap;

use crate::heartbeat::Heartbeats;
use crate::http::Limits;
use crate::listeners::Listener;
use crate::wsgi::environ::{Peer, TrustedProxies};
use crate::wsgi::{Completion, Wsgi};
use conn::{Conn, Next, Stream};
use held_writes::{HeldWrites, Parked};

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
    /// The worker panicked (a bug of the server; the panic is in the error log). The code a
    /// panicking Rust program exits with.
    Panicked = 101,
}

impl WorkerExit {
    /// Maps an exit status back.
    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            0 => Some(Self::Normal),
            3 => Some(Self::BootError),
            4 => Some(Self::AppLoadError),
            101 => Some(Self::Panicked),
            _ => None,
        }
    }
}

/// The values the worker loop needs, resolved from the settings by the leader.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Threads, each with its own event loop, that run requests (the main thread is one).
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
    /// Its cell in the shared load table, through which connections spread over the workers
    /// (`None`: accept without looking at siblings).
    pub load: Option<crate::balance::Load>,
    /// Its slot's request counters, exported by the sidecar.
    pub requests: Option<crate::request_counts::WorkerCounts>,
}

const WAKEUP: Token = Token(usize::MAX - 1);
const STOP: Token = Token(usize::MAX - 2);
const FIRST_CONN: usize = 1 << 20;

/// How long a stopping worker keeps a quiet connection open for a request its client may be
/// sending right now.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// What the loops of one worker share.
struct Shared {
    config: WorkerConfig,
    id: Identity,
    wsgi: Wsgi,
    /// Requests served by all loops (for `--max-requests`).
    served: AtomicU64,
    /// Stop accepting and exit once in-flight requests are done.
    stopping: AtomicBool,
    /// Exit now (quick stop).
    exit_now: AtomicBool,
    /// A request thread panicked: the worker exits now, as [`WorkerExit::Panicked`].
    panicked: AtomicBool,
    /// When each loop's current request started (monotonic ms; 0 = none).
    busy_since: Vec<AtomicU64>,
    /// Wakes each loop when `stopping` or `exit_now` changes.
    wakers: Vec<mio::Waker>,
    /// `pre_request` / `post_request` from the config file; `None` (the common case) costs
    /// one check per request.
    hooks: Option<crate::hooks::RequestHooks>,
    /// With several threads: the queue in which they wait for the GIL (FIFO). CPython hands
    /// the GIL to whichever thread asks first after a release, so the thread that just
    /// finished a request usually takes it again while the others wait out the 5 ms switch
    /// interval; queueing here first makes the hand-over orderly. It is held only until the
    /// GIL is taken, so an app that releases the GIL (I/O, sleep) still lets others run.
    gil_queue: parking_lot::Mutex<()>,
    /// With several threads: connections a loop gave up before running a request, for
    /// whichever loop is free first (see [`EventLoop::hand_off_fresh`]).
    handoff: parking_lot::Mutex<VecDeque<Conn>>,
    /// Responses a loop left for the end of its batch while it runs another request.
    held: HeldWrites,
}

impl Shared {
    fn wake_all(&self) {
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Wakes the next loop after `me` that is not inside a request (none when all are busy:
    /// they look at the listeners again when their request ends).
    fn wake_idle_sibling(&self, me: usize) {
        let n = self.wakers.len();
        for step in 1..n {
            let i = (me + step) % n;
            if self.busy_since[i].load(Ordering::Relaxed) == 0 {
                let _ = self.wakers[i].wake();
                return;
            }
        }
    }

    /// Books that loop `index` entered a request at `since` (monotonic clock), or left it.
    fn set_busy(&self, index: usize, since: Option<Duration>) {
        let now = since.map_or(0, |t| t.as_millis() as u64);
        self.busy_since[index].store(now, Ordering::Relaxed);
        if self.busy_since.len() == 1
            && let Some(load) = &self.id.load
        {
            load.set_busy_since(now);
        }
    }

    /// True when a sibling worker should take the next queued connection instead of this one.
    fn leave_to_sibling(&self) -> bool {
        self.id
            .load
            .is_some_and(|l| l.sibling_has_fewer(crate::heartbeat::now_ms()))
    }

    fn begin_stop(&self, why: &str) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            log::debug!("worker {} stopping: {why}", std::process::id());
            self.wake_all();
        }
    }

    /// Beats unless some request has been running for longer than `--timeout`.
    fn beat(&self) {
        let timeout_ms = self.config.timeout.as_millis() as u64;
        if timeout_ms > 0 {
            let now = crate::heartbeat::now_ms();
            let stuck = self.busy_since.iter().any(|b| {
                let t = b.load(Ordering::Relaxed);
                t != 0 && now.saturating_sub(t) > timeout_ms
            });
            if stuck {
                return;
            }
        }
        self.id.heartbeats.beat(self.id.slot);
    }
}

/// Runs the worker's event loops until it stops. The GIL is held on entry and on return.
///
/// # Errors
/// A poller cannot be created or a listener cannot be registered.
pub fn serve(
    py: Python<'_>,
    id: Identity,
    config: &WorkerConfig,
    listeners: &[Listener],
    wsgi: Wsgi,
    wakeup: OwnedFd,
    hooks: Option<crate::hooks::RequestHooks>,
) -> std::io::Result<WorkerExit> {
    let threads = config.threads.max(1);
    let mut polls = Vec::with_capacity(threads);
    let mut wakers = Vec::with_capacity(threads);
    for _ in 0..threads {
        let poll = Poll::new()?;
        wakers.push(mio::Waker::new(poll.registry(), STOP)?);
        polls.push(poll);
    }
    let shared = Arc::new(Shared {
        config: config.clone(),
        id,
        wsgi,
        served: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        exit_now: AtomicBool::new(false),
        panicked: AtomicBool::new(false),
        busy_since: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        wakers,
        hooks,
        gil_queue: parking_lot::Mutex::new(()),
        handoff: parking_lot::Mutex::new(VecDeque::new()),
        held: HeldWrites::start(threads)?,
    });
    let mut loops = Vec::with_capacity(threads);
    for (index, poll) in polls.into_iter().enumerate() {
        let wakeup = (index == 0).then(|| wakeup.try_clone()).transpose()?;
        loops.push(EventLoop::new(
            index,
            poll,
            Arc::clone(&shared),
            listeners,
            wakeup,
        )?);
    }
    drop(wakeup);
    if let Some(load) = &shared.id.load {
        load.start_accepting();
    }
    log::debug!(
        "Worker {} accepting in slot {}",
        std::process::id(),
        shared.id.slot
    );
    py.detach(|| {
        let mut loops = loops.into_iter();
        let mut main = loops.next().expect("at least one loop");
        let others: Vec<_> = loops
            .enumerate()
            .filter_map(|(i, mut l)| {
                let name = format!("loop-{}", i + 1);
                std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || {
                        let ran = crate::panics::contain(|| {
                            crate::failpoint::check("thread-start", name.as_bytes());
                            // The thread keeps one Python thread state for its whole life:
                            // attached once here, each request's attach below reuses it.
                            // Without it every attach makes a new one and drops it when the
                            // GIL is let go, and the app's threading.local data (a
                            // per-thread database connection) would vanish between requests.
                            Python::attach(|py| py.detach(|| l.run()))
                        });
                        if ran.is_err() {
                            // Its connections are gone and the worker's state is suspect.
                            l.shared.panicked.store(true, Ordering::SeqCst);
                            l.shared.exit_now.store(true, Ordering::SeqCst);
                            l.shared.wake_all();
                        }
                    })
                    .map_err(|e| log::error!("cannot start request thread {}: {e}", i + 1))
                    .ok()
            })
            .collect();
        let exit = main.run();
        if shared.panicked.load(Ordering::SeqCst) {
            return Ok(WorkerExit::Panicked);
        }
        if shared.exit_now.load(Ordering::SeqCst) {
            // Quick stop: threads stuck in requests are not waited for.
            return exit;
        }
        shared.begin_stop("main loop ended");
        for t in others {
            let _ = t.join();
        }
        exit
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

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        let raw = match self {
            Accepting::Tcp(l) => l.as_raw_fd(),
            Accepting::Unix(l) => l.as_raw_fd(),
        };
        // SAFETY: the listener owns the fd and outlives the borrow.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) }
    }
}

/// One thread's loop: its own poller, connections and copies of the listeners.
struct EventLoop {
    index: usize,
    shared: Arc<Shared>,
    poll: Poll,
    listeners: Vec<Accepting>,
    accepting: bool,
    /// Since when queued connections are left to a sibling with fewer (see [`crate::balance`]).
    deferring_since: Option<Instant>,
    /// This loop took one connection and left the rest queued (several threads): it looks
    /// again on its next turn, since the edge that announced them is spent.
    maybe_queued: bool,
    /// The GIL is held for a whole batch of events (see [`Self::handle_events`]).
    gil_held: bool,
    /// Inside a batch of events: responses are written at its end (see
    /// [`Self::flush_deferred`]).
    batching: bool,
    /// Connections with response bytes left for the end of the batch, and since when the
    /// oldest waits (monotonic clock).
    deferred: Vec<usize>,
    deferred_since: Option<Duration>,
    /// Reused buffer for the responses taken back from [`HeldWrites`].
    taken_back: Vec<Parked>,
    /// CPython's signal wakeup fd (main loop only).
    wakeup: Option<OwnedFd>,
    /// By poll token. Looked up on every event: a cheap hash (keys are our own counter).
    conns: FxHashMap<usize, Conn>,
    next_key: usize,
    max_connections: usize,
    last_sweep: Instant,
}

impl EventLoop {
    fn new(
        index: usize,
        poll: Poll,
        shared: Arc<Shared>,
        listeners: &[Listener],
        wakeup: Option<OwnedFd>,
    ) -> std::io::Result<Self> {
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
        if let Some(fd) = &wakeup {
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), WAKEUP, Interest::READABLE)?;
        }
        let max_connections = (shared.config.max_connections / shared.config.threads.max(1)).max(1);
        Ok(Self {
            index,
            shared,
            poll,
            listeners: accepting,
            accepting: true,
            deferring_since: None,
            maybe_queued: false,
            gil_held: false,
            batching: false,
            deferred: Vec::new(),
            deferred_since: None,
            taken_back: Vec::new(),
            wakeup,
            conns: FxHashMap::default(),
            next_key: FIRST_CONN,
            max_connections,
            last_sweep: Instant::now(),
        })
    }

    fn run(&mut self) -> std::io::Result<WorkerExit> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.shared.beat();
            if self.shared.exit_now.load(Ordering::Relaxed) {
                return Ok(WorkerExit::Normal);
            }
            if self.shared.config.threads > 1 {
                self.adopt();
            }
            if std::mem::take(&mut self.maybe_queued) {
                for i in 0..self.listeners.len() {
                    self.accept(i);
                }
            }
            if self.shared.stopping.load(Ordering::Relaxed) {
                self.stop_accepting();
                if self.drained() && self.shared.handoff.lock().is_empty() {
                    return Ok(WorkerExit::Normal);
                }
            }
            let wait = if self.maybe_queued {
                Duration::ZERO
            } else if self.deferring_since.is_some() {
                // Look again soon: the sibling may not take what was left to it.
                Duration::from_millis(1)
            } else if self.accepting {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(100)
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if let Some(exit) = self.handle_events(&events) {
                return Ok(exit);
            }
            if signals::GRACEFUL_STOP.load(Ordering::Relaxed) {
                self.shared.begin_stop("received TERM");
            }
            if self.deferring_since.is_some() {
                self.retry_deferred();
            }
            if self.last_sweep.elapsed() >= Duration::from_secs(1) {
                self.sweep();
            }
        }
    }

    /// Handles one poll's events. With several threads, a loop that has more than one
    /// connection to serve takes the GIL once for all of them: handing it over between threads
    /// for every request cost more than a small request itself.
    fn handle_events(&mut self, events: &Events) -> Option<WorkerExit> {
        let conns = events.iter().filter(|e| e.token().0 >= FIRST_CONN).count();
        if self.shared.config.threads > 1 && conns > 1 {
            let shared = Arc::clone(&self.shared);
            let turn = shared.gil_queue.lock();
            return Python::attach(|_py| {
                drop(turn);
                self.gil_held = true;
                let exit = self.handle_each(events);
                self.gil_held = false;
                exit
            });
        }
        self.handle_each(events)
    }

    /// Handles the events of one poll, writing the responses they produced together at the end.
    fn handle_each(&mut self, events: &Events) -> Option<WorkerExit> {
        self.batching = true;
        let exit = self.handle_batch(events);
        self.batching = false;
        self.flush_deferred();
        exit
    }

    fn handle_batch(&mut self, events: &Events) -> Option<WorkerExit> {
        for event in events {
            match event.token() {
                WAKEUP => {
                    // A handler can run for seconds (the profiler's snapshot): what this
                    // batch answered goes out first.
                    self.flush_deferred();
                    if self.on_signals_published() {
                        self.shared.exit_now.store(true, Ordering::SeqCst);
                        self.shared.wake_all();
                        return Some(WorkerExit::Normal);
                    }
                }
                // Woken for a stop, or by a sibling that left clients to accept.
                STOP => {
                    for i in 0..self.listeners.len() {
                        self.accept(i);
                    }
                }
                Token(i) if i < FIRST_CONN => self.accept(i),
                Token(key) => {
                    if (event.is_readable() || event.is_read_closed() || event.is_error())
                        && let Some(conn) = self.conns.get_mut(&key)
                    {
                        conn.readable(event.is_read_closed() || event.is_error());
                    }
                    self.drive(key);
                }
            }
            if self.shared.exit_now.load(Ordering::Relaxed) {
                return Some(WorkerExit::Normal);
            }
        }
        None
    }

    /// Nothing left to finish. During a graceful stop a connection is not closed under a client
    /// that is sending on it: one accepted just before the stop gets its first request
    /// answered, and a busy keep-alive connection gets its next request answered (with
    /// `Connection: close`, so the client reconnects). A connection quiet for [`STOP_GRACE`]
    /// (or `--keep-alive`, if shorter) is closed, so a stop never waits on idle clients. So a
    /// reload or a recycle fails no request, keep-alive or not.
    fn drained(&self) -> bool {
        let keepalive = self.shared.config.keepalive;
        self.conns.values().all(|c| {
            let grace = if c.served == 0 {
                STOP_GRACE
            } else {
                keepalive.min(STOP_GRACE)
            };
            !c.mid_request()
                && c.out.is_empty()
                && c.last_active.elapsed() >= grace
                && !c.has_unread()
        })
    }

    /// [`Self::on_signals`], shown to siblings as time in a request: a handler (the profiler
    /// taking a snapshot) can keep the only loop away from its listeners for seconds.
    fn on_signals_published(&mut self) -> bool {
        let single = self.shared.busy_since.len() == 1;
        let load = self.shared.id.load.filter(|_| single);
        if let Some(l) = load {
            l.set_busy_since(crate::heartbeat::now_ms());
        }
        let exit = self.on_signals();
        if let Some(l) = load {
            l.set_busy_since(0);
        }
        exit
    }

    /// Runs the Python-level handlers of pending signals. Returns true to exit now.
    fn on_signals(&mut self) -> bool {
        if let Some(fd) = &self.wakeup {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(fd, &mut buf), Ok(n) if n > 0) {}
        }
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
            self.shared.wsgi.reopen_access_log();
            Python::attach(signals::reopen_fault_log);
        }
        false
    }

    /// Deregisters the listeners (once). Open connections are left to `drained`.
    fn stop_accepting(&mut self) {
        if !self.accepting {
            return;
        }
        self.accepting = false;
        self.deferring_since = None;
        if let Some(load) = &self.shared.id.load {
            load.stop_accepting();
        }
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l.source());
        }
    }

    /// After leaving queued connections to a sibling: done when the queues are empty, else
    /// accept again (the sibling may have taken its share, or the wait may be over).
    fn retry_deferred(&mut self) {
        let mut fds: Vec<PollFd<'_>> = self
            .listeners
            .iter()
            .map(|l| PollFd::new(l.fd(), PollFlags::POLLIN))
            .collect();
        let queued: Vec<usize> = match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => fds
                .iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .map(|(i, _)| i)
                .collect(),
            _ => Vec::new(),
        };
        drop(fds);
        if queued.is_empty() {
            self.deferring_since = None;
        }
        for i in queued {
            self.accept(i);
        }
    }

    /// Whether to leave the next queued connection to a sibling worker. A connection is left
    /// for [`crate::balance::DEFER_AT_MOST`] at most: then this worker takes it and waits
    /// again before the next, so a slow sibling costs each connection a few milliseconds, not
    /// its share of the burst.
    fn defer_to_sibling(&mut self) -> bool {
        if !self.shared.leave_to_sibling() {
            return false;
        }
        let now = Instant::now();
        let since = *self.deferring_since.get_or_insert(now);
        if now.duration_since(since) < crate::balance::DEFER_AT_MOST {
            return true;
        }
        self.deferring_since = Some(now);
        false
    }

    /// Accepts waiting clients. With several threads each takes one client at a time and hands
    /// the listener to an idle sibling, so clients spread over the threads instead of queueing
    /// behind the one thread that woke first.
    fn accept(&mut self, index: usize) {
        let batch = if self.shared.config.threads > 1 {
            1
        } else {
            usize::MAX
        };
        let mut taken = 0;
        // A request run by this loop may begin the stop (the last of --max-requests): the
        // clients still queued are then the next worker's, not taken in this same turn.
        while self.accepting
            && !self.shared.stopping.load(Ordering::Relaxed)
            && taken < batch
            && self.conns.len() < self.max_connections
        {
            if self.defer_to_sibling() {
                return;
            }
            let accepted = match &self.listeners[index] {
                Accepting::Tcp(l) => l.accept().map(|(s, remote)| {
                    let _ = s.set_nodelay(true);
                    let local = s.local_addr().ok();
                    let trusted = self.shared.config.trusted.allows(Some(remote.ip()));
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
                    let Some(key) = self.watch(Conn::new(stream, peer)) else {
                        continue;
                    };
                    if let Some(load) = &self.shared.id.load {
                        load.opened();
                    }
                    taken += 1;
                    if taken == batch {
                        // More may be waiting and the edge is spent: let an idle sibling look,
                        // and look again after this request (all siblings may be busy).
                        self.shared.wake_idle_sibling(self.index);
                        self.maybe_queued = true;
                    }
                    self.drive(key);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.deferring_since = None;
                    self.maybe_queued = false;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: back off until a connection closes.
                    log::error!("accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Moves one connection forward, running the requests it completes.
    fn drive(&mut self, key: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            match conn.advance(&self.shared.config.limits, self.batching) {
                Next::Wait => {
                    if self.batching && !conn.out.is_empty() && !conn.write_deferred {
                        conn.write_deferred = true;
                        self.deferred.push(key);
                        self.deferred_since
                            .get_or_insert_with(crate::heartbeat::monotonic);
                    }
                    return;
                }
                Next::Close => {
                    self.close(key);
                    return;
                }
                Next::Dispatch(mut req) => {
                    crate::failpoint::check("request", &req.head.path);
                    // One clock read serves the write deferral, the heartbeat, the load table
                    // and the duration.
                    let started = crate::heartbeat::monotonic();
                    if self
                        .deferred_since
                        .is_some_and(|t| started.saturating_sub(t) >= held_writes::AT_MOST)
                    {
                        self.flush_deferred();
                    }
                    let parked = self.park_deferred(key);
                    let Some(conn) = self.conns.get_mut(&key) else {
                        return;
                    };
                    // The last response before the worker goes says `Connection: close`, so
                    // the client does not send another request on a connection about to close.
                    let max = self.shared.config.max_requests;
                    if self.shared.stopping.load(Ordering::Relaxed)
                        || (max > 0 && self.shared.served.load(Ordering::Relaxed) + 1 >= max)
                    {
                        req.head.keep_alive = false;
                    }
                    let fd = conn.stream.fd();
                    let pending = std::mem::take(&mut conn.out);
                    if self.shared.config.threads > 1 {
                        self.hand_off_fresh(key);
                    }
                    self.shared.set_busy(self.index, Some(started));
                    let counts = self.shared.id.requests;
                    if let Some(c) = counts {
                        c.begin();
                    }
                    let turn = (self.shared.config.threads > 1 && !self.gil_held)
                        .then(|| self.shared.gil_queue.lock());
                    let done = Python::attach(|py| {
                        drop(turn);
                        match &self.shared.hooks {
                            None => self.shared.wsgi.handle(py, req, fd, pending),
                            Some(hooks) => {
                                hooked_request(py, hooks, &self.shared.wsgi, req, fd, pending)
                            }
                        }
                    });
                    self.shared.set_busy(self.index, None);
                    if let Some(parked) = parked {
                        self.take_back_parked(parked);
                    }
                    if let Some(c) = counts {
                        let took = crate::heartbeat::monotonic().saturating_sub(started);
                        c.end(done.status, took, done.bytes_sent, done.raised);
                    }
                    if !self.complete(key, done) {
                        // Exiting now: what the request left unwritten is tried once.
                        if let Some(conn) = self.conns.get_mut(&key) {
                            let _ = conn.write_out();
                        }
                        return;
                    }
                }
            }
        }
    }

    /// Writes the responses left for the end of the batch. Writing them together, after the
    /// batch's requests ran, wakes each client once per batch instead of once per response
    /// while the worker is busy (a cross-CPU wake-up of the client per `write` was the largest
    /// kernel cost of a busy worker). Only writes: requests that arrived meanwhile wait for
    /// their own events. Bytes the socket does not take wait for its writable event as usual.
    fn flush_deferred(&mut self) {
        self.deferred_since = None;
        let mut keys = std::mem::take(&mut self.deferred);
        for key in keys.drain(..) {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.write_deferred = false;
            if matches!(conn.write_out(), Next::Close) {
                self.close(key);
            }
        }
        // Emptied, the list keeps its buffer for the next batch.
        self.deferred = keys;
    }

    /// Before running `running`'s request: parks the other connections' unwritten responses
    /// with the timer thread, which writes them if the request outlasts their wait (see
    /// [`held_writes`]). Returns a guard while something is parked.
    fn park_deferred(&mut self, running: usize) -> Option<held_writes::Unpark> {
        let since = self.deferred_since?;
        let conns = &mut self.conns;
        let mut parked = self
            .deferred
            .iter()
            .filter(|&&k| k != running)
            .filter_map(|&k| {
                let conn = conns.get_mut(&k)?;
                (!conn.out.is_empty())
                    .then(|| Parked::new(k, conn.stream.fd(), std::mem::take(&mut conn.out)))
            })
            .peekable();
        parked.peek()?;
        Some(self.shared.held.park(self.index, since, parked))
    }

    /// After a request: the parked bytes the timer did not write go back to their connections.
    fn take_back_parked(&mut self, parked: held_writes::Unpark) {
        parked.take_back(&mut self.taken_back);
        for p in self.taken_back.drain(..) {
            if let Some(conn) = self.conns.get_mut(&p.key) {
                let mut bytes = p.bytes;
                bytes.append(&mut conn.out);
                conn.out = bytes;
            }
        }
    }

    /// Books a finished request. Returns false when the worker must exit now.
    fn complete(&mut self, key: usize, done: Completion) -> bool {
        let served = self.shared.served.fetch_add(1, Ordering::Relaxed) + 1;
        let max = self.shared.config.max_requests;
        let retire = max > 0 && served >= max;
        let stopping = self.shared.stopping.load(Ordering::Relaxed);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.finish_request(done.keep_alive && !stopping && !retire, done.pending);
        }
        if done.exit {
            self.shared.exit_now.store(true, Ordering::SeqCst);
            self.shared.wake_all();
            return false;
        }
        if retire && served == max {
            log::info!("Autorestarting worker after current request.");
            if let Some(c) = &self.shared.id.requests {
                c.recycled(forkscope_protocol::recycle::RecycleReason::MaxRequests);
            }
            self.shared.begin_stop("max requests");
        }
        true
    }

    /// Before this loop runs a request (threaded mode), gives its connections that have not
    /// sent a request yet to the other loops: a client that connected while this loop was free
    /// would otherwise wait for this request to end although another thread is free by then.
    /// (Its kept-alive connections stay: their next request waits for it.)
    fn hand_off_fresh(&mut self, running: usize) {
        if self.shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let fresh: Vec<usize> = self
            .conns
            .iter()
            .filter(|(k, c)| **k != running && c.served == 0 && c.is_idle())
            .map(|(k, _)| *k)
            .collect();
        if fresh.is_empty() {
            return;
        }
        let mut queue = self.shared.handoff.lock();
        for key in fresh {
            if let Some(mut conn) = self.conns.remove(&key) {
                let _ = self.poll.registry().deregister(conn.stream.source());
                queue.push_back(conn);
            }
        }
        drop(queue);
        self.shared.wake_idle_sibling(self.index);
    }

    /// Takes the connections that siblings handed off, one at a time as `accept` does: each
    /// may run a request at once, and an idle sibling is woken for the rest.
    fn adopt(&mut self) {
        loop {
            let (mut conn, more) = {
                let mut queue = self.shared.handoff.lock();
                let Some(conn) = queue.pop_front() else {
                    return;
                };
                (conn, !queue.is_empty())
            };
            if more {
                self.shared.wake_idle_sibling(self.index);
            }
            // Its bytes may have arrived before this poller watched it.
            conn.readable(false);
            if let Some(key) = self.watch(conn) {
                self.drive(key);
            }
        }
    }

    /// Registers a connection with this loop's poller under a new key and keeps it; `None`
    /// (and the connection closed) when it cannot be registered.
    fn watch(&mut self, mut conn: Conn) -> Option<usize> {
        let key = self.next_key;
        self.next_key += 1;
        self.poll
            .registry()
            .register(
                conn.stream.source(),
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            )
            .ok()?;
        self.conns.insert(key, conn);
        Some(key)
    }

    fn close(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let _ = self.poll.registry().deregister(conn.stream.source());
            if let Some(load) = &self.shared.id.load {
                load.closed();
            }
        }
    }

    /// Closes idle keep-alive connections and clients too slow to send a request.
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        let keepalive = self.shared.config.keepalive;
        let slow = if self.shared.config.timeout.is_zero() {
            Duration::from_secs(30)
        } else {
            self.shared.config.timeout
        };
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                let quiet = c.last_active.elapsed();
                let expired = if c.is_idle() {
                    quiet > keepalive.max(Duration::from_millis(100))
                } else {
                    quiet > slow
                };
                // Bytes waiting in the socket arrived while this loop ran a request: the
                // client was not quiet, the loop was busy.
                expired && !c.has_unread()
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

/// The 500 gunicorn sends when `pre_request` raises (the app is not called).
const HOOK_ERROR: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\n\
Connection: close\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\n\
Internal Server Error";

/// One request with the config file's `pre_request(worker, req)` before and
/// `post_request(worker, req, environ, resp)` after, as gunicorn calls them. A raising
/// `pre_request` answers 500 without calling the app; a raising `post_request` is only logged.
fn hooked_request(
    py: Python<'_>,
    hooks: &crate::hooks::RequestHooks,
    wsgi: &Wsgi,
    req: crate::wsgi::Request,
    fd: std::os::fd::RawFd,
    mut pending: Vec<u8>,
) -> Completion {
    let head = req.head.clone();
    let peer = req.peer.clone();
    let request = match Bound::new(py, crate::hooks::request_object(&head)) {
        Ok(r) => r,
        Err(e) => {
            log::error!("{}", crate::python::format_exception(e));
            return wsgi.handle(py, req, fd, pending);
        }
    };
    if let Some(pre) = &hooks.pre_request
        && crate::hooks::call_hook(py, pre, crate::hooks::Hook::PreRequest, || {
            Ok(vec![
                crate::hooks::arg(py, &hooks.worker),
                request.clone().into_any(),
            ])
        })
        .is_err()
    {
        pending.extend_from_slice(HOOK_ERROR);
        return Completion {
            keep_alive: false,
            pending,
            status: 500,
            raised: true,
            ..Completion::default()
        };
    }
    let done = wsgi.handle(py, req, fd, pending);
    if let Some(post) = &hooks.post_request {
        let _ = crate::hooks::call_hook(py, post, crate::hooks::Hook::PostRequest, || {
            let environ = crate::wsgi::environ::base_environ(py, false, false)?;
            let start = crate::wsgi::environ::Start::Base;
            crate::wsgi::environ::fill(py, &environ, start, &head, &peer, "")?;
            let response = Bound::new(
                py,
                crate::hooks::response_object(py, done.status, &done.headers, done.bytes_sent),
            )?;
            Ok(vec![
                crate::hooks::arg(py, &hooks.worker),
                request.clone().into_any(),
                environ.into_any(),
                response.into_any(),
            ])
        });
    }
    done
}
