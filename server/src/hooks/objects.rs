//! The Python objects hooks receive: gunicorn's arbiter (`server`), worker, request and
//! response objects, and the logger they carry.
//!
//! Config files written for gunicorn read a few attributes of them (`server.pid`,
//! `server.log.info(..)`, `server.cfg.workers`, `worker.pid`, `worker.age`, `worker.alive`)
//! and sometimes store their own, so each has those attributes (plus `worker.slot`, the stable
//! slot) and a `__dict__`.

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::settings::Settings;

/// The `log` attribute of the server and worker objects: gunicorn's logger methods, writing
/// to forkscope's error log (`msg % args`, as `logging` formats).
#[pyclass(name = "Logger", module = "forkscope.hooks", frozen)]
pub struct HookLog;

fn render(msg: &Bound<'_, PyAny>, args: &Bound<'_, PyTuple>) -> PyResult<String> {
    if args.is_empty() {
        return Ok(msg.str()?.to_string());
    }
    let args = if args.len() == 1 {
        // logging's rule: a single mapping argument is used as the mapping.
        let first = args.get_item(0)?;
        if first.cast::<PyDict>().is_ok() {
            first
        } else {
            args.clone().into_any()
        }
    } else {
        args.clone().into_any()
    };
    Ok(msg.str()?.into_any().rem(args)?.str()?.to_string())
}

#[pymethods]
impl HookLog {
    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn debug(
        &self,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        log::debug!("{}", render(msg, args)?);
        Ok(())
    }

    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn info(
        &self,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        log::info!("{}", render(msg, args)?);
        Ok(())
    }

    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn warning(
        &self,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        log::warn!("{}", render(msg, args)?);
        Ok(())
    }

    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn error(
        &self,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        log::error!("{}", render(msg, args)?);
        Ok(())
    }

    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn critical(
        &self,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        crate::critical!("{}", render(msg, args)?);
        Ok(())
    }

    /// `error` plus the traceback of the exception being handled.
    #[pyo3(signature = (msg, *args, **_kwargs))]
    fn exception(
        &self,
        py: Python<'_>,
        msg: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let tb: String = py
            .import("traceback")?
            .call_method0("format_exc")?
            .extract()?;
        log::error!("{}\n{}", render(msg, args)?, tb.trim_end());
        Ok(())
    }
}

/// gunicorn's arbiter as hooks see it: the leader.
#[pyclass(name = "Server", module = "forkscope.hooks", dict)]
pub struct ServerObject {
    /// The leader's PID.
    #[pyo3(get)]
    pub pid: u32,
    /// The settings, as attributes named like gunicorn's (`cfg.workers`, `cfg.bind`, ...).
    #[pyo3(get, set)]
    pub cfg: Py<PyAny>,
    /// The error log.
    #[pyo3(get)]
    pub log: Py<HookLog>,
    /// The number of workers the leader keeps.
    #[pyo3(get, set)]
    pub num_workers: u32,
    /// The name in process titles.
    #[pyo3(get, set)]
    pub proc_name: String,
    /// `--timeout` in seconds.
    #[pyo3(get, set)]
    pub timeout: u64,
}

/// gunicorn's worker object as hooks see it.
#[pyclass(name = "Worker", module = "forkscope.hooks", dict)]
pub struct WorkerObject {
    /// The worker's PID; `"[booting]"` before the fork (in `pre_fork`), as in gunicorn.
    #[pyo3(get, set)]
    pub pid: Py<PyAny>,
    /// The leader's PID.
    #[pyo3(get)]
    pub ppid: u32,
    /// Spawn order across the leader's life.
    #[pyo3(get)]
    pub age: u64,
    /// The stable slot (forkscope's addition: the `N` of `worker N` in the process title).
    #[pyo3(get)]
    pub slot: u32,
    /// False once the worker was told to stop.
    #[pyo3(get, set)]
    pub alive: bool,
    /// True once the app is loaded and the worker serves.
    #[pyo3(get, set)]
    pub booted: bool,
    /// `--timeout` in seconds.
    #[pyo3(get)]
    pub timeout: u64,
    /// `--max-requests` (0 = never retire).
    #[pyo3(get)]
    pub max_requests: u64,
    /// The settings (see [`ServerObject::cfg`]).
    #[pyo3(get)]
    pub cfg: Py<PyAny>,
    /// The error log.
    #[pyo3(get)]
    pub log: Py<HookLog>,
}

#[pymethods]
impl WorkerObject {
    fn __repr__(&self, py: Python<'_>) -> String {
        let pid = self
            .pid
            .bind(py)
            .str()
            .map(|s| s.to_string())
            .unwrap_or_default();
        format!("<Worker {pid} slot={} age={}>", self.slot, self.age)
    }
}

/// `settings` as a `types.SimpleNamespace` with gunicorn's setting names as attributes.
///
/// # Errors
/// Only if `json` or `types` are unusable.
pub fn cfg_object(py: Python<'_>, settings: &Settings) -> PyResult<Py<PyAny>> {
    let text = serde_json::to_string(settings)
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    let values = py.import("json")?.call_method1("loads", (text,))?;
    let values = values.cast_into::<PyDict>()?;
    Ok(py
        .import("types")?
        .getattr("SimpleNamespace")?
        .call((), Some(&values))?
        .unbind())
}

/// The leader's object for hooks.
///
/// # Errors
/// Only if basic Python objects cannot be created.
pub fn server_object(
    py: Python<'_>,
    settings: &Settings,
    proc_name: &str,
    num_workers: u32,
) -> PyResult<Py<ServerObject>> {
    Py::new(
        py,
        ServerObject {
            pid: std::process::id(),
            cfg: cfg_object(py, settings)?,
            log: Py::new(py, HookLog)?,
            num_workers,
            proc_name: proc_name.to_owned(),
            timeout: settings.timeout,
        },
    )
}

/// A worker's object for hooks, before the fork (`pid` is `"[booting]"`).
///
/// # Errors
/// Only if basic Python objects cannot be created.
pub fn worker_object(
    py: Python<'_>,
    server: &Py<ServerObject>,
    slot: u32,
    age: u64,
    max_requests: u64,
) -> PyResult<Py<WorkerObject>> {
    let s = server.borrow(py);
    Py::new(
        py,
        WorkerObject {
            pid: "[booting]".into_pyobject(py)?.into_any().unbind(),
            ppid: std::process::id(),
            age,
            slot,
            alive: true,
            booted: false,
            timeout: s.timeout,
            max_requests,
            cfg: s.cfg.clone_ref(py),
            log: s.log.clone_ref(py),
        },
    )
}

/// gunicorn's `Request` as `pre_request`/`post_request` see it.
#[pyclass(name = "Request", module = "forkscope.hooks", dict)]
pub struct RequestObject {
    /// The method (`GET`).
    #[pyo3(get)]
    pub method: String,
    /// The raw request target (`/path?query`).
    #[pyo3(get)]
    pub uri: String,
    /// The path.
    #[pyo3(get)]
    pub path: String,
    /// The query string, without `?`.
    #[pyo3(get)]
    pub query: String,
    /// `(1, 1)` or `(1, 0)`.
    #[pyo3(get)]
    pub version: (u8, u8),
    /// Header fields as `(NAME, value)`, names upper-cased as gunicorn gives them.
    #[pyo3(get)]
    pub headers: Vec<(String, String)>,
}

/// gunicorn's `Response` as `post_request` sees it.
#[pyclass(name = "Response", module = "forkscope.hooks", dict)]
pub struct ResponseObject {
    /// The status line's code and reason, e.g. `"200 OK"`.
    #[pyo3(get)]
    pub status: String,
    /// The status code.
    #[pyo3(get)]
    pub status_code: u16,
    /// The application's response headers.
    #[pyo3(get)]
    pub headers: Vec<(String, String)>,
    /// Body bytes sent.
    #[pyo3(get)]
    pub sent: u64,
}

/// The request object for `head`.
pub fn request_object(head: &crate::http::RequestHead) -> RequestObject {
    let text = |b: &[u8]| b.iter().map(|&c| c as char).collect::<String>();
    RequestObject {
        method: head.method.to_string(),
        uri: text(&head.target),
        path: text(&head.path),
        query: text(&head.query),
        version: match head.version.as_str() {
            "HTTP/1.0" => (1, 0),
            _ => (1, 1),
        },
        headers: head
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_uppercase(), text(v)))
            .collect(),
    }
}

/// The response object for a finished request.
pub fn response_object(
    py: Python<'_>,
    status: u16,
    headers: &[(String, String)],
    sent: u64,
) -> ResponseObject {
    let reason = py
        .import("http")
        .and_then(|m| m.getattr("HTTPStatus")?.call1((status,))?.getattr("phrase"))
        .and_then(|p| p.extract::<String>())
        .unwrap_or_default();
    ResponseObject {
        status: format!("{status} {reason}").trim_end().to_owned(),
        status_code: status,
        headers: headers.to_vec(),
        sent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_messages_are_formatted_like_logging() {
        Python::initialize();
        Python::attach(|py| {
            let msg = "%s workers, %d%%"
                .into_pyobject(py)
                .expect("str")
                .into_any();
            let args = PyTuple::new(
                py,
                [
                    "3".into_pyobject(py).expect("s").into_any(),
                    50i64.into_pyobject(py).expect("i").into_any(),
                ],
            )
            .expect("tuple");
            assert_eq!(render(&msg, &args).expect("render"), "3 workers, 50%");
            let plain = "100% plain".into_pyobject(py).expect("str").into_any();
            assert_eq!(
                render(&plain, &PyTuple::empty(py)).expect("render"),
                "100% plain"
            );
        });
    }
}
