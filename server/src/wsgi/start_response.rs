//! `start_response` and the `write()` callable it returns (PEP 3333), with the response state
//! they share with the server: status, headers, framing and the output buffer.

use std::os::fd::AsFd;

use pyo3::exceptions::{PyAssertionError, PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::http::{DateCache, ResponsePlan, Version};
use crate::wsgi::file_wrapper::SendfileSource;
use crate::wsgi::output::Output;

/// The response of one request as the app builds it.
#[pyclass(module = "forkscope", name = "StartResponse")]
pub struct StartResponse {
    version: Version,
    head_request: bool,
    request_keep_alive: bool,
    /// Status and headers from the latest `start_response` call, until they are sent.
    pending: Option<(String, Vec<(String, String)>)>,
    /// Set once the head is in the output buffer.
    plan: Option<ResponsePlan>,
    /// Where the bytes go.
    pub(crate) out: Output,
}

thread_local! {
    /// Each thread keeps its own cached Date header value (the cache is not `Sync`).
    static DATE: DateCache = const { DateCache::new() };
}

impl StartResponse {
    /// A fresh response for a request of `version`.
    pub fn new(
        version: Version,
        head_request: bool,
        request_keep_alive: bool,
        out: Output,
    ) -> Self {
        Self {
            version,
            head_request,
            request_keep_alive,
            pending: None,
            plan: None,
            out,
        }
    }

    /// True once `start_response` was called.
    pub fn started(&self) -> bool {
        self.pending.is_some() || self.plan.is_some()
    }

    /// True once the head was put on the wire (or in the buffer).
    pub fn head_sent(&self) -> bool {
        self.plan.is_some()
    }

    /// The response plan, once the head is sent.
    pub fn plan(&self) -> Option<&ResponsePlan> {
        self.plan.as_ref()
    }

    /// Takes the headers the app gave, sent or not (for the access log and `post_request`);
    /// call once the response is finished.
    pub fn take_headers(&mut self) -> Vec<(String, String)> {
        self.pending
            .as_mut()
            .map(|(_, h)| std::mem::take(h))
            .unwrap_or_default()
    }

    /// Validates and encodes the head; the status and headers stay readable for the access log.
    fn send_head(&mut self) -> PyResult<()> {
        if self.plan.is_some() {
            return Ok(());
        }
        let Some((status, headers)) = &self.pending else {
            return Err(PyAssertionError::new_err(
                "the application returned data before calling start_response",
            ));
        };
        let plan = ResponsePlan::new(
            self.version,
            self.head_request,
            self.request_keep_alive,
            status,
            headers,
        )
        .map_err(|e| PyRuntimeError::new_err(format!("invalid response head: {e}")))?;
        DATE.with(|date| plan.write_head(&mut self.out.buf, date));
        self.plan = Some(plan);
        Ok(())
    }

    /// Appends body bytes (sending the head first), writing to the socket when enough is buffered.
    pub fn send_body(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        self.send_head()?;
        let plan = self.plan.as_mut().expect("send_head set the plan");
        plan.write_body(data, &mut self.out.buf);
        self.out.pump(py).map_err(PyErr::from)
    }

    /// Sends the rest of an open file (from `offset`) as body with sendfile(2), framed like
    /// any other body piece.
    pub fn send_file(&mut self, py: Python<'_>, source: &SendfileSource) -> PyResult<()> {
        self.send_head()?;
        let plan = self.plan.as_mut().expect("send_head set the plan");
        let framed = plan.frame_body(source.len, &mut self.out.buf);
        if framed.take > 0 {
            self.out
                .send_file(py, source.file.as_fd(), source.offset, framed.take)?;
        }
        self.out.buf.extend_from_slice(framed.suffix);
        Ok(())
    }

    /// Ends the body. Returns whether the connection may be kept alive.
    pub fn finish(&mut self) -> PyResult<bool> {
        self.send_head()?;
        let plan = self.plan.as_mut().expect("send_head set the plan");
        let complete = plan.finish(&mut self.out.buf);
        Ok(complete && plan.keep_alive())
    }
}

fn extract_headers(headers: &Bound<'_, PyAny>) -> PyResult<Vec<(String, String)>> {
    let list = headers
        .cast::<PyList>()
        .map_err(|_| PyTypeError::new_err("response headers must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for item in list.iter() {
        let pair = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err("each response header must be a (name, value) tuple")
        })?;
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "each response header must be a (name, value) tuple",
            ));
        }
        let name = pair.get_item(0)?;
        let value = pair.get_item(1)?;
        let (Ok(name), Ok(value)) = (name.cast::<PyString>(), value.cast::<PyString>()) else {
            return Err(PyTypeError::new_err("header names and values must be str"));
        };
        out.push((name.to_str()?.to_owned(), latin1(value)?));
    }
    Ok(out)
}

/// Header values are latin-1 text (PEP 3333); anything else is an app error.
fn latin1(value: &Bound<'_, PyString>) -> PyResult<String> {
    let s = value.to_str()?;
    if s.chars().all(|c| (c as u32) < 256) {
        Ok(s.to_owned())
    } else {
        Err(PyTypeError::new_err(format!(
            "header value {s:?} is not latin-1"
        )))
    }
}

#[pymethods]
impl StartResponse {
    /// `start_response(status, response_headers, exc_info=None)`.
    #[pyo3(signature = (status, headers, exc_info=None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let exc_info = exc_info.filter(|e| !e.is_none());
        {
            let mut this = slf.borrow_mut();
            match exc_info {
                Some(info) if this.head_sent() => {
                    // PEP 3333: too late to change the response; re-raise the app's exception.
                    return Err(PyErr::from_value(info.get_item(1)?));
                }
                None if this.started() => {
                    return Err(PyAssertionError::new_err(
                        "start_response called a second time without exc_info",
                    ));
                }
                _ => {}
            }
            let status = status
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("status must be str"))?
                .to_str()?
                .to_owned();
            this.pending = Some((status, extract_headers(headers)?));
        }
        // The write() callable of PEP 3333 is a bound method of this object.
        slf.getattr(pyo3::intern!(slf.py(), "write"))
    }

    /// `wsgi.early_hints(headers)`: sends a `103 Early Hints` interim response (HTTP/1.1
    /// clients only, and only before the final head), as gunicorn does.
    fn early_hints(&mut self, headers: &Bound<'_, PyAny>) -> PyResult<()> {
        let headers = extract_headers(headers)?;
        if self.head_sent() || self.version != Version::Http11 {
            return Ok(());
        }
        let mut interim = b"HTTP/1.1 103 Early Hints\r\n".to_vec();
        for (name, value) in &headers {
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !token || value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Err(PyRuntimeError::new_err(format!(
                    "invalid early hint header {name:?}"
                )));
            }
            interim.extend_from_slice(name.as_bytes());
            interim.extend_from_slice(b": ");
            interim.extend(value.trim_matches([' ', '\t']).chars().map(|c| c as u8));
            interim.extend_from_slice(b"\r\n");
        }
        interim.extend_from_slice(b"\r\n");
        self.out.buf.extend_from_slice(&interim);
        self.out.try_flush().map(|_| ()).map_err(PyErr::from)
    }

    /// The `write(data)` callable for legacy apps: sends `data` right away.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let bytes = data
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("write() argument must be bytes"))?;
        self.send_body(py, bytes.as_bytes())?;
        self.out.try_flush().map(|_| ()).map_err(PyErr::from)
    }
}
