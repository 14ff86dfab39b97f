//! Response bytes on their way to the client socket.
//!
//! Writes never block the worker for long: bytes the socket does not take right away stay in the
//! buffer and the event loop finishes sending them when the socket becomes writable. Only a
//! streaming response that runs ahead of a slow reader by more than [`HIGH_WATER`] waits for
//! the socket (with the GIL released, and at most `write_timeout`), which bounds memory.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use pyo3::Python;

/// Buffered bytes beyond which a streaming response waits for the client.
pub const HIGH_WATER: usize = 1024 * 1024;

/// Buffered bytes beyond which a write is attempted while the app still produces output.
pub const FLUSH_AT: usize = 64 * 1024;

/// The socket of one connection and the bytes not yet written to it.
#[derive(Debug)]
pub struct Output {
    fd: RawFd,
    /// Bytes waiting to be written, oldest first.
    pub buf: Vec<u8>,
    write_timeout: Duration,
}

impl Output {
    /// An output for the connected socket `fd` (non-blocking), starting with `pending` bytes.
    pub fn new(fd: RawFd, pending: Vec<u8>, write_timeout: Duration) -> Self {
        Self {
            fd,
            buf: pending,
            write_timeout,
        }
    }

    /// Writes what the socket takes now; returns true when the buffer is empty.
    ///
    /// # Errors
    /// The peer is gone (EPIPE, ECONNRESET) or another socket error.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        let mut written = 0;
        let result = loop {
            if written == self.buf.len() {
                break Ok(true);
            }
            match nix::unistd::write(self.borrowed(), &self.buf[written..]) {
                Ok(n) => written += n,
                Err(nix::errno::Errno::EAGAIN) => break Ok(false),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => break Err(io::Error::from(e)),
            }
        };
        self.buf.drain(..written);
        result
    }

    /// Called as the app produces output: writes when enough is buffered, and waits for a slow
    /// reader only when the buffer passes [`HIGH_WATER`].
    ///
    /// # Errors
    /// The peer is gone, or did not read for `write_timeout`.
    pub fn pump(&mut self, py: Python<'_>) -> io::Result<()> {
        if self.buf.len() < FLUSH_AT {
            return Ok(());
        }
        if self.try_flush()? || self.buf.len() < HIGH_WATER {
            return Ok(());
        }
        let deadline = Instant::now() + self.write_timeout;
        while self.buf.len() >= FLUSH_AT {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client stopped reading",
                ));
            }
            let fd = self.fd;
            py.detach(|| wait_writable(fd, left))?;
            self.try_flush()?;
        }
        Ok(())
    }

    /// Writes everything buffered, waiting for the client as needed (before a sendfile).
    ///
    /// # Errors
    /// The peer is gone, or did not read for `write_timeout`.
    pub fn drain(&mut self, py: Python<'_>) -> io::Result<()> {
        let deadline = Instant::now() + self.write_timeout;
        while !self.try_flush()? {
            self.wait(py, deadline)?;
        }
        Ok(())
    }

    /// Sends `count` bytes of `file` from `offset` with sendfile(2): no copy through user space.
    ///
    /// # Errors
    /// The peer is gone, the client stopped reading, or the file is shorter than promised.
    pub fn send_file(
        &mut self,
        py: Python<'_>,
        file: BorrowedFd<'_>,
        mut offset: i64,
        count: usize,
    ) -> io::Result<()> {
        self.drain(py)?;
        let mut left = count;
        let mut deadline = Instant::now() + self.write_timeout;
        while left > 0 {
            match nix::sys::sendfile::sendfile64(self.borrowed(), file, Some(&mut offset), left) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file ended early",
                    ));
                }
                Ok(n) => {
                    left -= n;
                    deadline = Instant::now() + self.write_timeout;
                }
                Err(nix::errno::Errno::EAGAIN) => self.wait(py, deadline)?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    fn wait(&self, py: Python<'_>, deadline: Instant) -> io::Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ));
        }
        let fd = self.fd;
        py.detach(|| wait_writable(fd, left))
    }

    fn borrowed(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` is the connection's socket; the connection owns it and is neither closed
        // nor dropped while a request (and so this Output) is in progress on it.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// Blocks until `fd` is writable or `timeout` passes.
fn wait_writable(fd: RawFd, timeout: Duration) -> io::Result<()> {
    // SAFETY: `fd` is an Output's socket (see Output::borrowed): open for the whole request,
    // and the borrow ends with this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(borrowed, PollFlags::POLLOUT)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}
