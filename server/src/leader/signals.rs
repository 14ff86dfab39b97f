//! The leader's self-pipe: signal handlers only write the signal number to a pipe; the main
//! loop reads the pipe and acts, outside signal context.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

/// The signals the leader acts on, with gunicorn's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderSignal {
    /// A child exited: reap it.
    Child,
    /// Graceful stop.
    Term,
    /// Quick stop (INT and QUIT).
    Quit,
    /// Reload configuration and workers.
    Hup,
    /// One worker more.
    Ttin,
    /// One worker fewer.
    Ttou,
    /// Reopen log files.
    Usr1,
    /// Upgrade the binary in place.
    Usr2,
    /// Gracefully stop the workers, keep the leader.
    Winch,
}

impl LeaderSignal {
    fn from_raw(sig: i32) -> Option<Self> {
        Some(match Signal::try_from(sig).ok()? {
            Signal::SIGCHLD => Self::Child,
            Signal::SIGTERM => Self::Term,
            Signal::SIGINT | Signal::SIGQUIT => Self::Quit,
            Signal::SIGHUP => Self::Hup,
            Signal::SIGTTIN => Self::Ttin,
            Signal::SIGTTOU => Self::Ttou,
            Signal::SIGUSR1 => Self::Usr1,
            Signal::SIGUSR2 => Self::Usr2,
            Signal::SIGWINCH => Self::Winch,
            _ => return None,
        })
    }
}

const HANDLED: [Signal; 10] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; errno is saved and restored around it.
        unsafe {
            let saved = *libc::__errno_location();
            libc::write(fd, std::ptr::from_ref(&byte).cast(), 1);
            *libc::__errno_location() = saved;
        }
    }
}

/// The read end of the self-pipe, with the handlers installed.
pub struct SignalPipe {
    read: OwnedFd,
    _write: OwnedFd,
}

impl SignalPipe {
    /// Creates the pipe and installs the handlers (SA_RESTART, so the leader's own system calls
    /// are not interrupted).
    ///
    /// # Errors
    /// The pipe or a handler cannot be set up.
    pub fn install() -> nix::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        PIPE_WRITE.store(write.as_raw_fd(), Ordering::SeqCst);
        reinstall()?;
        Ok(Self {
            read,
            _write: write,
        })
    }

    /// Waits up to `timeout` for signals and returns them in arrival order (CHLD deduplicated).
    pub fn wait(&self, timeout: Duration) -> Vec<LeaderSignal> {
        let mut fds = [PollFd::new(
            // SAFETY: `read` is owned by self and open.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(self.read.as_raw_fd()) },
            PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = nix::unistd::read(&self.read, &mut buf) {
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if let Some(sig) = LeaderSignal::from_raw(i32::from(b))
                    && !(sig == LeaderSignal::Child && out.contains(&sig))
                {
                    out.push(sig);
                }
            }
        }
        out
    }
}

/// (Re)installs the handlers on the existing pipe: after a HUP re-imported a preloaded app,
/// whose import-time `signal.signal()` calls replace the leader's handlers.
///
/// # Errors
/// A handler cannot be installed.
pub fn reinstall() -> nix::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in HANDLED {
        // SAFETY: the handler only calls write(2) on a pipe.
        unsafe { sigaction(sig, &action)? };
    }
    Ok(())
}

/// Makes the handlers inert in a forked child (a worker, or the child that executes a new
/// leader): a signal that arrives before the child installs its own is not mistaken for the
/// leader's.
pub fn uninstall() {
    PIPE_WRITE.store(-1, Ordering::SeqCst);
}
