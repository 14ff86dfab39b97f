//! The child side of a fork: turn a copy of the leader into a worker, run it, and exit without
//! ever returning into leader code.

use std::time::Duration;

use pyo3::prelude::*;

use super::Leader;
use crate::worker::{Identity, WorkerConfig, WorkerExit};
use crate::wsgi::Wsgi;
use crate::wsgi::environ::TrustedProxies;

/// Connections one worker holds at most (gunicorn's `worker_connections` default is 1000; idle
/// keep-alive connections cost a few kilobytes here, so the bound is higher).
const MAX_CONNECTIONS: usize = 10_000;

/// Boots and runs a worker in the forked child. Returns its exit status.
pub fn worker_main(py: Python<'_>, leader: &Leader, slot: u32, _age: u64) -> WorkerExit {
    crate::worker::signals::reset_inherited();
    super::signals::uninstall();
    crate::proctitle::set(&crate::proctitle::worker_title(slot, &leader.app_name));
    let pid = std::process::id();
    let leader_pid = nix::unistd::getppid().as_raw() as u32;
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
    let wakeup = match crate::worker::signals::install(py) {
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

    let app = match &leader.preloaded {
        Some(app) => app.clone_ref(py),
        None => match crate::python::import_app(py, &leader.spec) {
            Ok(app) => {
                // An app imported here may have taken SIGUSR2 at import; it is the doorbell.
                if let Err(e) = crate::profiler::reclaim_doorbell(py) {
                    log::error!(
                        "profiler set-up failed:\n{}",
                        crate::python::format_exception(e)
                    );
                }
                app
            }
            Err(e) => {
                log::error!("Exception in worker process\n{e:#}");
                return WorkerExit::AppLoadError;
            }
        },
    };

    let settings = &leader.settings;
    let config = WorkerConfig {
        threads: settings.threads.max(1) as usize,
        keepalive: Duration::from_secs(settings.keepalive),
        timeout: Duration::from_secs(settings.timeout),
        max_requests: with_jitter(settings.max_requests, settings.max_requests_jitter),
        limits: settings.http_limits(),
        trusted: TrustedProxies::parse(&settings.forwarded_allow_ips).unwrap_or_default(),
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
    let id = Identity {
        slot,
        heartbeats: leader.heartbeats,
    };
    let exit = match crate::worker::serve(py, id, &config, &leader.listeners, wsgi, wakeup) {
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

/// Ends the worker process without unwinding into leader code or running its destructors.
pub fn exit_worker(code: WorkerExit) -> ! {
    log::logger().flush();
    // SAFETY: _exit ends the process at once; nothing after it runs.
    unsafe { libc::_exit(code as i32) }
}
