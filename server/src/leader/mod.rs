//! The leader: binds, optionally preloads, forks workers into slots and keeps them alive.
//!
//! It is a single-threaded loop woken by a self-pipe ([`signals`]): each turn handles the
//! signals that arrived, reaps exited children, aborts workers whose heartbeat went silent for
//! longer than `--timeout`, then spawns or retires workers until every slot below the target
//! count is served. No thread is ever started here: `fork()` copies only the calling thread.
//!
//! The lifecycle (docs/SIGNALS.md): TERM graceful and INT/QUIT quick stops, HUP reload
//! ([`reload`]), USR2 upgrade in place ([`upgrade`]), WINCH, TTIN/TTOU, USR1 log reopening,
//! timeouts, and the config file's hooks ([`crate::hooks`]) at gunicorn's moments.

pub mod memory_watch;
pub mod ready;
pub mod reload;
pub mod signals;
pub mod slots;
pub mod spawn;
pub mod start;
pub mod upgrade;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use pyo3::prelude::*;

use crate::heartbeat::{Heartbeats, MAX_SLOTS};
use crate::hooks::{Hook, Hooks, ServerObject, arg};
use crate::listeners::Listener;
use crate::python::AppSpec;
use crate::settings::Settings;
use crate::worker::WorkerExit;
use forkscope_protocol::recycle::RecycleReason;
use forkscope_protocol::{Role, RuntimeDir};
use signals::{LeaderSignal, SignalPipe};
use slots::{Slots, WorkerProc};
pub use start::remember_start;
use start::start;
use upgrade::Upgrade;

/// Consecutive boot failures of one slot after which the leader gives up.
const MAX_BOOT_FAILURES: u32 = 5;

/// How long an aborted (timed-out) worker gets to dump its stacks before KILL.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// The exit status when a leader-side hook raised after start-up (gunicorn's "Unhandled
/// exception in main loop" ends the arbiter the same way).
const HOOK_FAILED: u8 = 1;

/// A stop in progress.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    graceful: bool,
    deadline: Instant,
    killed: bool,
}

/// Everything the leader owns while it runs.
pub struct Leader {
    settings: Settings,
    hooks: Hooks,
    spec: AppSpec,
    app_name: String,
    listeners: Vec<Listener>,
    preloaded: Option<Py<PyAny>>,
    heartbeats: Heartbeats,
    /// Each worker's open connections, shared so that they spread (see [`crate::balance`]).
    load_cells: crate::balance::Cells,
    /// Per-slot request counters the sidecar exports (see [`crate::request_counts`]).
    request_counts: Option<crate::request_counts::RequestCounts>,
    /// `--max-worker-memory` (see [`memory_watch`]).
    memory_watch: Option<memory_watch::MemoryWatch>,
    /// Which worker of each slot serves (see [`ready`]).
    ready: ready::Ready,
    slots: Slots,
    target: u32,
    runtime: Option<RuntimeDir>,
    signals: SignalPipe,
    stopping: Option<Stopping>,
    pidfile: Option<PathBuf>,
    /// The `server` argument of hooks.
    server: Py<ServerObject>,
    /// USR2 state: the new leader we started, or the old leader that started us.
    upgrade: Upgrade,
    /// A leader-side hook raised: stop quickly with this status.
    halt: Option<ExitCode>,
    _folder: Option<crate::runtime_dir::FolderGuard>,
    /// Reaped workers' folders that still hold results.
    leftovers: crate::runtime_dir::Leftovers,
}

impl Leader {
    /// Binds the sockets, prepares the runtime directory, and imports the app under
    /// `--preload`. Python must be initialized. Calls `nworkers_changed` (with `None` as the
    /// old value) and `on_starting`, as gunicorn does before it binds.
    ///
    /// # Errors
    /// A socket cannot be bound, the app fails to import under `--preload`, or `on_starting`
    /// raised.
    pub fn new(settings: Settings, hooks: Hooks) -> anyhow::Result<Self> {
        let app_text = settings
            .wsgi_app
            .clone()
            .context("no application given: forkscope-server [OPTIONS] MODULE:VARIABLE")?;
        let spec = AppSpec::parse(&app_text)?;
        let app_name = settings
            .proc_name
            .clone()
            .unwrap_or_else(|| app_text.clone());
        let target = settings.workers.clamp(1, MAX_SLOTS as u32);
        let upgrade = Upgrade::from_env();

        log::info!("Starting forkscope-server {}", env!("CARGO_PKG_VERSION"));
        let server = Python::attach(|py| -> anyhow::Result<Py<ServerObject>> {
            let server = crate::hooks::server_object(py, &settings, &app_name, target)
                .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
            crate::hooks::call(py, &hooks, Hook::NworkersChanged, || {
                Ok(vec![
                    arg(py, &server),
                    target.into_pyobject(py)?.into_any(),
                    py.None().into_bound(py),
                ])
            })?;
            crate::hooks::call(py, &hooks, Hook::OnStarting, || Ok(vec![arg(py, &server)]))?;
            Ok(server)
        })?;

        let listeners = crate::listeners::bind_all(&settings.bind, settings.backlog)?;
        for l in &listeners {
            // Sockets inherited from an old leader come without close-on-exec.
            upgrade::set_cloexec(l.fd());
            log::info!("Listening at: {l} ({})", std::process::id());
        }
        // gunicorn names its worker class here; forkscope serves `sync` and `gthread` alike with
        // its own worker, which differs from both (it keeps idle connections without blocking).
        let threads = settings.threads.max(1);
        log::info!(
            "Using worker: forkscope event loop, {threads} request thread{} per worker \
             (non-blocking keep-alive; -k {})",
            if threads == 1 { "" } else { "s" },
            settings.worker_class
        );

        let pidfile = settings.pidfile.clone();
        if let Some(path) = &pidfile {
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write pid file {}", path.display()))?;
        }

        let runtime = RuntimeDir::new(&settings.runtime_dir);
        let folder = match crate::runtime_dir::announce(
            &runtime,
            Role::Leader,
            None,
            std::process::id(),
            &app_name,
        ) {
            Ok(dir) => Some(crate::runtime_dir::FolderGuard::new(dir)),
            Err(e) => {
                log::warn!(
                    "runtime directory {} is not writable ({e}); profiling results are disabled",
                    settings.runtime_dir.display()
                );
                None
            }
        };
        let runtime = folder.as_ref().map(|_| runtime);
        let request_counts = runtime.as_ref().and_then(|rt| {
            let path = rt.requests(std::process::id());
            crate::request_counts::RequestCounts::create(&path)
                .map_err(|e| {
                    log::warn!(
                        "cannot create {} ({e}); request metrics are disabled",
                        path.display()
                    );
                })
                .ok()
        });

        crate::proctitle::set(&crate::proctitle::leader_title(&app_name));

        let preloaded = Python::attach(|py| -> anyhow::Result<Option<Py<PyAny>>> {
            crate::profiler::register_module(py)
                .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
            if !settings.preload_app {
                return Ok(None);
            }
            if settings.gc_freeze {
                crate::python::disable_gc(py)
                    .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
            }
            let app = crate::python::import_app(py, &spec)?;
            let _ = crate::worker::signals::warn_about_app_handlers(py);
            if settings.gc_freeze {
                crate::python::freeze(py)
                    .map_err(|e| anyhow::anyhow!(crate::python::format_exception(e)))?;
            }
            Ok(Some(app))
        })?;

        Ok(Self {
            hooks,
            spec,
            app_name,
            listeners,
            preloaded,
            heartbeats: Heartbeats::new().context("cannot map the heartbeat table")?,
            ready: ready::Ready::new().context("cannot map the readiness table")?,
            load_cells: crate::balance::Cells::new().context("cannot map the load table")?,
            request_counts,
            memory_watch: memory_watch::MemoryWatch::from_settings(&settings)?,
            slots: Slots::default(),
            target,
            runtime,
            signals: SignalPipe::install().context("cannot install signal handlers")?,
            stopping: None,
            pidfile,
            server,
            upgrade,
            halt: None,
            _folder: folder,
            leftovers: Default::default(),
            settings,
        })
    }

    /// Runs until a stop completes; returns the process exit code. Calls `when_ready` first
    /// and `on_exit` last.
    pub fn run(mut self) -> ExitCode {
        let ready = Python::attach(|py| {
            crate::hooks::call(py, &self.hooks, Hook::WhenReady, || {
                Ok(vec![arg(py, &self.server)])
            })
        });
        let code = if ready.is_err() {
            ExitCode::from(HOOK_FAILED)
        } else {
            self.main_loop()
        };
        Python::attach(|py| {
            let _ = crate::hooks::call(py, &self.hooks, Hook::OnExit, || {
                Ok(vec![arg(py, &self.server)])
            });
        });
        self.cleanup();
        code
    }

    fn main_loop(&mut self) -> ExitCode {
        loop {
            for sig in self.signals.wait(Duration::from_secs(1)) {
                self.on_signal(sig);
            }
            if let Some(code) = self.reap() {
                self.begin_stop(false);
                self.finish_stop();
                return code;
            }
            if let Some(rt) = &self.runtime {
                self.leftovers.sweep(rt, Instant::now());
            }
            self.check_promoted();
            if let Some(stop) = self.stopping {
                if self.slots.is_empty() {
                    log::info!("Shutting down: Main");
                    return self.halt.unwrap_or(ExitCode::SUCCESS);
                }
                if !stop.killed && Instant::now() >= stop.deadline {
                    for pid in self.slots.all_pids() {
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    if let Some(s) = self.stopping.as_mut() {
                        s.killed = true;
                    }
                }
                continue;
            }
            if self.halt.is_some() {
                log::error!("Unhandled exception in a server hook: stopping");
                self.begin_stop(false);
                continue;
            }
            self.murder();
            self.watch_memory();
            self.manage();
        }
    }

    fn on_signal(&mut self, sig: LeaderSignal) {
        match sig {
            LeaderSignal::Child => {}
            LeaderSignal::Term => {
                log::info!("Handling signal: term");
                self.begin_stop(true);
            }
            LeaderSignal::Quit => {
                log::info!("Handling signal: quit");
                self.begin_stop(false);
            }
            LeaderSignal::Ttin => {
                log::info!("Handling signal: ttin");
                self.resize((self.target + 1).min(MAX_SLOTS as u32));
            }
            LeaderSignal::Ttou => {
                log::info!("Handling signal: ttou");
                // Never below one; after WINCH (zero) it stays at zero.
                self.resize(self.target.saturating_sub(1).max(self.target.min(1)));
            }
            LeaderSignal::Usr1 => {
                log::info!("Handling signal: usr1");
                if let Err(e) = crate::logging::reopen() {
                    log::error!("cannot reopen log files: {e}");
                }
                self.signal_workers(Signal::SIGUSR1);
            }
            LeaderSignal::Hup => {
                log::info!("Handling signal: hup");
                self.reload();
            }
            LeaderSignal::Usr2 => {
                log::info!("Handling signal: usr2");
                self.reexec();
            }
            LeaderSignal::Winch => {
                log::info!("Handling signal: winch");
                if self.stopping.is_none() {
                    log::info!(
                        "graceful stop of the workers; the leader stays (HUP or TTIN starts them again)"
                    );
                    self.resize(0);
                }
            }
        }
    }

    /// Changes the number of workers and tells `nworkers_changed` (TTIN/TTOU that change
    /// nothing, at the bounds, call nothing, as in gunicorn).
    fn resize(&mut self, target: u32) {
        if target != self.target {
            self.set_target(target);
        }
    }

    /// Sets the number of workers and tells `nworkers_changed`.
    fn set_target(&mut self, target: u32) {
        let old = self.target;
        self.target = target;
        let failed = Python::attach(|py| {
            self.server.borrow_mut(py).num_workers = target;
            crate::hooks::call(py, &self.hooks, Hook::NworkersChanged, || {
                Ok(vec![
                    arg(py, &self.server),
                    target.into_pyobject(py)?.into_any(),
                    old.into_pyobject(py)?.into_any(),
                ])
            })
            .is_err()
        });
        if failed {
            self.halt = Some(ExitCode::from(HOOK_FAILED));
        }
    }

    fn signal_workers(&self, sig: Signal) {
        for pid in self.slots.all_pids() {
            let _ = kill(pid, sig);
        }
    }

    fn begin_stop(&mut self, graceful: bool) {
        // A second INT/QUIT during a graceful stop makes it quick (gunicorn).
        if let Some(s) = &self.stopping
            && (!s.graceful || graceful)
        {
            return;
        }
        let sig = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGQUIT
        };
        self.signal_workers(sig);
        self.stopping = Some(Stopping {
            graceful,
            deadline: Instant::now() + Duration::from_secs(self.settings.graceful_timeout),
            killed: false,
        });
    }

    /// Waits for every worker after an unrecoverable error, bounded by the graceful timeout.
    fn finish_stop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(self.settings.graceful_timeout);
        while !self.slots.is_empty() && Instant::now() < deadline {
            let _ = self.signals.wait(Duration::from_millis(100));
            let _ = self.reap();
        }
        for pid in self.slots.all_pids() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// Reaps exited children. Returns an exit code when the leader must halt.
    fn reap(&mut self) -> Option<ExitCode> {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                Ok(s) => s,
            };
            let (pid, code, signal) = match status {
                WaitStatus::Exited(pid, code) => (pid, Some(code), None),
                WaitStatus::Signaled(pid, sig, _) => (pid, None, Some(sig)),
                _ => continue,
            };
            if self.upgrade.child == Some(pid) {
                log::error!(
                    "The new leader (pid {pid}) exited ({}); this leader keeps serving",
                    code.map_or_else(|| format!("{signal:?}"), |c| format!("code {c}"))
                );
                self.upgrade.child = None;
                self.restore_pidfile();
                continue;
            }
            // Unknown children (a PID-1 leader adopts orphans) are reaped quietly.
            let Some((slot, worker)) = self.slots.remove_pid(pid) else {
                continue;
            };
            if let Some(watch) = self.memory_watch.as_mut() {
                watch.forget(pid.as_raw());
            }
            if let Some(cell) = worker.load_cell {
                self.load_cells.release(cell);
                if let Some(counts) = &self.request_counts {
                    counts.release(cell);
                }
            }
            if let Some(rt) = &self.runtime {
                self.leftovers
                    .reaped(rt, pid.as_raw() as u32, Instant::now());
            }
            let expected = worker.retiring.is_some() || self.stopping.is_some();
            match (code, signal) {
                (Some(0), _) => {}
                (Some(c), _) if WorkerExit::from_code(c) == Some(WorkerExit::Panicked) => {
                    log::error!(
                        "Worker (pid:{pid}) panicked (exit code {c}); the panic is logged above"
                    );
                }
                (Some(c), _) => log::error!("Worker (pid:{pid}) exited with code {c}"),
                (None, Some(Signal::SIGKILL)) if !expected => {
                    log::error!("Worker (pid:{pid}) was sent SIGKILL! Perhaps out of memory?");
                }
                (None, Some(sig)) if !expected => {
                    log::error!("Worker (pid:{pid}) was sent {sig}!");
                }
                _ => {}
            }
            self.child_exit(slot, &worker);
            let boot_error = matches!(
                code.and_then(WorkerExit::from_code),
                Some(WorkerExit::AppLoadError | WorkerExit::BootError)
            );
            if boot_error && self.stopping.is_none() {
                let failures = self.slots.boot_failed(slot);
                if failures >= MAX_BOOT_FAILURES && self.slots.superseded().next().is_some() {
                    // A reload whose new workers cannot boot: the previous generation serves on.
                    if failures == MAX_BOOT_FAILURES {
                        log::error!(
                            "Worker failed to boot {failures} times in a row in slot {slot} after \
                             a reload: the previous workers keep serving; fix the application \
                             and send HUP again. The traceback is above."
                        );
                    }
                } else if failures >= MAX_BOOT_FAILURES {
                    log::error!(
                        "Worker failed to boot {failures} times in a row in slot {slot}: shutting \
                         down. The application's traceback is above."
                    );
                    return Some(ExitCode::from(WorkerExit::AppLoadError as u8));
                }
            }
        }
    }

    /// `child_exit(server, worker)` for a reaped worker.
    fn child_exit(&mut self, slot: u32, worker: &WorkerProc) {
        if self.hooks.get(Hook::ChildExit).is_none() {
            return;
        }
        let failed = Python::attach(|py| {
            crate::hooks::call(py, &self.hooks, Hook::ChildExit, || {
                let w = crate::hooks::worker_object(
                    py,
                    &self.server,
                    slot,
                    worker.age,
                    self.settings.max_requests,
                )?;
                {
                    let mut b = w.borrow_mut(py);
                    b.pid = worker.pid.as_raw().into_pyobject(py)?.into_any().unbind();
                    b.alive = false;
                    b.booted = true;
                }
                Ok(vec![arg(py, &self.server), arg(py, &w)])
            })
            .is_err()
        });
        if failed && self.stopping.is_none() {
            self.halt = Some(ExitCode::from(HOOK_FAILED));
        }
    }

    /// Aborts workers whose heartbeat has been silent for longer than `--timeout`; KILLs aborted
    /// workers that did not die.
    fn murder(&mut self) {
        let timeout = self.settings.timeout;
        if timeout > 0 {
            let late: Vec<(u32, Pid)> = self
                .slots
                .serving()
                .filter(|(slot, w)| {
                    let age_ms = w.spawned_at.elapsed().as_millis() as u64;
                    if self.ready.is_ready(*slot, w.pid.as_raw() as u32) {
                        age_ms >= timeout * 1000
                            && self.heartbeats.silence_ms(*slot) > timeout * 1000
                    } else {
                        // Still booting: its slot's heartbeat may be the old worker's (during
                        // a reload), so the boot itself is what must end within --timeout.
                        age_ms > timeout * 1000
                    }
                })
                .map(|(s, w)| (s, w.pid))
                .collect();
            for (slot, pid) in late {
                crate::critical!("WORKER TIMEOUT (pid:{pid})");
                if let Some(counts) = &self.request_counts {
                    counts.recycled(slot, RecycleReason::Timeout);
                }
                self.slots.retire(slot, true);
                // The worker dumps every thread's stack to the error log (faulthandler), runs
                // the worker_abort hook when Python gets to it, and exits.
                let _ = kill(pid, Signal::SIGABRT);
            }
        }
        // A retiring worker still busy after --graceful-timeout is aborted like a timed-out
        // one, so the log shows what held it up; KILL follows if it does not die.
        let graceful = Duration::from_secs(self.settings.graceful_timeout);
        for (_, w) in self.slots.retiring_mut() {
            if let Some(r) = w.retiring.as_mut() {
                if r.aborted {
                    if r.since.elapsed() > ABORT_GRACE {
                        let _ = kill(w.pid, Signal::SIGKILL);
                    }
                } else if r.since.elapsed() > graceful {
                    log::error!(
                        "Worker (pid:{}) still busy {}s after it was told to stop: aborting it",
                        w.pid,
                        self.settings.graceful_timeout
                    );
                    let _ = kill(w.pid, Signal::SIGABRT);
                    r.aborted = true;
                    r.since = Instant::now();
                }
            }
        }
    }

    /// Spawns workers into empty slots and retires those above the target.
    fn manage(&mut self) {
        for slot in self.slots.excess_slots(self.target) {
            if let Some(pid) = self.slots.retire(slot, false) {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        for slot in self.slots.empty_slots(self.target, Instant::now()) {
            self.spawn(slot);
            if self.halt.is_some() {
                return;
            }
        }
        // Old workers of a reload retire once the new worker in their slot is ready (or their
        // slot is no longer wanted).
        let replaced: Vec<Pid> =
            self.slots
                .superseded()
                .filter(|(slot, _)| {
                    *slot >= self.target
                        || self.slots.serving().any(|(s, w)| {
                            s == *slot && self.ready.is_ready(s, w.pid.as_raw() as u32)
                        })
                })
                .map(|(_, w)| w.pid)
                .collect();
        for pid in replaced {
            if self.slots.retire_superseded(pid) {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        // A worker that lived past the timeout (or 5 s) booted fine.
        let booted: Vec<u32> = self
            .slots
            .serving()
            .filter(|(_, w)| w.spawned_at.elapsed() > Duration::from_secs(5))
            .map(|(s, _)| s)
            .collect();
        for slot in booted {
            self.slots.booted(slot);
        }
    }

    fn spawn(&mut self, slot: u32) {
        let age = self.slots.next_age();
        self.heartbeats.beat(slot);
        let worker = Python::attach(|py| {
            let worker = crate::hooks::worker_object(
                py,
                &self.server,
                slot,
                age,
                self.settings.max_requests,
            )
            .map_err(|e| log::error!("{}", crate::python::format_exception(e)))
            .ok()?;
            crate::hooks::call(py, &self.hooks, Hook::PreFork, || {
                Ok(vec![arg(py, &self.server), arg(py, &worker)])
            })
            .ok()?;
            Some(worker)
        });
        let Some(worker) = worker else {
            self.halt = Some(ExitCode::from(HOOK_FAILED));
            return;
        };
        let load = self.load_cells.take();
        if let (Some(counts), Some(load)) = (&self.request_counts, load) {
            counts.claim(load.cell(), slot);
        }
        let forked = spawn::fork_child(|| {
            Python::attach(|py| spawn::worker_main(py, self, slot, age, load, worker))
        });
        match forked {
            Ok(pid) => {
                log::info!("Booting worker with pid: {pid}");
                self.slots.insert(
                    slot,
                    WorkerProc {
                        pid,
                        age,
                        spawned_at: Instant::now(),
                        retiring: None,
                        load_cell: load.map(|l| l.cell()),
                    },
                );
            }
            Err(e) => {
                log::error!("fork failed: {e}");
                if let Some(l) = load {
                    self.load_cells.release(l.cell());
                }
            }
        }
    }

    fn cleanup(&mut self) {
        if let Some(path) = &self.pidfile {
            let _ = std::fs::remove_file(path);
        }
        // Another leader serves on the same Unix sockets during an upgrade: keep their files.
        if self.upgrade.sharing_sockets() {
            return;
        }
        for l in &self.listeners {
            if let Listener::Unix(_, path) = l {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
