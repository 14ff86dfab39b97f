//! Gunicorn-format error log and access log; both reopenable for log rotation (USR1).
//!
//! - The error log is the `log` facade's backend: every `log::info!` etc. in the server becomes
//!   a line in gunicorn's format, `[2026-11-25 20:42:14 +0000] [PID] [INFO] message`, on
//!   stderr (`-`) or appended to `--error-logfile`. [`critical!`](crate::critical) writes
//!   gunicorn's `[CRITICAL]` level, which `log` lacks.
//! - The access log ([`access::AccessLog`]) renders gunicorn's `%(atom)s` format from a format
//!   parsed once at start-up.
//!
//! # Why hand-written instead of env_logger, fern, tracing-subscriber, ...
//!
//! The leader forks workers, and `fork()` copies only the calling thread. A logger that hands
//! lines to a background thread loses that thread in every worker (and whatever it had not
//! written yet), and a lock held by another thread at fork time stays locked forever in the
//! child. So this logger formats a line on the caller's stack and writes it with one
//! `write(2)`; there is no buffer to flush or lose, and no thread. It also has to produce
//! gunicorn's exact line format and levels, reopen its file on USR1 (from the leader's loop or
//! the worker, never inside a signal handler), and stay out of the way of Python's own
//! `logging`. That is less code than adapting a general-purpose logger.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;
use chrono::{DateTime, Local, TimeZone};

use crate::settings::{LogLevel, Settings};

pub mod access;
mod sink;

pub use access::{AccessLog, AccessRecord};
use sink::Sink;

/// The `log` target that marks a record as gunicorn's `CRITICAL` level (see
/// [`critical!`](crate::critical)).
pub const CRITICAL_TARGET: &str = "forkscope::critical";

/// Logs at gunicorn's `CRITICAL` level (e.g. `WORKER TIMEOUT`): `log::error!` with a marker
/// target, shown as `[CRITICAL]` and kept when `--log-level critical`.
#[macro_export]
macro_rules! critical {
    ($($arg:tt)+) => {
        ::log::error!(target: $crate::logging::CRITICAL_TARGET, $($arg)+)
    };
}

/// The process-wide error log behind the `log` facade.
struct ErrorLog {
    /// `None` until [`init`]; a `Mutex` because gthread workers log from several threads.
    sink: Mutex<Option<Sink>>,
    /// `--log-level critical`: drop `error!` records that are not [`critical!`](crate::critical).
    critical_only: AtomicBool,
}

static ERROR_LOG: ErrorLog = ErrorLog {
    sink: Mutex::new(None),
    critical_only: AtomicBool::new(false),
};

impl ErrorLog {
    fn sink(&self) -> MutexGuard<'_, Option<Sink>> {
        // A panic while writing a log line leaves nothing half-updated; keep logging.
        self.sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl log::Log for ErrorLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        if metadata.level() > log::max_level() {
            return false;
        }
        !(self.critical_only.load(Ordering::Relaxed) && metadata.target() != CRITICAL_TARGET)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = if record.target() == CRITICAL_TARGET {
            LogLevel::Critical
        } else {
            match record.level() {
                log::Level::Error => LogLevel::Error,
                log::Level::Warn => LogLevel::Warning,
                log::Level::Info => LogLevel::Info,
                log::Level::Debug | log::Level::Trace => LogLevel::Debug,
            }
        };
        let line = format_line(&Local::now(), std::process::id(), level, record.args());
        if let Some(sink) = self.sink().as_ref() {
            // Nowhere left to report a failing error log; dropping the line is all we can do.
            let _ = sink.write_line(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// One error-log line in gunicorn's format, newline included:
/// `[2026-11-25 20:42:14 +0000] [PID] [INFO] message`.
pub fn format_line<Tz: TimeZone>(
    time: &DateTime<Tz>,
    pid: u32,
    level: LogLevel,
    message: &std::fmt::Arguments<'_>,
) -> String
where
    Tz::Offset: std::fmt::Display,
{
    format!(
        "{} [{pid}] [{}] {message}\n",
        time.format("[%Y-%m-%d %H:%M:%S %z]"),
        level.as_str()
    )
}

/// The `log` filter for a gunicorn level (`critical` also sets the critical-only switch).
fn level_filter(level: LogLevel) -> log::LevelFilter {
    match level {
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Warning => log::LevelFilter::Warn,
        LogLevel::Error | LogLevel::Critical => log::LevelFilter::Error,
    }
}

/// Sets up the error log from `--error-logfile` and `--log-level`. Call it again (e.g. after a
/// reload) to switch file and level; the `log` facade is installed only once.
///
/// # Errors
///
/// The error-log file cannot be opened for appending.
pub fn init(settings: &Settings) -> anyhow::Result<()> {
    let sink = Sink::open(&settings.errorlog, Sink::Stderr)
        .with_context(|| format!("cannot open the error log {}", settings.errorlog))?;
    *ERROR_LOG.sink() = Some(sink);
    ERROR_LOG
        .critical_only
        .store(settings.loglevel == LogLevel::Critical, Ordering::Relaxed);
    // Err only means the logger is installed already (a second init); it is this one.
    let _ = log::set_logger(&ERROR_LOG);
    log::set_max_level(level_filter(settings.loglevel));
    Ok(())
}

/// Logs `message` at ERROR without waiting for the error log's lock, for the panic hook: the
/// panicking thread may hold that lock itself. Then the line goes to stderr instead.
pub fn error_without_waiting(message: std::fmt::Arguments<'_>) {
    let line = format_line(&Local::now(), std::process::id(), LogLevel::Error, &message);
    let sink = match ERROR_LOG.sink.try_lock() {
        Ok(sink) => Some(sink),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let written = sink
        .as_ref()
        .and_then(|sink| sink.as_ref())
        .is_some_and(|sink| sink.write_line(line.as_bytes()).is_ok());
    if !written {
        let _ = Sink::Stderr.write_line(line.as_bytes());
    }
}

/// Reopens the error-log file at its path (USR1 after logrotate). A no-op for stderr.
///
/// Call it from the leader's loop or the worker's, never from a signal handler: it takes a
/// lock and opens a file.
///
/// # Errors
///
/// The file cannot be opened again; the old one stays in use.
pub fn reopen() -> std::io::Result<()> {
    match ERROR_LOG.sink().as_mut() {
        Some(sink) => sink.reopen(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
