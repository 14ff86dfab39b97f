//! Worker signal handling, installed right after fork and before any user hook runs.
//!
//! Everything inherited from the leader (dispositions, the mask, Python-level handlers the app
//! registered at import time under `--preload`) is reset first. Then the worker installs its own
//! Python-level handlers, which CPython runs on the main thread: between bytecodes while a
//! request runs, or when the event loop sees the wakeup fd and calls `PyErr_CheckSignals`.
//!
//! | signal | worker meaning |
//! | --- | --- |
//! | TERM | graceful: stop accepting, finish in-flight requests, exit |
//! | INT, QUIT | quick: exit now (`SystemExit` is raised in the running request) |
//! | USR1 | reopen log files |
//! | USR2 | profiler doorbell (see [`crate::profiler`]) |
//! | ABRT | sent by the leader on `--timeout`: `faulthandler` dumps every thread's stack to the error log at once, then the `worker_abort` hook runs and the worker exits |
//! | WINCH | ignored (it is for the leader) |
//!
//! Nothing here runs after the config file's `post_fork` and `post_worker_init` hooks, so a
//! handler those hooks install (say for USR2) stays installed. docs/SIGNALS.md has the full
//! tables and the story of gunicorn's preload trap.
//!
//! # Timeout stacks
//! `faulthandler.enable()` is called *after* the Python-level ABRT handler is set: on ABRT its
//! C handler writes every thread's stack at once (it needs neither the GIL nor the main
//! thread), then hands the signal to the handler it found, CPython's, which schedules
//! `_forkscope_on_abort` (hook, then exit). When Python cannot get there (C code holding the
//! GIL), the stacks are already in the log and the leader's KILL follows.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use pyo3::prelude::*;
use pyo3::types::IntoPyDict;
use pyo3::wrap_pyfunction;

use crate::hooks::{Hook, Hooks};

/// Set by TERM: finish what is in flight, then exit.
pub static GRACEFUL_STOP: AtomicBool = AtomicBool::new(false);
/// Set by USR1: reopen the log files.
pub static REOPEN_LOGS: AtomicBool = AtomicBool::new(false);

/// What the INT/QUIT and ABRT handlers call: the `worker_int` / `worker_abort` hooks with this
/// worker's object.
pub struct SignalHooks {
    /// The worker object of [`crate::hooks`].
    pub worker: Py<crate::hooks::WorkerObject>,
    /// The config file's hooks.
    pub hooks: Hooks,
}

static SIGNAL_HOOKS: OnceLock<SignalHooks> = OnceLock::new();

/// The error-log file descriptor faulthandler writes to (-1: stderr).
static FAULT_FD: AtomicI32 = AtomicI32::new(-1);
/// The error log's path when it is a file (for [`reopen_fault_log`]).
static FAULT_PATH: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Makes the signal handlers call the worker's hooks. Call once, right after fork.
pub fn set_hooks(hooks: SignalHooks) {
    let _ = SIGNAL_HOOKS.set(hooks);
}

fn run_signal_hook(py: Python<'_>, hook: Hook) {
    let Some(h) = SIGNAL_HOOKS.get() else {
        return;
    };
    if let Ok(mut w) = h.worker.try_borrow_mut(py) {
        w.alive = false;
    }
    let _ = crate::hooks::call(py, &h.hooks, hook, || {
        Ok(vec![crate::hooks::arg(py, &h.worker)])
    });
}

#[pyfunction]
fn _forkscope_on_abort(py: Python<'_>, _signum: i32, _frame: Bound<'_, PyAny>) {
    // faulthandler has already written every thread's stack to the error log.
    run_signal_hook(py, Hook::WorkerAbort);
    log::info!("Worker exiting (pid: {})", std::process::id());
    crate::python::run_exit_functions(py);
    log::logger().flush();
    // SAFETY: ends the process at once; nothing after it runs.
    unsafe { libc::_exit(1) }
}

#[pyfunction]
fn _forkscope_on_term(_signum: i32, _frame: Bound<'_, PyAny>) {
    GRACEFUL_STOP.store(true, Ordering::SeqCst);
}

#[pyfunction]
fn _forkscope_on_quit(py: Python<'_>, _signum: i32, _frame: Bound<'_, PyAny>) -> PyResult<()> {
    run_signal_hook(py, Hook::WorkerInt);
    Err(pyo3::exceptions::PySystemExit::new_err(0))
}

#[pyfunction]
fn _forkscope_on_usr1(_signum: i32, _frame: Bound<'_, PyAny>) {
    REOPEN_LOGS.store(true, Ordering::SeqCst);
}

/// Resets inherited signal state at the OS level. Call first thing in the child after fork.
pub fn reset_inherited() {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // Writes to a closed socket must fail with EPIPE, not kill the worker.
        let handler = if sig == Signal::SIGPIPE {
            SigHandler::SigIgn
        } else {
            SigHandler::SigDfl
        };
        // SAFETY: installing SIG_DFL/SIG_IGN runs no code in signal context.
        let _ = unsafe { signal(sig, handler) };
    }
    // SIGUSR2 stays blocked until the profiler installs the doorbell (profiler::install unblocks
    // it): a ring that arrives while the worker boots waits instead of killing it (SIG_DFL).
    let mut boot_mask = SigSet::empty();
    boot_mask.add(Signal::SIGUSR2);
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&boot_mask), None);
    // If the leader dies without stopping us, stop gracefully instead of serving as an orphan.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
}

/// Installs the worker's Python-level handlers and the wakeup fd the event loop watches.
/// `errorlog` is `--error-logfile`: when it is a file, timeout stacks go there.
/// Returns the read end of the wakeup pipe (non-blocking).
///
/// # Errors
/// The pipe cannot be created or CPython refuses a handler.
pub fn install(py: Python<'_>, errorlog: &str) -> PyResult<OwnedFd> {
    let signal_mod = py.import("signal")?;
    let module = PyModule::new(py, "_forkscope_signals")?;
    let set = |sig: &str, f: Bound<'_, PyAny>| -> PyResult<()> {
        signal_mod.call_method1("signal", (signal_mod.getattr(sig)?, f))?;
        Ok(())
    };
    set(
        "SIGTERM",
        wrap_pyfunction!(_forkscope_on_term, &module)?.into_any(),
    )?;
    set(
        "SIGINT",
        wrap_pyfunction!(_forkscope_on_quit, &module)?.into_any(),
    )?;
    set(
        "SIGQUIT",
        wrap_pyfunction!(_forkscope_on_quit, &module)?.into_any(),
    )?;
    set(
        "SIGUSR1",
        wrap_pyfunction!(_forkscope_on_usr1, &module)?.into_any(),
    )?;
    set("SIGWINCH", signal_mod.getattr("SIG_IGN")?)?;
    // A TERM must not interrupt a system call the app is in (gunicorn: siginterrupt False).
    signal_mod.call_method1("siginterrupt", (signal_mod.getattr("SIGTERM")?, false))?;
    // The ABRT handler first, then faulthandler, which chains to it (module docs).
    set(
        "SIGABRT",
        wrap_pyfunction!(_forkscope_on_abort, &module)?.into_any(),
    )?;
    if errorlog != "-" {
        let _ = FAULT_PATH.set(std::path::PathBuf::from(errorlog));
        match open_fault_log() {
            Ok(fd) => FAULT_FD.store(fd, Ordering::SeqCst),
            Err(e) => log::warn!("cannot open {errorlog} for stack dumps: {e}"),
        }
    }
    enable_faulthandler(py)?;

    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| PyErr::from(std::io::Error::from(e)))?;
    signal_mod.call_method(
        "set_wakeup_fd",
        (write.as_raw_fd(),),
        Some(&[("warn_on_full_buffer", false)].into_py_dict(py)?),
    )?;
    // The write end must stay open for the life of the worker.
    std::mem::forget(write);
    Ok(read)
}

fn open_fault_log() -> std::io::Result<i32> {
    let path = FAULT_PATH.get().ok_or(std::io::ErrorKind::NotFound)?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    Ok(file.into_raw_fd())
}

/// Stack traces of every thread on a fatal signal (and on the leader's ABRT), to the error-log
/// file when there is one, else to stderr.
fn enable_faulthandler(py: Python<'_>) -> PyResult<()> {
    let fd = FAULT_FD.load(Ordering::SeqCst);
    let kwargs = [("all_threads", true)].into_py_dict(py)?;
    if fd >= 0 {
        kwargs.set_item("file", fd)?;
    }
    py.import("faulthandler")?
        .call_method("enable", (), Some(&kwargs))?;
    Ok(())
}

/// USR1: points faulthandler at a freshly opened error-log file (log rotation).
pub fn reopen_fault_log(py: Python<'_>) {
    if FAULT_PATH.get().is_none() {
        return;
    }
    match open_fault_log() {
        Ok(fd) => {
            let old = FAULT_FD.swap(fd, Ordering::SeqCst);
            if let Err(e) = enable_faulthandler(py) {
                log::error!("cannot point faulthandler at the new error log: {e}");
            }
            if old >= 0 {
                // SAFETY: `old` was opened by open_fault_log and faulthandler no longer uses it.
                unsafe { libc::close(old) };
            }
        }
        Err(e) => log::error!("cannot reopen the error log for stack dumps: {e}"),
    }
}

/// Under `--preload`, warns about Python-level handlers the app registered at import time (so
/// in the leader) for signals that workers own: workers reset them, which is how gunicorn turns
/// a diagnostic `kill -USR2` into a dead worker. Called once by the leader after the import.
///
/// # Errors
/// Only if the `signal` module is unusable.
pub fn warn_about_app_handlers(py: Python<'_>) -> PyResult<()> {
    let signal_mod = py.import("signal")?;
    let default = signal_mod.getattr("SIG_DFL")?;
    // CPython's own SIGINT handler (KeyboardInterrupt) is there without any app.
    let interpreter_int = signal_mod.getattr("default_int_handler")?;
    for name in [
        "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGABRT", "SIGWINCH",
    ] {
        let handler = signal_mod.call_method1("getsignal", (signal_mod.getattr(name)?,))?;
        if handler.is_callable() && !handler.is(&default) && !handler.is(&interpreter_int) {
            log::warn!(
                "the application set a Python handler for {name} at import time, in the leader \
                 (--preload); workers own {name} and reset it after fork. Register the handler in \
                 a post_fork or post_worker_init hook instead, where it keeps working."
            );
        }
    }
    Ok(())
}
