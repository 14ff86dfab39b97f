//! Sending signals only to processes the sidecar identified, and only if they are still the
//! same process: a pidfd is opened first, the start time is checked through `/proc`, and the
//! signal goes through the pidfd, so a PID reused between check and send is never hit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::discovery::{ProcSource, ProcessKey};

/// The signals the sidecar sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Profiler doorbell (workers).
    Usr2,
    /// Reload (leader).
    Hup,
    /// One more worker (leader).
    Ttin,
    /// One worker less (leader).
    Ttou,
    /// Reopen logs (leader).
    Usr1,
}

impl Signal {
    /// The signal number.
    pub fn number(self) -> libc::c_int {
        match self {
            Signal::Usr2 => libc::SIGUSR2,
            Signal::Hup => libc::SIGHUP,
            Signal::Ttin => libc::SIGTTIN,
            Signal::Ttou => libc::SIGTTOU,
            Signal::Usr1 => libc::SIGUSR1,
        }
    }

    /// `SIGUSR2`, ... as shown in API answers and logs.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Usr2 => "SIGUSR2",
            Signal::Hup => "SIGHUP",
            Signal::Ttin => "SIGTTIN",
            Signal::Ttou => "SIGTTOU",
            Signal::Usr1 => "SIGUSR1",
        }
    }
}

/// Why a signal was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The process exited, or its PID now belongs to another process.
    #[error("process {0} is gone (exited or its PID was reused)")]
    Gone(u32),
    /// The kernel refused (typically EPERM: the sidecar runs as another user and lacks CAP_KILL).
    #[error("signal to process {pid} refused: {source}")]
    Refused {
        /// The target.
        pid: u32,
        /// The errno.
        source: io::Error,
    },
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send(fd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `signal` to the process `key` if it still is that process.
///
/// # Errors
/// [`SignalError::Gone`] when the process exited or the PID was reused; `Refused` when the
/// kernel denies the signal.
pub fn send(source: &ProcSource, key: ProcessKey, signal: Signal) -> Result<(), SignalError> {
    let pidfd = match pidfd_open(key.pid) {
        Ok(fd) => Some(fd),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(SignalError::Gone(key.pid)),
        // Kernels before 5.3 have no pidfd: check then kill (a tiny reuse window remains).
        Err(_) => None,
    };
    // The pidfd names whichever process had the PID when it was opened. If /proc shows the
    // expected start time now, that process is the one we discovered, and a signal through the
    // pidfd cannot reach a later process that reuses the PID.
    if source.lookup(key).is_none() {
        return Err(SignalError::Gone(key.pid));
    }
    let result = match &pidfd {
        Some(fd) => pidfd_send(fd, signal.number()),
        None => {
            // SAFETY: kill takes a PID and a signal number.
            let rc = unsafe { libc::kill(key.pid as libc::pid_t, signal.number()) };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    result.map_err(|source| {
        if source.raw_os_error() == Some(libc::ESRCH) {
            SignalError::Gone(key.pid)
        } else {
            SignalError::Refused {
                pid: key.pid,
                source,
            }
        }
    })
}
