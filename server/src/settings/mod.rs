//! THE settings table: one declaration per setting gives its flag, env var and config-file name.
//!
//! [`Settings`] is a single `clap`-derive struct. Its field names are gunicorn's setting names,
//! so a `gunicorn.conf.py` global, a `GUNICORN_CMD_ARGS` flag and our field are the same thing,
//! and the doc comment of each field is its `--help` text and its entry in `docs/SETTINGS.md`.
//! `Settings` is plain validated data with no I/O; the leader turns it into sockets, files and
//! processes.
//!
//! # Layout
//!
//! - this file: the struct, [`LogLevel`], and small pure helpers ([`Settings::print_config`]).
//! - [`load`](mod@load): resolves one `Settings` from defaults, the config file, env vars,
//!   `GUNICORN_CMD_ARGS`/`FORKSCOPE_CMD_ARGS` and the command line (precedence documented
//!   there).
//! - [`config_file`]: evaluates a gunicorn-style Python config file into setting values and
//!   hooks, for `load`.
//! - [`unsupported`]: gunicorn options forkscope refuses by name, with the reason.
//! - [`docs`]: renders `docs/SETTINGS.md` from the clap command (a test keeps it fresh).

use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser, ValueEnum};
use serde::{Deserialize, Serialize};

pub mod config_file;
pub mod docs;
pub mod load;
pub mod memory;
pub mod unsupported;

pub use load::{Loaded, load, load_with_env};

/// The longest duration a setting takes, in seconds (365 days): far beyond any sensible
/// timeout, and far from overflowing a deadline computed from it.
pub const MAX_SECONDS: u64 = 365 * 24 * 60 * 60;

/// The largest request count (`max_requests`, `max_requests_jitter`), so their sum fits.
pub const MAX_REQUESTS: u64 = u32::MAX as u64;

/// The most threads per worker (each runs its own event loop, with two descriptors).
pub const MAX_THREADS: u64 = 1024;

/// gunicorn's default access log format (Apache combined log format).
pub const DEFAULT_ACCESS_LOG_FORMAT: &str =
    r#"%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s""#;

/// Every setting of forkscope-server.
///
/// Field names are gunicorn's setting names (config-file keys); flags are gunicorn's flags.
/// Each field also reads `FORKSCOPE_<NAME>` from the environment; the `load` module says where
/// that sits in the precedence.
#[derive(Parser, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[command(
    name = "forkscope-server",
    version,
    long_about = None,
    about = "A gunicorn-compatible pre-fork WSGI server with a heap profiler in every worker.",
    after_help = "Settings are read, lowest precedence first, from: defaults, the config file \
                  (-c, default ./gunicorn.conf.py), FORKSCOPE_<NAME> env vars, GUNICORN_CMD_ARGS, \
                  FORKSCOPE_CMD_ARGS, the command line. See docs/SETTINGS.md."
)]
pub struct Settings {
    /// The WSGI application: `MODULE:VARIABLE`, or `MODULE:factory(args)` to call a factory.
    ///
    /// The variable defaults to `application` when only `MODULE` is given (gunicorn does the
    /// same).
    #[arg(value_name = "MODULE:VARIABLE", env = "FORKSCOPE_WSGI_APP")]
    pub wsgi_app: Option<String>,

    /// The socket to bind: `HOST:PORT`, `[IPV6]:PORT`, `unix:PATH` or `fd://N`. Repeatable.
    ///
    /// Default: `127.0.0.1:8000`, or `0.0.0.0:$PORT` when `PORT` is set (as in gunicorn).
    #[arg(
        short = 'b',
        long = "bind",
        value_name = "ADDRESS",
        env = "FORKSCOPE_BIND",
        action = ArgAction::Append,
        default_values_t = [String::from("127.0.0.1:8000")]
    )]
    pub bind: Vec<String>,

    /// The number of worker processes (1 to 4096).
    ///
    /// Default: `$WEB_CONCURRENCY` when set (as in gunicorn), else 1.
    #[arg(
        short = 'w',
        long = "workers",
        value_name = "INT",
        env = "FORKSCOPE_WORKERS",
        default_value_t = 1,
        value_parser = parse_workers
    )]
    pub workers: u32,

    /// The number of Python threads per worker that run requests concurrently (1 to 1024).
    ///
    /// Each worker also keeps idle keep-alive connections open without a thread each.
    #[arg(
        long = "threads",
        value_name = "INT",
        env = "FORKSCOPE_THREADS",
        default_value_t = 1,
        value_parser = parse_threads
    )]
    pub threads: u32,

    /// Import the application once in the leader, before forking the workers.
    ///
    /// Saves memory (pages stay shared, see gc_freeze) and boot time; a code change needs a
    /// full restart or HUP.
    #[arg(
        long = "preload",
        env = "FORKSCOPE_PRELOAD_APP",
        action = ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub preload_app: bool,

    /// Call `gc.freeze()` after the preloaded import (forkscope only; on by default).
    ///
    /// Moves every object the import created out of the garbage collector's reach, so a
    /// collection in a worker does not write to them and copy-on-write pages stay shared.
    /// `--no-gc-freeze` (or `gc_freeze = False`, `FORKSCOPE_GC_FREEZE=false`) switches it off.
    #[arg(
        long = "no-gc-freeze",
        env = "FORKSCOPE_GC_FREEZE",
        action = ArgAction::SetFalse,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub gc_freeze: bool,

    /// Change to this directory before loading the application.
    #[arg(long = "chdir", value_name = "DIR", env = "FORKSCOPE_CHDIR")]
    pub chdir: Option<PathBuf>,

    /// Comma-separated directories to add to the Python path (`sys.path`).
    #[arg(
        long = "pythonpath",
        value_name = "PATHS",
        env = "FORKSCOPE_PYTHONPATH"
    )]
    pub pythonpath: Option<String>,

    /// Set an environment variable in the server and the app: `KEY=VALUE`. Repeatable.
    #[arg(
        short = 'e',
        long = "env",
        value_name = "KEY=VALUE",
        env = "FORKSCOPE_RAW_ENV",
        action = ArgAction::Append,
        value_parser = parse_raw_env
    )]
    pub raw_env: Vec<String>,

    /// The maximum number of pending connections in each listen queue.
    #[arg(
        long = "backlog",
        value_name = "INT",
        env = "FORKSCOPE_BACKLOG",
        default_value_t = 2048,
        value_parser = clap::value_parser!(i32).range(1..)
    )]
    pub backlog: i32,

    /// Seconds to wait for the next request on a keep-alive connection (at most 31536000).
    #[arg(
        long = "keep-alive",
        value_name = "SECONDS",
        env = "FORKSCOPE_KEEPALIVE",
        default_value_t = 2,
        value_parser = parse_seconds
    )]
    pub keepalive: u64,

    /// A worker busy with one request longer than this many seconds is aborted (its Python
    /// stacks go to the error log first) and replaced. 0 disables the check; at most 31536000
    /// (365 days).
    #[arg(
        short = 't',
        long = "timeout",
        value_name = "SECONDS",
        env = "FORKSCOPE_TIMEOUT",
        default_value_t = 30,
        value_parser = parse_seconds
    )]
    pub timeout: u64,

    /// Seconds that workers get to finish their requests after a graceful stop or reload (at
    /// most 31536000).
    #[arg(
        long = "graceful-timeout",
        value_name = "SECONDS",
        env = "FORKSCOPE_GRACEFUL_TIMEOUT",
        default_value_t = 30,
        value_parser = parse_seconds
    )]
    pub graceful_timeout: u64,

    /// A worker retires gracefully after serving this many requests (0 = never; at most
    /// 4294967295).
    ///
    /// A simple guard against slow memory leaks in the application.
    #[arg(
        long = "max-requests",
        value_name = "INT",
        env = "FORKSCOPE_MAX_REQUESTS",
        default_value_t = 0,
        value_parser = parse_requests
    )]
    pub max_requests: u64,

    /// Adds a random 0..=N to max_requests per worker, so workers do not all retire at once
    /// (at most 4294967295).
    #[arg(
        long = "max-requests-jitter",
        value_name = "INT",
        env = "FORKSCOPE_MAX_REQUESTS_JITTER",
        default_value_t = 0,
        value_parser = parse_requests
    )]
    pub max_requests_jitter: u64,

    /// Retire a worker gracefully once its private memory stays above this size (0 = never).
    ///
    /// Private memory (USS, from `smaps_rollup`) is what the worker's exit frees; RSS would count
    /// the pages it shares copy-on-write with the leader and recycle the wrong workers. The
    /// leader checks every 2 s and recycles a worker over the limit on 3 checks in a row, the
    /// way `--max-requests` does: in-flight requests finish and the slot is refilled at once.
    /// Sizes as Kubernetes writes them (`512Mi`, `1G`) or bytes.
    #[arg(
        long = "max-worker-memory",
        value_name = "SIZE",
        env = "FORKSCOPE_MAX_WORKER_MEMORY",
        default_value = "0",
        value_parser = memory::parse_size
    )]
    pub max_worker_memory: u64,

    /// Start tracing allocations in a worker whose private memory crosses this size, or this
    /// share of `--max-worker-memory` (`0.8`, `80%`), so that a heap diff is captured before it
    /// is recycled.
    ///
    /// The diff lands in the log and in the runtime directory (`{leader}/recycles/{pid}.json`,
    /// listed by the sidecar); only workers above the threshold pay for tracing. In a config
    /// file, write it as a string (`"80%"`).
    #[arg(
        long = "memory-watch-threshold",
        value_name = "SIZE|SHARE",
        env = "FORKSCOPE_MEMORY_WATCH_THRESHOLD",
        value_parser = memory::parse_threshold
    )]
    pub memory_watch_threshold: Option<memory::Threshold>,

    /// The maximum size in bytes of the request line (method, target, version).
    ///
    /// 0 means unlimited; values above 8190 are lowered to 8190 (as in gunicorn).
    #[arg(
        long = "limit-request-line",
        value_name = "BYTES",
        env = "FORKSCOPE_LIMIT_REQUEST_LINE",
        default_value_t = 4094
    )]
    pub limit_request_line: usize,

    /// The maximum number of header fields in a request.
    ///
    /// 0 or values above 32768 mean 32768 (as in gunicorn).
    #[arg(
        long = "limit-request-fields",
        value_name = "INT",
        env = "FORKSCOPE_LIMIT_REQUEST_FIELDS",
        default_value_t = 100
    )]
    pub limit_request_fields: usize,

    /// The maximum size in bytes of one request header field line (name, colon, value, CRLF).
    ///
    /// 0 means the default, 8190 (what gunicorn's code does).
    #[arg(
        long = "limit-request-field_size",
        visible_alias = "limit-request-field-size",
        value_name = "BYTES",
        env = "FORKSCOPE_LIMIT_REQUEST_FIELD_SIZE",
        default_value_t = 8190
    )]
    pub limit_request_field_size: usize,

    /// Comma-separated peer addresses or networks (`10.0.0.0/8`) whose X-Forwarded-* headers
    /// are trusted (`*` = all).
    ///
    /// An entry that is none of these is an error. Default: `127.0.0.1,::1`, or
    /// `$FORWARDED_ALLOW_IPS` when set (as in gunicorn).
    #[arg(
        long = "forwarded-allow-ips",
        value_name = "ADDRESSES",
        env = "FORKSCOPE_FORWARDED_ALLOW_IPS",
        value_delimiter = ',',
        default_values_t = [String::from("127.0.0.1"), String::from("::1")],
        value_parser = crate::wsgi::environ::TrustedProxies::check_entry
    )]
    pub forwarded_allow_ips: Vec<String>,

    /// Write the access log to this file (`-` = stdout). Off by default.
    #[arg(
        long = "access-logfile",
        value_name = "FILE",
        env = "FORKSCOPE_ACCESSLOG"
    )]
    pub accesslog: Option<String>,

    /// The access log format, with gunicorn's `%(atom)s` atoms (see docs/SETTINGS.md).
    #[arg(
        long = "access-logformat",
        value_name = "FORMAT",
        env = "FORKSCOPE_ACCESS_LOG_FORMAT",
        default_value = DEFAULT_ACCESS_LOG_FORMAT
    )]
    pub access_log_format: String,

    /// Write the error log to this file (`-` = stderr).
    #[arg(
        long = "error-logfile",
        visible_alias = "log-file",
        value_name = "FILE",
        env = "FORKSCOPE_ERRORLOG",
        default_value = "-"
    )]
    pub errorlog: String,

    /// The minimum level of error-log messages.
    #[arg(
        long = "log-level",
        value_name = "LEVEL",
        env = "FORKSCOPE_LOGLEVEL",
        value_enum,
        ignore_case = true,
        default_value_t = LogLevel::Info
    )]
    pub loglevel: LogLevel,

    /// Write the leader's PID to this file (removed at exit).
    #[arg(
        short = 'p',
        long = "pid",
        value_name = "FILE",
        env = "FORKSCOPE_PIDFILE"
    )]
    pub pidfile: Option<PathBuf>,

    /// The name shown in process titles: `forkscope-server: leader [NAME]`.
    ///
    /// Default: the application (`MODULE:VARIABLE`).
    #[arg(
        short = 'n',
        long = "name",
        value_name = "NAME",
        env = "FORKSCOPE_PROC_NAME"
    )]
    pub proc_name: Option<String>,

    /// The gunicorn-style Python config file, or `python:MODULE` to import it as a module.
    ///
    /// Default: `./gunicorn.conf.py` when that file exists.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "CONFIG",
        env = "FORKSCOPE_CONFIG"
    )]
    pub config: Option<String>,

    /// Check the configuration and the application import, then exit (0 when fine).
    #[arg(
        long = "check-config",
        env = "FORKSCOPE_CHECK_CONFIG",
        action = ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub check_config: bool,

    /// Print every setting with its resolved value, then exit.
    #[arg(
        long = "print-config",
        env = "FORKSCOPE_PRINT_CONFIG",
        action = ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub print_config: bool,

    /// The directory shared with forkscope-sidecar (process info, profiler commands, results).
    #[arg(
        long = "runtime-dir",
        value_name = "DIR",
        env = "FORKSCOPE_RUNTIME_DIR",
        default_value = forkscope_protocol::DEFAULT_RUNTIME_DIR
    )]
    pub runtime_dir: PathBuf,

    /// The worker type: `sync` or `gthread` (both are served by forkscope's own worker).
    ///
    /// Other gunicorn worker classes (gevent, eventlet, tornado, uvicorn, ...) are refused.
    #[arg(
        short = 'k',
        long = "worker-class",
        value_name = "CLASS",
        env = "FORKSCOPE_WORKER_CLASS",
        default_value = "sync",
        value_parser = parse_worker_class
    )]
    pub worker_class: String,

    /// Accepted for gunicorn compatibility; has no effect.
    ///
    /// gunicorn keeps a heartbeat file per worker there (often `/dev/shm`); forkscope's leader
    /// watches its workers without files. A warning says so when it is set.
    #[arg(
        long = "worker-tmp-dir",
        value_name = "DIR",
        env = "FORKSCOPE_WORKER_TMP_DIR"
    )]
    pub worker_tmp_dir: Option<PathBuf>,
}

/// The error-log levels, gunicorn's names.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Everything, including per-request details.
    Debug,
    /// Start-up, workers booting and exiting, signals.
    Info,
    /// Something is off but the server carries on.
    #[value(alias = "warn")]
    Warning,
    /// A request or a worker failed.
    Error,
    /// The server itself is in trouble (e.g. a worker timed out).
    Critical,
}

impl LogLevel {
    /// The upper-case name gunicorn writes in error-log lines (`[INFO]`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warning => "WARNING",
            LogLevel::Error => "ERROR",
            LogLevel::Critical => "CRITICAL",
        }
    }
}

impl Settings {
    /// The clap command for `Settings` alone: what `--help` and `docs/SETTINGS.md` show.
    pub fn command() -> clap::Command {
        <Self as CommandFactory>::command()
    }

    /// The request-head limits with gunicorn's clamping applied (see each setting's docs):
    /// request line above 8190 → 8190 (0 stays unlimited), fields 0 or above 32768 → 32768,
    /// field size 0 → 8190.
    pub fn http_limits(&self) -> crate::http::Limits {
        const MAX_REQUEST_LINE: usize = 8190;
        const MAX_HEADERS: usize = 32768;
        const DEFAULT_MAX_HEADER_FIELD_SIZE: usize = 8190;
        crate::http::Limits {
            request_line: self.limit_request_line.min(MAX_REQUEST_LINE),
            fields: match self.limit_request_fields {
                0 => MAX_HEADERS,
                fields => fields.min(MAX_HEADERS),
            },
            field_size: match self.limit_request_field_size {
                0 => DEFAULT_MAX_HEADER_FIELD_SIZE,
                size => size,
            },
        }
    }

    /// The `--pythonpath` entries, in order (empty entries dropped).
    pub fn pythonpath_entries(&self) -> Vec<&str> {
        self.pythonpath
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .collect()
    }

    /// `--env KEY=VALUE` pairs split at the first `=` (validated when parsed).
    pub fn raw_env_pairs(&self) -> Vec<(&str, &str)> {
        self.raw_env
            .iter()
            .filter_map(|pair| pair.split_once('='))
            .collect()
    }

    /// Warnings about settings that are accepted but do nothing, to log once logging is up.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some(dir) = &self.worker_tmp_dir {
            warnings.push(format!(
                "worker_tmp_dir ({}) has no effect: forkscope workers keep no heartbeat file",
                dir.display()
            ));
        }
        warnings
    }

    /// What `--print-config` prints: one `name = value` line per setting, sorted by name,
    /// values as JSON (gunicorn prints Python reprs in the same shape).
    pub fn print_config(&self) -> String {
        let value = serde_json::to_value(self).expect("Settings always serializes to JSON");
        let serde_json::Value::Object(map) = value else {
            unreachable!("Settings is a struct, so it serializes to a JSON object")
        };
        let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let width = entries.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (name, value) in entries {
            out.push_str(&format!("{name:width$} = {value}\n"));
        }
        out
    }
}

/// A whole number from `min` to `max` (what overflows u64 is out of range too); the error
/// states the range.
fn whole_number(value: &str, min: u64, max: u64, unit: &str) -> Result<u64, String> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("expected a whole number of {unit} from {min} to {max}"))
}

fn parse_seconds(value: &str) -> Result<u64, String> {
    whole_number(value, 0, MAX_SECONDS, "seconds")
}

fn parse_requests(value: &str) -> Result<u64, String> {
    whole_number(value, 0, MAX_REQUESTS, "requests")
}

fn parse_workers(value: &str) -> Result<u32, String> {
    let max = crate::heartbeat::MAX_SLOTS as u64;
    whole_number(value, 1, max, "workers").map(|n| n as u32)
}

fn parse_threads(value: &str) -> Result<u32, String> {
    whole_number(value, 1, MAX_THREADS, "threads").map(|n| n as u32)
}

/// Validates one `--env` value: `KEY=VALUE` with a non-empty key.
fn parse_raw_env(value: &str) -> Result<String, String> {
    match value.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(value.to_owned()),
        _ => Err(format!("expected KEY=VALUE, got {value:?}")),
    }
}

/// The worker classes forkscope serves, with gunicorn's short and full names.
const WORKER_CLASSES: &[(&str, &str)] = &[
    ("sync", "sync"),
    ("gthread", "gthread"),
    ("gunicorn.workers.sync.SyncWorker", "sync"),
    ("gunicorn.workers.gthread.ThreadWorker", "gthread"),
];

/// Accepts `sync` and `gthread` (normalised to the short name); names anything else.
fn parse_worker_class(value: &str) -> Result<String, String> {
    WORKER_CLASSES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(value))
        .map(|(_, short)| (*short).to_owned())
        .ok_or_else(|| {
            format!(
                "worker class {value:?} is a gunicorn worker class that forkscope-server does not \
                 support: forkscope serves `sync` and `gthread` with its own worker, which keeps \
                 idle keep-alive connections without blocking; use --threads N for requests that \
                 run concurrently"
            )
        })
}

#[cfg(test)]
mod tests;
