//! `forkscope._native`, the compiled half of the `forkscope` wheel (pyproject.toml beside this
//! crate): the same leader, workers and profiler as the `forkscope-server` binary, linked from
//! the `forkscope_server` library into an extension module of the interpreter that imports it.
//!
//! - `main(argv=None)`: the `forkscope-server` console script. The binary starts its own
//!   interpreter; here the interpreter of the venv already runs, so `main` lets go of the GIL
//!   (the state the binary's `main` is in after `Python::initialize`) and runs the very same
//!   [`forkscope_server::run`].
//! - `_adopt(package)`: the `forkscope` package's `__init__.py` hands itself over, and becomes
//!   the `forkscope` module the workers keep current (`slot`, `worker_slot()`, `is_tracing()`,
//!   `mark(label)`), outside a server too.
//! - `_install_in_gunicorn_worker(...)`, `_worker_exiting(reason)`, `_worker_gone(...)`: what
//!   `forkscope.gunicorn`'s hooks call, so a gunicorn worker gets the very profiler and
//!   doorbell of forkscope-server's workers (docs/GUNICORN.md).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use forkscope_protocol::{Role, RuntimeDir};
use forkscope_server::profiler::ProfilerContext;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyModule;

/// Runs forkscope-server with `argv` (program name first; default `sys.argv`) and returns its
/// exit status. Workers never return from here: they exit inside.
#[pyfunction]
#[pyo3(signature = (argv = None))]
fn main(py: Python<'_>, argv: Option<Vec<OsString>>) -> PyResult<u8> {
    let argv = match argv {
        Some(argv) => argv,
        None => py.import("sys")?.getattr("argv")?.extract()?,
    };
    Ok(py.detach(|| {
        // As the binary's main does, before any thread exists: Python's own copies of argv
        // and the environment are untouched, the memory behind them carries the titles.
        forkscope_server::proctitle::init();
        let code = forkscope_server::run(argv);
        // What the binary's exit does for Rust's buffered stdout (--print-config).
        let _ = std::io::Write::flush(&mut std::io::stdout());
        status(code)
    }))
}

/// The number behind an `ExitCode` (which only the process exit reveals otherwise).
fn status(code: ExitCode) -> u8 {
    (0..=u8::MAX)
        .find(|n| ExitCode::from(*n) == code)
        .unwrap_or(1)
}

/// Makes the `forkscope` package the module the profiler updates (see the crate docs).
#[pyfunction(name = "_adopt")]
fn adopt(package: &Bound<'_, PyModule>) -> PyResult<()> {
    forkscope_server::profiler::module::adopt(package)
}

/// `forkscope.gunicorn`'s `post_worker_init`: gives this gunicorn worker what forkscope-server
/// gives its workers, from the same code: `{runtime_dir}/{pid}/process.json`, `forkscope.slot`,
/// and the SIGUSR2 doorbell answering command files with results under `{pid}/results/`.
/// Returns the worker's folder.
#[pyfunction(name = "_install_in_gunicorn_worker")]
fn install_in_gunicorn_worker(
    py: Python<'_>,
    slot: u32,
    app: &str,
    runtime_dir: PathBuf,
) -> PyResult<PathBuf> {
    // The profiler's log lines ("heap diff captured ...; wrote ...") go to gunicorn's error log.
    if log::set_boxed_logger(Box::new(GunicornLog)).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let runtime = RuntimeDir::new(&runtime_dir);
    let pid = std::process::id();
    let leader_pid = std::os::unix::process::parent_id();
    let ctx = ProfilerContext {
        runtime: runtime.clone(),
        pid,
        slot,
        leader_pid,
    };
    forkscope_server::profiler::install(py, ctx)?;
    // process.json last: the sidecar rings a gunicorn worker only once it is there, and by then
    // the doorbell answers (SIGUSR2's default action would end the worker).
    let folder = forkscope_server::runtime_dir::announce(
        &runtime,
        Role::Worker,
        Some(slot),
        leader_pid,
        app,
    )
    .map_err(|e| {
        PyOSError::new_err(format!(
            "forkscope cannot write to the runtime directory {}: {e}",
            runtime_dir.display()
        ))
    })?;
    Ok(folder)
}

/// Hands the `log` records of the profiler to Python's `gunicorn.error` logger, which writes
/// gunicorn's error log in its format.
struct GunicornLog;

impl log::Log for GunicornLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => 40,
            log::Level::Warn => 30,
            _ => 20,
        };
        let message = record.args().to_string();
        Python::attach(|py| {
            let logged = py
                .import("logging")
                .and_then(|logging| logging.call_method1("getLogger", ("gunicorn.error",)))
                .and_then(|logger| logger.call_method1("log", (level, message)));
            // A logging failure must not become the profiler's: it is dropped.
            drop(logged);
        });
    }

    fn flush(&self) {}
}

/// `forkscope.gunicorn`'s `worker_exit`: a session still tracing hands in an `exit` result.
#[pyfunction(name = "_worker_exiting")]
fn worker_exiting(py: Python<'_>, reason: &str) {
    forkscope_server::profiler::on_worker_exit(py, reason);
}

/// `forkscope.gunicorn`'s `child_exit` (in the master): removes the folder of worker `pid`,
/// unless it holds results the sidecar has yet to collect. True when it is gone.
#[pyfunction(name = "_worker_gone")]
fn worker_gone(runtime_dir: PathBuf, pid: u32) -> bool {
    forkscope_server::runtime_dir::remove_if_empty(&RuntimeDir::new(runtime_dir), pid)
}

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(adopt, m)?)?;
    m.add_function(wrap_pyfunction!(install_in_gunicorn_worker, m)?)?;
    m.add_function(wrap_pyfunction!(worker_exiting, m)?)?;
    m.add_function(wrap_pyfunction!(worker_gone, m)?)?;
    m.add(
        "DEFAULT_RUNTIME_DIR",
        forkscope_protocol::DEFAULT_RUNTIME_DIR,
    )?;
    m.add("RUNTIME_DIR_ENV", forkscope_protocol::RUNTIME_DIR_ENV)?;
    Ok(())
}
