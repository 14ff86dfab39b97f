//! The `forkscope` Python module that applications may import, and the doorbell callable.
//!
//! The module is built in Rust and put into `sys.modules` by the leader before the application
//! is imported, so `import forkscope` works at import time, with or without `--preload`. It is
//! entirely optional for applications; see docs/PROFILER.md for its API. Under the wheel, the
//! `forkscope` package is [`adopt`]ed as that module instead (python/forkscope/__init__.py).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyModule, PyTuple};

/// The name applications import.
pub const MODULE_NAME: &str = "forkscope";

const MODULE_DOC: &str = "\
forkscope: the worker's view of the forkscope-server profiler.

slot             this worker's stable slot (0-based); None in the leader (e.g. at preload).
worker_slot()    the same, read at call time (use this in code that runs at import).
is_tracing()     True while a heap-profiling session runs in this worker.
mark(label)      while tracing: diff the heap against the baseline right now and write a
                 labelled result (request id mark-LABEL-N); returns its path, else None.
";

static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The worker's slot, `None` in the leader.
#[pyfunction]
fn worker_slot() -> Option<u32> {
    super::worker_slot()
}

/// True while this worker traces allocations for a profile.
#[pyfunction]
fn is_tracing() -> bool {
    super::is_tracing()
}

/// While tracing, writes a heap diff against the baseline labelled `label` and returns the
/// result's path; returns None (and costs nothing) when no session runs. Never raises.
#[pyfunction]
fn mark(py: Python<'_>, label: &str) -> Option<String> {
    super::mark(py, label).map(|p| p.to_string_lossy().into_owned())
}

/// The SIGUSR2 handler (`signal.signal` passes `signum, frame`). Never raises.
#[pyfunction(name = "_doorbell", signature = (*_args))]
fn doorbell(py: Python<'_>, _args: &Bound<'_, PyTuple>) {
    super::ring(py);
}

/// Creates the module (once per interpreter) and puts it into `sys.modules`. When the
/// `forkscope` package of the wheel was [`adopt`]ed first, that package is the module.
///
/// # Errors
/// Python refused to create or register the module.
pub fn register(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    let module = MODULE
        .get_or_try_init(py, || {
            let m = PyModule::new(py, MODULE_NAME)?;
            populate(&m)?;
            Ok::<_, PyErr>(m.unbind())
        })?
        .bind(py);
    py.import("sys")?
        .getattr("modules")?
        .set_item(MODULE_NAME, module)?;
    Ok(module)
}

/// Makes `package` (the `forkscope` package of the wheel, which calls this from its
/// `__init__.py`) the `forkscope` module: it gets the functions, and the profiler keeps its
/// `slot` current. Called before [`register`], so a server started from the wheel hands its
/// workers that same package.
///
/// # Errors
/// Another module was registered already, or Python refused an attribute.
pub fn adopt(package: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = package.py();
    populate(package)?;
    let adopted = MODULE.get_or_init(py, || package.clone().unbind());
    // The same package again (importlib.reload) is fine; another module is not.
    if adopted.bind(py).is(package) {
        Ok(())
    } else {
        Err(pyo3::exceptions::PyRuntimeError::new_err(
            "another forkscope module is registered already",
        ))
    }
}

/// The module's attributes, set on a new module or on the adopted package.
fn populate(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__doc__", MODULE_DOC)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("slot", worker_slot())?;
    m.add_function(wrap_pyfunction!(worker_slot, m)?)?;
    m.add_function(wrap_pyfunction!(is_tracing, m)?)?;
    m.add_function(wrap_pyfunction!(mark, m)?)?;
    m.add_function(wrap_pyfunction!(doorbell, m)?)?;
    Ok(())
}

/// Sets `forkscope.slot` (the worker does this right after fork).
///
/// # Errors
/// The module could not be registered.
pub fn set_slot(py: Python<'_>, slot: Option<u32>) -> PyResult<()> {
    register(py)?.setattr("slot", slot)
}

/// What was registered for SIGUSR2 before the doorbell took it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// Already the doorbell.
    Doorbell,
    /// Default, ignored, or a handler installed outside Python.
    NoPythonHandler,
    /// A Python callable; its `repr`.
    Handler(String),
}

/// Makes the doorbell Python's handler of SIGUSR2 (main thread only).
///
/// # Errors
/// Not on the main thread, or the `signal` module refused.
pub fn install_handler(py: Python<'_>) -> PyResult<Previous> {
    let doorbell = register(py)?.getattr("_doorbell")?;
    let signal = py.import("signal")?;
    let previous = signal.call_method1("getsignal", (libc::SIGUSR2,))?;
    signal.call_method1("signal", (libc::SIGUSR2, &doorbell))?;
    Ok(if previous.eq(&doorbell)? {
        Previous::Doorbell
    } else if previous.is_none() || !previous.is_callable() {
        Previous::NoPythonHandler
    } else {
        Previous::Handler(
            previous
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into()),
        )
    })
}
