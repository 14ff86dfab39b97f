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
//! | ABRT | sent by the leader on `--timeout`: `faulthandler` dumps every thread's stack, then the worker dies |
//! | WINCH | ignored (it is for the leader) |

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal, sigprocmask};
use pyo3::prelude::*;
use pyo3::types::IntoPyDict;
use pyo3::wrap_pyfunction;

/// Set by TERM: finish what is in flight, then exit.
pub static GRACEFUL_STOP: AtomicBool = AtomicBool::new(false);
/// Set by USR1: reopen the log files.
pub static REOPEN_LOGS: AtomicBool = AtomicBool::new(false);

#[pyfunction]
fn _forkscope_on_term(_signum: i32, _frame: Bound<'_, PyAny>) {
    GRACEFUL_STOP.store(true, Ordering::SeqCst);
}

#[pyfunction]
fn _forkscope_on_quit(_signum: i32, _frame: Bound<'_, PyAny>) -> PyResult<()> {
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
/// Returns the read end of the wakeup pipe (non-blocking).
///
/// # Errors
/// The pipe cannot be created or CPython refuses a handler.
pub fn install(py: Python<'_>) -> PyResult<OwnedFd> {
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
    // Stack traces of every thread before a timeout kill.
    py.import("faulthandler")?.call_method(
        "enable",
        (),
        Some(&[("all_threads", true)].into_py_dict(py)?),
    )?;

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

/// Under `--preload`, warns about Python-level handlers the app registered at import time (so
/// in the leader) for signals that workers own: workers reset them, which is how gunicorn turns
/// a diagnostic `kill -USR2` into a dead worker. Called once by the leader after the import.
///
/// # Errors
/// Only if the `signal` module is unusable.
pub fn warn_about_app_handlers(py: Python<'_>) -> PyResult<()> {
    let signal_mod = py.import("signal")?;
    let default = signal_mod.getattr("SIG_DFL")?;
    for name in [
        "SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGABRT", "SIGWINCH",
    ] {
        let handler = signal_mod.call_method1("getsignal", (signal_mod.getattr(name)?,))?;
        if handler.is_callable() && !handler.is(&default) {
            log::warn!(
                "the application set a Python handler for {name} at import time, in the leader \
                 (--preload); workers own {name} and reset it after fork. Register the handler in \
                 a post_fork or post_worker_init hook instead, where it keeps working."
            );
        }
    }
    Ok(())
}
