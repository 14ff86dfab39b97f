//! Where a log goes: stdout, stderr or a file opened for appending, reopenable for rotation.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;

/// A log destination. Each line is written with `write(2)` directly on the file descriptor:
/// no userspace buffer, so nothing is lost at `fork()`, `_exit()` or a crash, and lines from
/// several processes appending to the same file do not interleave (`O_APPEND`).
#[derive(Debug)]
pub(crate) enum Sink {
    /// The process' standard output (`-` for the access log).
    Stdout,
    /// The process' standard error (`-` for the error log).
    Stderr,
    /// A file opened with `O_APPEND | O_CREAT | O_CLOEXEC`.
    File {
        /// The path, kept for [`Sink::reopen`].
        path: PathBuf,
        /// The open file.
        file: File,
    },
}

impl Sink {
    /// Opens `spec`: `-` means `dash` (stdout or stderr), anything else is a file path.
    pub(crate) fn open(spec: &str, dash: Sink) -> io::Result<Sink> {
        if spec == "-" {
            return Ok(dash);
        }
        let path = PathBuf::from(spec);
        let file = open_append(&path)?;
        Ok(Sink::File { path, file })
    }

    /// Writes one whole line (the caller includes the `\n`).
    pub(crate) fn write_line(&self, line: &[u8]) -> io::Result<()> {
        let stdout;
        let stderr;
        let fd: BorrowedFd<'_> = match self {
            Sink::Stdout => {
                stdout = io::stdout();
                stdout.as_fd()
            }
            Sink::Stderr => {
                stderr = io::stderr();
                stderr.as_fd()
            }
            Sink::File { file, .. } => file.as_fd(),
        };
        let mut rest = line;
        while !rest.is_empty() {
            match nix::unistd::write(fd, rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => rest = &rest[written..],
                Err(nix::errno::Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(())
    }

    /// Reopens a file sink at its path (after logrotate moved it); stdout/stderr stay as they
    /// are. The old file is closed only once the new one is open.
    pub(crate) fn reopen(&mut self) -> io::Result<()> {
        if let Sink::File { path, file } = self {
            *file = open_append(path)?;
        }
        Ok(())
    }
}

fn open_append(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}
