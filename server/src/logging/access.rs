//! The access log: gunicorn's `%(atom)s` format, parsed once, rendered per request.
//!
//! # Atoms
//!
//! gunicorn's atoms, listed with their meaning in [`ATOMS`] (and in `docs/SETTINGS.md`).
//!
//! An unknown atom renders as `-`, and `"` inside a value is written as `\"`, both as gunicorn
//! does. `%%` is a literal `%`. Conversions `s`, `d`, `i`, `r` and `a` are accepted and all
//! render the value as text; a width (`%(s)5s`, `%(h)-15s`) pads it.

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use base64::Engine as _;
use chrono::{DateTime, Local};

use super::sink::Sink;
use crate::settings::Settings;

/// gunicorn's access-log atoms and what they render, for the docs.
pub const ATOMS: &[(&str, &str)] = &[
    ("h", "remote address"),
    ("l", "`-`"),
    ("u", "user name from `Authorization: Basic`, else `-`"),
    (
        "t",
        "date and time when the response finished, `[25/Nov/2026:20:42:14 +0000]`",
    ),
    ("r", "request line, `GET /path?query HTTP/1.1`"),
    ("m", "request method"),
    ("U", "URL path without the query string"),
    ("q", "query string"),
    ("H", "protocol, `HTTP/1.1`"),
    ("s", "status code"),
    ("B", "response body length"),
    ("b", "response body length, or `-` when unknown"),
    ("f", "`Referer` header, else `-`"),
    ("a", "`User-Agent` header, else `-`"),
    ("T", "request time in whole seconds"),
    ("M", "request time in whole milliseconds"),
    ("D", "request time in whole microseconds"),
    ("L", "request time in decimal seconds, `0.012345`"),
    ("p", "process id, `<1234>`"),
    (
        "{name}i",
        "request header `name` (case-insensitive; the last one wins)",
    ),
    ("{name}o", "response header `name`"),
    ("{name}e", "WSGI environ variable `name`"),
];

/// Looks up a WSGI environ variable by name (for `%({name}e)s`).
pub type EnvironLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// What the worker knows about one finished request, borrowed for the time of [`AccessLog::log`].
pub struct AccessRecord<'a> {
    /// The peer address as WSGI's `REMOTE_ADDR` has it (`127.0.0.1`).
    pub remote_addr: &'a str,
    /// The request method (`GET`).
    pub method: &'a str,
    /// The request target's path as received, without the query (`/a%20b`).
    pub path: &'a str,
    /// The query string without `?` (empty when there is none).
    pub query: &'a str,
    /// The protocol version (`HTTP/1.1`).
    pub version: &'a str,
    /// The response status code; `%(s)s` shows only the code, as gunicorn does.
    pub status: u16,
    /// The number of body bytes sent, `None` if unknown (`%(b)s` then shows `-`).
    pub response_length: Option<u64>,
    /// The request headers as received (any case; values are latin-1 bytes).
    pub request_headers: &'a [(String, Vec<u8>)],
    /// The response headers as sent.
    pub response_headers: &'a [(String, String)],
    /// How long the request took, from its first byte to the end of the response.
    pub request_time: Duration,
    /// When the request started.
    pub start: SystemTime,
    /// The worker's process id.
    pub pid: u32,
    /// Looks up a WSGI environ variable for `%({name}e)s`. gunicorn matches the name
    /// case-insensitively; the lookup gets the name as written in the format. Called only when
    /// the format uses an environ atom; `None` renders those atoms as `-`.
    pub environ: Option<EnvironLookup<'a>>,
}

/// One atom of the format, resolved when the format is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Atom {
    RemoteAddr,
    Dash,
    User,
    Time,
    RequestLine,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    BytesSent,
    BytesOrDash,
    Referer,
    UserAgent,
    Seconds,
    Milliseconds,
    Microseconds,
    DecimalSeconds,
    Pid,
    /// `{name}i`, the name lower-cased.
    RequestHeader(String),
    /// `{name}o`, the name lower-cased.
    ResponseHeader(String),
    /// `{name}e`, the name as written.
    Environ(String),
    /// Anything else: gunicorn renders `-`.
    Unknown,
}

/// A piece of the parsed format.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Atom {
        atom: Atom,
        /// Minimum width (`%(h)15s`), 0 for none.
        width: usize,
        /// Pad on the right (`%(h)-15s`).
        left: bool,
    },
}

/// The per-second cache of the `%(t)s` text, so a busy worker formats the date once a second.
#[derive(Debug, Default)]
struct TimeCache {
    second: i64,
    text: String,
}

/// The access log of one process: the parsed format and where lines go.
#[derive(Debug)]
pub struct AccessLog {
    segments: Vec<Segment>,
    sink: Mutex<Sink>,
    time: Mutex<TimeCache>,
}

impl AccessLog {
    /// The access log `--access-logfile` asks for, `None` when access logging is off (the
    /// default).
    ///
    /// # Errors
    ///
    /// `--access-logformat` is not a valid format, or the file cannot be opened.
    pub fn new(settings: &Settings) -> anyhow::Result<Option<AccessLog>> {
        let Some(target) = settings.accesslog.as_deref() else {
            return Ok(None);
        };
        let segments = parse_format(&settings.access_log_format)?;
        let sink = Sink::open(target, Sink::Stdout)
            .with_context(|| format!("cannot open the access log {target}"))?;
        Ok(Some(AccessLog {
            segments,
            sink: Mutex::new(sink),
            time: Mutex::new(TimeCache::default()),
        }))
    }

    /// Writes the line for `record` (one `write(2)`). A failing write is dropped: a full disk
    /// must not fail requests.
    pub fn log(&self, record: &AccessRecord<'_>) {
        let line = self.render(record);
        let _ = lock(&self.sink).write_line(line.as_bytes());
    }

    /// Reopens the access-log file at its path (USR1). A no-op for stdout.
    ///
    /// # Errors
    ///
    /// The file cannot be opened again; the old one stays in use.
    pub fn reopen(&self) -> std::io::Result<()> {
        lock(&self.sink).reopen()
    }

    /// The line for `record`, newline included.
    pub fn render(&self, record: &AccessRecord<'_>) -> String {
        let mut line = String::with_capacity(256);
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => line.push_str(text),
                Segment::Atom { atom, width, left } => {
                    let before = line.len();
                    self.render_atom(&mut line, atom, record);
                    pad(&mut line, before, *width, *left);
                }
            }
        }
        line.push('\n');
        line
    }

    fn render_atom(&self, out: &mut String, atom: &Atom, record: &AccessRecord<'_>) {
        let micros = record.request_time.as_micros();
        match atom {
            Atom::RemoteAddr => escaped(out, record.remote_addr),
            Atom::Dash | Atom::Unknown => out.push('-'),
            Atom::User => match basic_auth_user(record.request_headers) {
                Some(user) => escaped(out, &user),
                None => out.push('-'),
            },
            Atom::Time => self.time(out, record.start + record.request_time),
            Atom::RequestLine => {
                escaped(out, record.method);
                out.push(' ');
                escaped(out, record.path);
                if !record.query.is_empty() {
                    out.push('?');
                    escaped(out, record.query);
                }
                out.push(' ');
                escaped(out, record.version);
            }
            Atom::Method => escaped(out, record.method),
            Atom::Path => escaped(out, record.path),
            Atom::Query => escaped(out, record.query),
            Atom::Protocol => escaped(out, record.version),
            Atom::Status => push_int(out, record.status),
            Atom::BytesSent => push_int(out, record.response_length.unwrap_or(0)),
            Atom::BytesOrDash => match record.response_length {
                Some(length) => push_int(out, length),
                None => out.push('-'),
            },
            Atom::Referer => joined_header(out, record.request_headers, "referer"),
            Atom::UserAgent => joined_header(out, record.request_headers, "user-agent"),
            Atom::Seconds => push_int(out, record.request_time.as_secs()),
            Atom::Milliseconds => push_int(out, record.request_time.as_millis()),
            Atom::Microseconds => push_int(out, micros),
            Atom::DecimalSeconds => {
                let _ = write!(out, "{}.{:06}", micros / 1_000_000, micros % 1_000_000);
            }
            Atom::Pid => {
                out.push('<');
                push_int(out, record.pid);
                out.push('>');
            }
            Atom::RequestHeader(name) => {
                match record
                    .request_headers
                    .iter()
                    .rev()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                {
                    Some((_, value)) => escaped_latin1(out, value),
                    None => out.push('-'),
                }
            }
            Atom::ResponseHeader(name) => {
                match record
                    .response_headers
                    .iter()
                    .rev()
                    .find(|(key, _)| key.eq_ignore_ascii_case(name))
                {
                    Some((_, value)) => escaped(out, value),
                    None => out.push('-'),
                }
            }
            Atom::Environ(name) => match record.environ.and_then(|lookup| lookup(name)) {
                Some(value) => escaped(out, &value),
                None => out.push('-'),
            },
        }
    }

    /// `[25/Nov/2026:20:42:14 +0000]` in local time, cached per second.
    fn time(&self, out: &mut String, at: SystemTime) {
        // The time-zone conversion happens only when the second changes.
        // Times before 1970 (a broken clock) all share one cache key and show one date.
        let second = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(-1, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        let mut cache = lock(&self.time);
        if cache.text.is_empty() || cache.second != second {
            let local: DateTime<Local> = at.into();
            cache.second = second;
            cache.text = local.format("[%d/%b/%Y:%H:%M:%S %z]").to_string();
        }
        out.push_str(&cache.text);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing is left half-updated by a panic while logging; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Parses a gunicorn access-log format (Python `%`-formatting with a mapping) into segments.
fn parse_format(format: &str) -> anyhow::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    let mut literal = String::new();
    let mut chars = format.char_indices().peekable();
    while let Some((position, c)) = chars.next() {
        if c != '%' {
            literal.push(c);
            continue;
        }
        match chars.next() {
            Some((_, '%')) => literal.push('%'),
            Some((_, '(')) => {
                // Python allows nested parentheses inside the key.
                let mut depth = 1;
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                    key.push(c);
                }
                if depth != 0 {
                    bail!("access log format: unclosed `%(` at byte {position}");
                }
                let mut left = false;
                while let Some(&(_, flag)) = chars.peek() {
                    if !matches!(flag, '-' | '+' | ' ' | '#' | '0') {
                        break;
                    }
                    left |= flag == '-';
                    chars.next();
                }
                let mut width = 0usize;
                while let Some(&(_, digit)) = chars.peek() {
                    let Some(value) = digit.to_digit(10) else {
                        break;
                    };
                    width = width.saturating_mul(10).saturating_add(value as usize);
                    chars.next();
                }
                match chars.next() {
                    Some((_, 's' | 'd' | 'i' | 'r' | 'a')) => {}
                    Some((_, other)) => bail!(
                        "access log format: unsupported conversion `{other}` after `%({key})` \
                         (use `%({key})s`)"
                    ),
                    None => bail!("access log format: `%({key})` lacks a conversion such as `s`"),
                }
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                segments.push(Segment::Atom {
                    atom: atom(&key),
                    width,
                    left,
                });
            }
            _ => bail!(
                "access log format: `%` at byte {position} must start `%(atom)s` or be doubled \
                 as `%%`"
            ),
        }
    }
    if !literal.is_empty() {
        segments.push(Segment::Literal(literal));
    }
    Ok(segments)
}

/// The atom named `key` (without `%(` and `)s`).
fn atom(key: &str) -> Atom {
    if let Some(rest) = key.strip_prefix('{') {
        if let Some(name) = rest.strip_suffix("}i") {
            return Atom::RequestHeader(name.to_ascii_lowercase());
        }
        if let Some(name) = rest.strip_suffix("}o") {
            return Atom::ResponseHeader(name.to_ascii_lowercase());
        }
        if let Some(name) = rest.strip_suffix("}e") {
            return Atom::Environ(name.to_owned());
        }
        return Atom::Unknown;
    }
    match key {
        "h" => Atom::RemoteAddr,
        "l" => Atom::Dash,
        "u" => Atom::User,
        "t" => Atom::Time,
        "r" => Atom::RequestLine,
        "m" => Atom::Method,
        "U" => Atom::Path,
        "q" => Atom::Query,
        "H" => Atom::Protocol,
        "s" => Atom::Status,
        "B" => Atom::BytesSent,
        "b" => Atom::BytesOrDash,
        "f" => Atom::Referer,
        "a" => Atom::UserAgent,
        "T" => Atom::Seconds,
        "M" => Atom::Milliseconds,
        "D" => Atom::Microseconds,
        "L" => Atom::DecimalSeconds,
        "p" => Atom::Pid,
        _ => Atom::Unknown,
    }
}

/// Appends `value` with `"` escaped as `\"` (gunicorn's `SafeAtoms`).
fn escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        if c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
}

/// Appends latin-1 header bytes as text, `"` escaped.
fn escaped_latin1(out: &mut String, value: &[u8]) {
    for &byte in value {
        if byte == b'"' {
            out.push('\\');
        }
        out.push(char::from(byte));
    }
}

fn push_int(out: &mut String, value: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// All values of request header `name` joined with `,` (as in the WSGI environ), else `-`.
fn joined_header(out: &mut String, headers: &[(String, Vec<u8>)], name: &str) {
    let mut found = false;
    for (_, value) in headers
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
    {
        if found {
            out.push(',');
        }
        found = true;
        escaped_latin1(out, value);
    }
    if !found {
        out.push('-');
    }
}

/// The user of an `Authorization: Basic` header, as gunicorn's `_get_user` finds it.
fn basic_auth_user(headers: &[(String, Vec<u8>)]) -> Option<String> {
    let (_, value) = headers
        .iter()
        .rev()
        .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))?;
    let value: String = value.iter().map(|&b| char::from(b)).collect();
    if !value.to_ascii_lowercase().starts_with("basic") {
        return None;
    }
    let (_, encoded) = value.split_once(' ')?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let user = decoded.split(|&b| b == b':').next()?;
    let user = String::from_utf8(user.to_vec()).ok()?;
    (!user.is_empty()).then_some(user)
}

/// Pads what was written since `start` to `width` characters.
fn pad(out: &mut String, start: usize, width: usize, left: bool) {
    let written = out[start..].chars().count();
    if written >= width {
        return;
    }
    let padding = " ".repeat(width - written);
    if left {
        out.push_str(&padding);
    } else {
        out.insert_str(start, &padding);
    }
}

#[cfg(test)]
mod tests;
