//! `wsgi.input`: the request body as a file-like object (read, readline, readlines, iteration).
//!
//! The worker's event loop receives the whole body before the app runs, so a slow uploader
//! never holds the worker: small bodies stay in memory, larger ones are spilled to an unlinked
//! temporary file as they arrive ([`Body::Spilled`]), which keeps memory bounded for uploads of
//! any size.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

use pyo3::exceptions::{PyIOError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

/// Bodies up to this size are kept in memory; larger ones go to a temporary file.
pub const SPILL_THRESHOLD: usize = 1024 * 1024;

/// A complete request body.
#[derive(Debug)]
pub enum Body {
    /// Held in memory.
    Memory(Vec<u8>),
    /// Spilled to an unlinked temporary file, rewound to the start.
    Spilled(File),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Body::Memory(Vec::new())
    }
}

enum Source {
    Memory { data: Vec<u8>, pos: usize },
    File(BufReader<File>),
}

/// The `wsgi.input` object handed to the app.
#[pyclass(module = "forkscope", name = "WsgiInput")]
pub struct WsgiInput {
    source: Source,
}

impl WsgiInput {
    /// Wraps a received body.
    pub fn new(body: Body) -> io::Result<Self> {
        let source = match body {
            Body::Memory(data) => Source::Memory { data, pos: 0 },
            Body::Spilled(mut file) => {
                file.seek(SeekFrom::Start(0))?;
                Source::File(BufReader::with_capacity(64 * 1024, file))
            }
        };
        Ok(Self { source })
    }

    /// Reads up to `limit` bytes (all when `None`).
    fn read_bytes(&mut self, limit: Option<usize>) -> io::Result<Vec<u8>> {
        match &mut self.source {
            Source::Memory { data, pos } => {
                let rest = &data[*pos..];
                let n = limit.map_or(rest.len(), |l| l.min(rest.len()));
                let out = rest[..n].to_vec();
                *pos += n;
                Ok(out)
            }
            Source::File(reader) => {
                let mut out = Vec::new();
                match limit {
                    Some(l) => {
                        reader.by_ref().take(l as u64).read_to_end(&mut out)?;
                    }
                    None => {
                        reader.read_to_end(&mut out)?;
                    }
                }
                Ok(out)
            }
        }
    }

    /// Reads one line including its `\n`, at most `limit` bytes.
    fn read_line(&mut self, limit: Option<usize>) -> io::Result<Vec<u8>> {
        match &mut self.source {
            Source::Memory { data, pos } => {
                let rest = &data[*pos..];
                let window = limit.map_or(rest, |l| &rest[..l.min(rest.len())]);
                let n = memchr::memchr(b'\n', window).map_or(window.len(), |i| i + 1);
                let out = rest[..n].to_vec();
                *pos += n;
                Ok(out)
            }
            Source::File(reader) => {
                let mut out = Vec::new();
                loop {
                    let remaining = limit.map_or(usize::MAX, |l| l - out.len());
                    if remaining == 0 {
                        break;
                    }
                    let buf = reader.fill_buf()?;
                    if buf.is_empty() {
                        break;
                    }
                    let window = &buf[..buf.len().min(remaining)];
                    match memchr::memchr(b'\n', window) {
                        Some(i) => {
                            out.extend_from_slice(&window[..=i]);
                            reader.consume(i + 1);
                            break;
                        }
                        None => {
                            let n = window.len();
                            out.extend_from_slice(window);
                            reader.consume(n);
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

thread_local! {
    /// One empty input per thread, shared by its requests without a body (most of them): an
    /// empty body has no position to move, so no request can tell it from a fresh one.
    static EMPTY: std::cell::OnceCell<Py<WsgiInput>> = const { std::cell::OnceCell::new() };
}

/// The `wsgi.input` for `body`: this thread's shared empty input when there is no body.
///
/// # Errors
/// The spilled body cannot be rewound, or the object cannot be created.
pub fn for_body(py: Python<'_>, body: Body) -> PyResult<Bound<'_, WsgiInput>> {
    if matches!(&body, Body::Memory(data) if data.is_empty()) {
        return EMPTY.with(|cell| {
            if let Some(empty) = cell.get() {
                return Ok(empty.bind(py).clone());
            }
            let empty = Bound::new(py, WsgiInput::new(Body::empty())?)?;
            let _ = cell.set(empty.clone().unbind());
            Ok(empty)
        });
    }
    Bound::new(py, WsgiInput::new(body)?)
}

/// Python passes `-1` or `None` for "no limit".
fn size_arg(size: Option<isize>) -> Option<usize> {
    size.and_then(|s| usize::try_from(s).ok())
}

fn io_error(e: io::Error) -> PyErr {
    PyIOError::new_err(e.to_string())
}

#[pymethods]
impl WsgiInput {
    /// `read(size=-1)`.
    #[pyo3(signature = (size=None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<isize>) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.read_bytes(size_arg(size)).map_err(io_error)?;
        Ok(PyBytes::new(py, &data))
    }

    /// `readline(size=-1)`.
    #[pyo3(signature = (size=None))]
    fn readline<'py>(
        &mut self,
        py: Python<'py>,
        size: Option<isize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.read_line(size_arg(size)).map_err(io_error)?;
        Ok(PyBytes::new(py, &data))
    }

    /// `readlines(hint=-1)`: lines until their total size reaches `hint`.
    #[pyo3(signature = (hint=None))]
    fn readlines<'py>(
        &mut self,
        py: Python<'py>,
        hint: Option<isize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let hint = size_arg(hint).filter(|h| *h > 0);
        let lines = PyList::empty(py);
        let mut total = 0;
        loop {
            let line = self.read_line(None).map_err(io_error)?;
            if line.is_empty() {
                break;
            }
            total += line.len();
            lines.append(PyBytes::new(py, &line))?;
            if hint.is_some_and(|h| total >= h) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let line = self.read_line(None).map_err(io_error)?;
        Ok((!line.is_empty()).then(|| PyBytes::new(py, &line)))
    }

    /// Seeking is not part of WSGI, but `seekable()` lets frameworks ask politely.
    fn seekable(&self) -> bool {
        false
    }

    fn readable(&self) -> bool {
        true
    }

    fn close(&self) {}

    #[allow(clippy::unused_self)]
    fn fileno(&self) -> PyResult<i32> {
        Err(PyValueError::new_err("wsgi.input has no file descriptor"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sources() -> Vec<WsgiInput> {
        let text = b"first line\nsecond\n\nlast-no-newline".to_vec();
        let mut file = tempfile::tempfile().expect("tempfile");
        file.write_all(&text).expect("write");
        vec![
            WsgiInput::new(Body::Memory(text)).expect("memory"),
            WsgiInput::new(Body::Spilled(file)).expect("file"),
        ]
    }

    #[test]
    fn lines_and_reads_agree_for_memory_and_file() {
        for mut input in sources() {
            assert_eq!(input.read_line(Some(5)).expect("read"), b"first");
            assert_eq!(input.read_line(None).expect("read"), b" line\n");
            assert_eq!(input.read_bytes(Some(3)).expect("read"), b"sec");
            assert_eq!(input.read_line(None).expect("read"), b"ond\n");
            assert_eq!(input.read_line(None).expect("read"), b"\n");
            assert_eq!(input.read_bytes(None).expect("read"), b"last-no-newline");
            assert_eq!(input.read_line(None).expect("read"), b"");
            assert_eq!(input.read_bytes(Some(10)).expect("read"), b"");
        }
    }
}
