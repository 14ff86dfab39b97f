//! `wsgi.file_wrapper`: iterates a file-like object in blocks and closes it with the response.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The `wsgi.file_wrapper` class (PEP 3333, "Optional Platform-Specific File Handling").
#[pyclass(module = "forkscope", name = "FileWrapper")]
pub struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

impl FileWrapper {
    /// The open file behind the wrapper, its position and what is left of it, when it is a
    /// regular file that sendfile(2) can read (`None` for pipes, sockets, BytesIO...).
    pub fn sendfile_source(&self, py: Python<'_>) -> Option<(i32, i64, usize)> {
        let f = self.filelike.bind(py);
        let fd: i32 = f.call_method0("fileno").ok()?.extract().ok()?;
        // Flush Python-side buffers so the descriptor's position is the reader's position.
        let offset: i64 = f.call_method0("tell").ok()?.extract().ok()?;
        // SAFETY: fstat on a descriptor the file object owns and keeps open.
        let stat =
            nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).ok()?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let left = usize::try_from(stat.st_size - offset).ok()?;
        Some((fd, offset, left))
    }
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize=8192))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> Self {
        Self {
            filelike,
            blksize: blksize.max(1),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let data = self
            .filelike
            .bind(py)
            .call_method1("read", (self.blksize,))?;
        let empty = match data.cast::<PyBytes>() {
            Ok(b) => b.as_bytes().is_empty(),
            Err(_) => data.len().map(|n| n == 0).unwrap_or(true),
        };
        Ok((!empty).then_some(data))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let f = self.filelike.bind(py);
        if f.hasattr("close")? {
            f.call_method0("close")?;
        }
        Ok(())
    }
}
