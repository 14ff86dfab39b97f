//! gunicorn's server hooks: which there are ([`Hook`]), the ones a config file defined
//! ([`Hooks`]), and calling them with gunicorn-shaped arguments ([`objects`]).
//!
//! Who calls what, and when (docs/SIGNALS.md has the table): the leader calls `on_starting`,
//! `when_ready`, `pre_fork`, `child_exit`, `nworkers_changed`, `on_reload`, `pre_exec` and
//! `on_exit`; a worker calls `post_fork`, `post_worker_init`, `pre_request`, `post_request`,
//! `worker_int`, `worker_abort` and `worker_exit`. A hook that raises is logged with its
//! traceback; what happens next is the caller's decision, mirroring gunicorn.
//!
//! Hooks are named by [`Hook`] everywhere, never by string: a misspelt hook does not compile.

pub mod objects;
pub mod table;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

pub use objects::{
    ServerObject, WorkerObject, cfg_object, request_object, response_object, server_object,
    worker_object,
};
pub use table::{Hook, Hooks};

/// A hook raised; it was logged with its traceback.
#[derive(Debug)]
pub struct HookFailed {
    /// The hook.
    pub hook: Hook,
}

impl std::fmt::Display for HookFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} hook raised an exception", self.hook.name())
    }
}

impl std::error::Error for HookFailed {}

/// Calls `hook` (when the config file defines it) with `args`.
///
/// # Errors
/// The hook raised: the traceback is in the error log; the caller decides what follows.
pub fn call<'py>(
    py: Python<'py>,
    hooks: &Hooks,
    hook: Hook,
    args: impl FnOnce() -> PyResult<Vec<Bound<'py, PyAny>>>,
) -> Result<(), HookFailed> {
    let Some(callable) = hooks.get(hook) else {
        return Ok(());
    };
    call_hook(py, callable, hook, args)
}

/// Calls `callable`, the config file's `hook`, with `args` (built only now), logging a raised
/// exception.
///
/// # Errors
/// The hook raised.
pub fn call_hook<'py>(
    py: Python<'py>,
    callable: &Py<PyAny>,
    hook: Hook,
    args: impl FnOnce() -> PyResult<Vec<Bound<'py, PyAny>>>,
) -> Result<(), HookFailed> {
    let result = args().and_then(|args| {
        let args = PyTuple::new(py, args)?;
        callable.bind(py).call1(args)
    });
    match result {
        Ok(_) => Ok(()),
        Err(err) => {
            log::error!(
                "Exception in {} hook:\n{}",
                hook.name(),
                crate::python::traceback_text(py, &err)
            );
            Err(HookFailed { hook })
        }
    }
}

/// A `Py<T>` as a bound `PyAny` argument.
pub fn arg<'py, T>(py: Python<'py>, obj: &Py<T>) -> Bound<'py, PyAny> {
    obj.bind(py).clone().into_any()
}

/// The request hooks a worker calls around every request, and its worker object. Built only
/// when the config file defines `pre_request` or `post_request`, so the request path checks
/// one `Option` and costs nothing more without them.
pub struct RequestHooks {
    /// The worker object passed as the first argument.
    pub worker: Py<WorkerObject>,
    /// `pre_request(worker, req)`.
    pub pre_request: Option<Py<PyAny>>,
    /// `post_request(worker, req, environ, resp)`.
    pub post_request: Option<Py<PyAny>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raising_hook_is_reported_not_propagated() {
        Python::initialize();
        Python::attach(|py| {
            let hook = py
                .eval(c"lambda server: 1 / 0", None, None)
                .expect("lambda")
                .unbind();
            let err = call_hook(py, &hook, Hook::OnStarting, || {
                Ok(vec![py.None().into_bound(py)])
            })
            .expect_err("raises");
            assert_eq!(err.hook, Hook::OnStarting);
            let ok = py
                .eval(c"lambda server: None", None, None)
                .expect("lambda")
                .unbind();
            assert!(
                call_hook(py, &ok, Hook::OnExit, || Ok(vec![py.None().into_bound(py)])).is_ok()
            );
        });
    }
}
