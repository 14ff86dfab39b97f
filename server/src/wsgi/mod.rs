//! The WSGI (PEP 3333) bridge between a parsed request and the Python application.
//!
//! [`Wsgi::handle`] runs one request: it completes a copy of the per-worker base environ, calls
//! the app, streams what it returns (lists and tuples on a fast path, any other iterable as it
//! yields), and always calls the iterable's `close()`. An app error becomes a 500 with the
//! traceback in the error log; the worker lives on.

pub mod environ;
pub mod file_wrapper;
pub mod input;
pub mod output;
pub mod start_response;
pub mod strings;

use std::os::fd::RawFd;
use std::time::Duration;

use pyo3::exceptions::{PySystemExit, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::http::RequestHead;
use crate::logging::access::{AccessLog, AccessRecord};
use environ::Peer;
use input::Body;
use output::Output;
use start_response::StartResponse;

/// A complete request, ready for the app.
#[derive(Debug)]
pub struct Request {
    /// The parsed head.
    pub head: RequestHead,
    /// The whole body.
    pub body: Body,
    /// The connection's two ends.
    pub peer: Peer,
}

/// How a request ended, for the connection and the access log.
#[derive(Debug, Default)]
pub struct Completion {
    /// The connection may serve another request.
    pub keep_alive: bool,
    /// Response bytes not written yet; the event loop sends them.
    pub pending: Vec<u8>,
    /// The status code sent (500 when the app failed before its head).
    pub status: u16,
    /// Body bytes sent.
    pub bytes_sent: u64,
    /// The app's response headers (for `%({name}o)s` in the access log).
    pub headers: Vec<(String, String)>,
    /// The app raised `SystemExit` (a quick-stop signal arrived): the worker must exit now.
    pub exit: bool,
    /// The request ended in an exception (the app's, or a failed write to the client).
    pub raised: bool,
}

/// The application and what every request shares.
pub struct Wsgi {
    app: Py<PyAny>,
    base: Py<PyDict>,
    script_name: String,
    write_timeout: Duration,
    access: Option<AccessLog>,
}

const INTERNAL_ERROR: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\n\
Connection: close\r\nContent-Type: text/html\r\nContent-Length: 141\r\n\r\n\
<html>\n  <head>\n    <title>Internal Server Error</title>\n  </head>\n  <body>\n    \
<h1><p>Internal Server Error</p></h1>\n    \n  </body>\n</html>\n";

impl Wsgi {
    /// Prepares the per-worker state for `app`.
    ///
    /// # Errors
    /// Only if basic Python objects cannot be created.
    pub fn new(
        py: Python<'_>,
        app: Py<PyAny>,
        multiprocess: bool,
        multithread: bool,
        write_timeout: Duration,
        access: Option<AccessLog>,
    ) -> PyResult<Self> {
        // gunicorn takes SCRIPT_NAME from the process environment (or `-e SCRIPT_NAME=...`).
        let script_name = std::env::var("SCRIPT_NAME").unwrap_or_default();
        let base = environ::request_template(py, multiprocess, multithread, &script_name)?.unbind();
        Ok(Self {
            app,
            base,
            script_name,
            write_timeout,
            access,
        })
    }

    /// Reopens the access log (USR1).
    pub fn reopen_access_log(&self) {
        if let Some(access) = &self.access
            && let Err(e) = access.reopen()
        {
            log::error!("cannot reopen the access log: {e}");
        }
    }

    /// Runs one request on connection `fd`, after the `pending` bytes of earlier responses,
    /// and writes its access-log line.
    pub fn handle(&self, py: Python<'_>, req: Request, fd: RawFd, pending: Vec<u8>) -> Completion {
        let Some(access) = &self.access else {
            return self.respond(py, req, fd, pending);
        };
        let start = std::time::SystemTime::now();
        let timer = std::time::Instant::now();
        let head = req.head.clone();
        let remote = req
            .peer
            .remote
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let done = self.respond(py, req, fd, pending);
        access.log(&AccessRecord {
            remote_addr: &remote,
            method: &head.method,
            path: &String::from_utf8_lossy(&head.path),
            query: &String::from_utf8_lossy(&head.query),
            version: head.version.as_str(),
            status: done.status,
            response_length: Some(done.bytes_sent),
            request_headers: &head.headers,
            response_headers: &done.headers,
            request_time: timer.elapsed(),
            start,
            pid: std::process::id(),
            environ: None,
        });
        done
    }

    fn respond(&self, py: Python<'_>, mut req: Request, fd: RawFd, pending: Vec<u8>) -> Completion {
        let head_request = req.head.method == "HEAD";
        let out = Output::new(fd, pending, self.write_timeout);
        let response = StartResponse::new(req.head.version, head_request, req.head.keep_alive, out);
        let response = match Bound::new(py, response) {
            Ok(r) => r,
            Err(e) => {
                log::error!("cannot create start_response: {e}");
                return Completion::default();
            }
        };
        let outcome = self.run_app(py, &mut req, &response);
        let mut state = response.borrow_mut();
        let mut done = Completion::default();
        match outcome.and_then(|()| state.finish()) {
            Ok(keep_alive) => {
                done.keep_alive = keep_alive;
                if let Some(plan) = state.plan() {
                    done.status = plan.status_code();
                    done.bytes_sent = plan.bytes_sent();
                }
            }
            Err(err) => {
                done.exit = err.is_instance_of::<PySystemExit>(py);
                done.raised = !done.exit;
                if !done.exit {
                    let path = String::from_utf8_lossy(&req.head.path).into_owned();
                    log::error!(
                        "Error handling request {path}\n{}",
                        crate::python::format_exception(err)
                    );
                }
                if !state.head_sent() {
                    state.out.buf.extend_from_slice(INTERNAL_ERROR);
                    done.status = 500;
                } else if let Some(plan) = state.plan() {
                    done.status = plan.status_code();
                    done.bytes_sent = plan.bytes_sent();
                }
                done.keep_alive = false;
            }
        }
        // Moved, not copied: the response state ends here.
        done.headers = state.take_headers();
        // What is not written yet is the event loop's to send: it writes the responses of one
        // batch of events together (see `worker::EventLoop::flush_deferred`).
        done.pending = std::mem::take(&mut state.out.buf);
        done
    }

    fn run_app(
        &self,
        py: Python<'_>,
        req: &mut Request,
        response: &Bound<'_, StartResponse>,
    ) -> PyResult<()> {
        let env = self.base.bind(py).copy()?;
        environ::fill(
            py,
            &env,
            environ::Start::Template,
            &req.head,
            &req.peer,
            &self.script_name,
        )?;
        let body = std::mem::replace(&mut req.body, Body::empty());
        env.set_item(pyo3::intern!(py, "wsgi.input"), input::for_body(py, body)?)?;
        env.set_item(
            pyo3::intern!(py, "wsgi.early_hints"),
            response.getattr(pyo3::intern!(py, "early_hints"))?,
        )?;
        let result = self.app.bind(py).call1((env, response))?;
        let streamed = stream(py, &result, response);
        let closed = close(&result);
        streamed.and(closed)
    }
}

/// Sends every item of the app's iterable.
fn stream(
    py: Python<'_>,
    result: &Bound<'_, PyAny>,
    response: &Bound<'_, StartResponse>,
) -> PyResult<()> {
    if let Ok(wrapper) = result.cast::<file_wrapper::FileWrapper>()
        && let Some(source) = wrapper.borrow().sendfile_source(py)
    {
        return response.borrow_mut().send_file(py, &source);
    }
    if let Ok(list) = result.cast::<PyList>() {
        for item in list.iter() {
            send_item(py, &item, response)?;
        }
        return Ok(());
    }
    if let Ok(tuple) = result.cast::<PyTuple>() {
        for item in tuple.iter() {
            send_item(py, &item, response)?;
        }
        return Ok(());
    }
    for item in result.try_iter()? {
        send_item(py, &item?, response)?;
    }
    Ok(())
}

fn send_item(
    py: Python<'_>,
    item: &Bound<'_, PyAny>,
    response: &Bound<'_, StartResponse>,
) -> PyResult<()> {
    let bytes = item.cast::<PyBytes>().map_err(|_| {
        PyTypeError::new_err(format!(
            "the application must yield bytes, not {}",
            item.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    response.borrow_mut().send_body(py, bytes.as_bytes())
}

/// PEP 3333: `close()` is called whether the iteration succeeded or not.
fn close(result: &Bound<'_, PyAny>) -> PyResult<()> {
    if result.cast::<PyList>().is_ok() || result.cast::<PyTuple>().is_ok() {
        return Ok(());
    }
    match result.getattr(pyo3::intern!(result.py(), "close")) {
        Ok(close) => close.call0().map(|_| ()),
        Err(_) => Ok(()),
    }
}
