//! `wsgi.file_wrapper`: iterates a file-like object in blocks and closes it with the response.

use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The `wsgi.file_wrapper` class (PEP 3333, "Optional Platform-Specific File Handling").
#[pyclass(module = "forkscope", name = "FileWrapper")]
pub struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

/// A regular file to send with sendfile(2).
#[derive(Debug)]
pub struct SendfileSource {
    /// Our own duplicate of the app's descriptor: sendfile runs without the GIL, when another
    /// thread of the app may close the file object and the number be reused for another file.
    pub file: OwnedFd,
    /// The reader's position, where sending starts.
    pub offset: i64,
    /// Bytes from `offset` to the end of the file.
    pub len: usize,
}

impl FileWrapper {
    /// The open file behind the wrapper, when it is a regular file that sendfile(2) can read
    /// (`None` for pipes, sockets, BytesIO...).
    pub fn sendfile_source(&self, py: Python<'_>) -> Option<SendfileSource> {
        let f = self.filelike.bind(py);
        // Python code first: tell() flushes the reader's buffer (so the position is the
        // reader's) and may release the GIL on the way.
        let offset: i64 = f.call_method0("tell").ok()?.extract().ok()?;
        let fd: RawFd = f.call_method0("fileno").ok()?.extract().ok()?;
        // No Python code runs between fileno() and the duplicate and the GIL is held, so no
        // thread of the app can close the number in between.
        let file = duplicate(fd)?;
        let stat = nix::sys::stat::fstat(file.as_fd()).ok()?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return None;
        }
        let len = usize::try_from(stat.st_size - offset).ok()?;
        Some(SendfileSource { file, offset, len })
    }
}

/// A close-on-exec duplicate of `fd`; `None` when `fd` is not an open descriptor.
fn duplicate(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes any integer (a closed or bogus one fails with EBADF)
    // and touches no memory of ours.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return None;
    }
    // SAFETY: the kernel just created `copy` for us; nothing else owns or closes it.
    Some(unsafe { OwnedFd::from_raw_fd(copy) })
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
