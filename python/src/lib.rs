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

use std::ffi::OsString;
use std::process::ExitCode;

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

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(main, m)?)?;
    m.add_function(wrap_pyfunction!(adopt, m)?)?;
    Ok(())
}
