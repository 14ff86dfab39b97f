//! The child side of a fork: turn a copy of the leader into a worker, run it, and exit without
//! ever returning into leader code.

use std::time::Duration;

use pyo3::prelude::*;

use super::Leader;
use crate::hooks::{Hook, RequestHooks, WorkerObject, arg};
use crate::worker::{Identity, WorkerConfig, WorkerExit};
use crate::wsgi::Wsgi;
use crate::wsgi::environ::TrustedProxies;

/// Connections one worker holds at most (gunicorn's `worker_connections` default is 1000; idle
/// keep-alive connections cost a few kilobytes here, so the bound is higher).
const MAX_CONNECTIONS: usize = 10_000;

/// Boots and runs a worker in the forked child, then calls `worker_exit`. Returns its exit
/// status.
///
/// Order (gunicorn's, with the signal handlers moved first): reset the inherited signal state,
/// install the worker's handlers and the profiler doorbell, `post_fork(server, worker)`, import
/// the app (unless preloaded), `post_worker_init(worker)`, serve. Nothing touches a signal
/// handler after the hooks, so handlers they install stay.
pub fn worker_main(
    py: Python<'_>,
    leader: &Leader,
    slot: u32,
    age: u64,
    load: Option<crate::balance::Load>,
    worker: Py<WorkerObject>,
) -> WorkerExit {
    let exit = boot_and_serve(py, leader, slot, age, load, &worker);
    if let Ok(mut w) = worker.try_borrow_mut(py) {
        w.alive = false;
    }
    let _ = crate::hooks::call(py, &leader.hooks, Hook::WorkerExit, || {
        Ok(vec![arg(py, &leader.server), arg(py, &worker)])
    });
    exit
}

fn boot_and_serve(
    py: Python<'_>,
    leader: &Leader,
    slot: u32,
    _age: u64,
    load: Option<crate::balance::Load>,
    worker: &Py<WorkerObject>,
) -> WorkerExit {
    crate::worker::signals::reset_inherited();
    super::signals::uninstall();
    // The leader paused the collector for the preload import (python::disable_gc).
    let _ = crate::python::enable_gc(py);
    let pid = std::process::id();
    let leader_pid = nix::unistd::getppid().as_raw() as u32;
    if let Ok(mut w) = worker.try_borrow_mut(py)
        && let Ok(p) = pid.into_pyobject(py)
    {
        w.pid = p.into_any().unbind();
    }
    crate::worker::signals::set_hooks(crate::worker::signals::SignalHooks {
        worker: worker.clone_ref(py),
        hooks: leader.hooks.clone_ref(py),
    });
    if let Some(rt) = &leader.runtime
        && let Err(e) = crate::runtime_dir::announce(
            rt,
            forkscope_protocol::Role::Worker,
            Some(slot),
            leader_pid,
            &leader.app_name,
        )
    {
        log::warn!("cannot write to the runtime directory: {e}");
    }
    // The title last: whoever finds a worker by its title finds its process.json too.
    crate::proctitle::set(&crate::proctitle::worker_title(slot, &leader.app_name));
    let wakeup = match crate::worker::signals::install(py, &leader.settings.errorlog) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!(
                "worker signal set-up failed:\n{}",
                crate::python::format_exception(e)
            );
            return WorkerExit::BootError;
        }
    };
    if let Some(rt) = &leader.runtime {
        let ctx = crate::profiler::ProfilerContext {
            runtime: rt.clone(),
            pid,
            slot,
            leader_pid,
        };
        if let Err(e) = crate::profiler::install(py, ctx) {
            log::error!(
                "profiler set-up failed:\n{}",
                crate::python::format_exception(e)
            );
        }
    }
    // SIGUSR2 was held back while the worker booted; from here on it is answered (by the
    // doorbell, or by whatever handler a hook installs).
    let mut usr2 = nix::sys::signal::SigSet::empty();
    usr2.add(nix::sys::signal::Signal::SIGUSR2);
    let _ = usr2.thread_unblock();

    // gunicorn: an exception in post_fork is a boot error of this worker.
    if crate::hooks::call(py, &leader.hooks, Hook::PostFork, || {
        Ok(vec![arg(py, &leader.server), arg(py, worker)])
    })
    .is_err()
    {
        return WorkerExit::BootError;
    }

    let app = match &leader.preloaded {
        Some(app) => app.clone_ref(py),
        None => {
            // An app imported here may take SIGUSR2 at import: put back what was there before
            // (the doorbell, or a post_fork hook's handler).
            // A ring that arrives meanwhile waits for the restored handler.
            let _ = usr2.thread_block();
            let before = usr2_handler(py);
            let imported = crate::python::import_app(py, &leader.spec);
            if imported.is_ok() {
                restore_usr2(py, before);
            }
            let _ = usr2.thread_unblock();
            match imported {
                Ok(app) => app,
                Err(e) => {
                    log::error!("Exception in worker process\n{e:#}");
                    return WorkerExit::AppLoadError;
                }
            }
        }
    };

    let settings = &leader.settings;
    // Validated with the settings; an error here would be a bug, never "trust nobody".
    let trusted = match TrustedProxies::parse(&settings.forwarded_allow_ips) {
        Ok(trusted) => trusted,
        Err(e) => {
            log::error!("{e:#}");
            return WorkerExit::BootError;
        }
    };
    let config = WorkerConfig {
        threads: settings.threads.max(1) as usize,
        keepalive: Duration::from_secs(settings.keepalive),
        timeout: Duration::from_secs(settings.timeout),
        max_requests: with_jitter(settings.max_requests, settings.max_requests_jitter),
        limits: settings.http_limits(),
        trusted,
        multiprocess: settings.workers > 1,
        max_connections: MAX_CONNECTIONS,
    };
    let write_timeout = if config.timeout.is_zero() {
        Duration::from_secs(30)
    } else {
        config.timeout
    };
    let access = match crate::logging::access::AccessLog::new(settings) {
        Ok(a) => a,
        Err(e) => {
            log::error!("{e:#}");
            return WorkerExit::BootError;
        }
    };
    let wsgi = match Wsgi::new(
        py,
        app,
        config.multiprocess,
        config.threads > 1,
        write_timeout,
        access,
    ) {
        Ok(w) => w,
        Err(e) => {
            log::error!("{}", crate::python::format_exception(e));
            return WorkerExit::BootError;
        }
    };
    if crate::hooks::call(py, &leader.hooks, Hook::PostWorkerInit, || {
        Ok(vec![arg(py, worker)])
    })
    .is_err()
    {
        return WorkerExit::BootError;
    }
    if let Ok(mut w) = worker.try_borrow_mut(py) {
        w.booted = true;
    }
    let defined = |hook| leader.hooks.get(hook).map(|h| h.clone_ref(py));
    let (pre_request, post_request) = (defined(Hook::PreRequest), defined(Hook::PostRequest));
    let request_hooks = (pre_request.is_some() || post_request.is_some()).then(|| RequestHooks {
        worker: worker.clone_ref(py),
        pre_request,
        post_request,
    });
    let id = Identity {
        slot,
        heartbeats: leader.heartbeats,
        load,
        requests: leader
            .request_counts
            .and_then(|c| c.worker(slot, load.map(|l| l.cell()))),
    };
    // From here on this worker serves: on a reload, the worker it replaces may go.
    leader.ready.mark(slot, pid);
    let exit = match crate::worker::serve(
        py,
        id,
        &config,
        &leader.listeners,
        wsgi,
        wakeup,
        request_hooks,
    ) {
        Ok(exit) => exit,
        Err(e) => {
            log::error!("worker event loop failed: {e}");
            WorkerExit::BootError
        }
    };
    crate::profiler::on_worker_exit(py, "worker stopped");
    crate::python::run_exit_functions(py);
    exit
}

/// The Python-level SIGUSR2 handler now installed.
fn usr2_handler(py: Python<'_>) -> Option<Py<PyAny>> {
    let signal = py.import("signal").ok()?;
    let usr2 = signal.getattr("SIGUSR2").ok()?;
    signal
        .call_method1("getsignal", (usr2,))
        .ok()
        .map(Bound::unbind)
}

/// Puts `before` back as the SIGUSR2 handler if the app's import replaced it.
fn restore_usr2(py: Python<'_>, before: Option<Py<PyAny>>) {
    let Some(before) = before else {
        return;
    };
    let Some(now) = usr2_handler(py) else {
        return;
    };
    if now.bind(py).is(before.bind(py)) {
        return;
    }
    log::warn!(
        "the application installed a SIGUSR2 handler while it was imported in the worker; it is \
         replaced by the one installed before the import (the profiler doorbell, or your \
         post_fork hook's). Register it in post_fork or post_worker_init instead."
    );
    let result = py.import("signal").and_then(|signal| {
        signal.call_method1("signal", (signal.getattr("SIGUSR2")?, before.bind(py)))
    });
    if let Err(e) = result {
        log::error!(
            "cannot restore the SIGUSR2 handler:\n{}",
            crate::python::format_exception(e)
        );
    }
}

/// `max_requests` plus a random 0..=jitter, so workers do not all restart at once.
fn with_jitter(max_requests: u64, jitter: u64) -> u64 {
    if max_requests == 0 || jitter == 0 {
        return max_requests;
    }
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos().into())
            .unwrap_or(0);
    max_requests + seed % (jitter + 1)
}

/// Forks; in the child, runs `child` and ends the process with the status it returns. Returns
/// only in the leader, with the child's PID.
///
/// The child's stack still holds the leader's frames, so nothing may return or unwind into
/// them there: their destructors would act for the leader (delete its runtime folder, among
/// others). A panic in `child` (logged by the panic hook) ends the child with
/// [`WorkerExit::Panicked`].
///
/// # Errors
/// `fork()` failed.
pub fn fork_child(child: impl FnOnce() -> WorkerExit) -> nix::Result<nix::unistd::Pid> {
    match Python::attach(crate::python::fork)? {
        crate::python::Forked::Parent(pid) => Ok(pid),
        crate::python::Forked::Child => {
            let code = crate::panics::contain(child).unwrap_or(WorkerExit::Panicked);
            exit_worker(code)
        }
    }
}

/// Ends the worker process without unwinding into leader code or running its destructors.
fn exit_worker(code: WorkerExit) -> ! {
    log::logger().flush();
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(code as i32) }
}
