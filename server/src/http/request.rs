//! The request-head parser: bytes in, a validated [`RequestHead`] (or "need more bytes") out.
//!
//! `httparse` does the fast tokenising; this module adds what it leaves to the caller and what
//! keeps a server safe against request smuggling (RFC 9112): bare-LF and limit checks, the
//! request-target forms, Host rules, and the body framing decision from Content-Length and
//! Transfer-Encoding. It is stateless: call [`parse_head`] again with the grown buffer after
//! `Ok(None)`. The worker should call it only when the newly received bytes contain a `\n`,
//! which keeps a trickling client from costing quadratic time.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use super::{HttpError, Limits, Version};

/// How the request body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body: neither Content-Length nor Transfer-Encoding.
    None,
    /// Exactly this many bytes follow the head.
    Length(u64),
    /// A chunked body follows; decode it with [`super::ChunkedDecoder`].
    Chunked,
}

/// A parsed and validated request head. Everything the worker and the WSGI bridge need; the
/// raw pieces stay bytes because PEP 3333 hands them to Python as latin-1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method token, case preserved (methods are case-sensitive); the common ones are
    /// static, so most requests allocate nothing for it.
    pub method: Cow<'static, str>,
    /// The raw request-target as received (for `RAW_URI` and the access log).
    pub target: Vec<u8>,
    /// The path before `?` (absolute-form reduced to its path, `/` when empty; `*` for
    /// `OPTIONS *`; the authority for `CONNECT`). Still percent-encoded; no fragment.
    pub path: Vec<u8>,
    /// The query after `?`, without it and without any fragment.
    pub query: Vec<u8>,
    /// HTTP/1.0 or HTTP/1.1 (a higher 1.x minor version is treated as 1.1).
    pub version: Version,
    /// Header fields in order, names as received, values raw without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// How the body is delimited.
    pub framing: BodyFraming,
    /// Whether the client allows another request on this connection after this one.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending the body (HTTP/1.1 only).
    pub expect_continue: bool,
}

impl RequestHead {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Header slots kept on the stack; more (a raised `--limit-request-fields`) go to the heap.
const STACK_HEADERS: usize = 128;
/// gunicorn's ceiling for `--limit-request-fields` (also used when it is 0).
const MAX_FIELDS: usize = 32768;
/// Empty lines tolerated before a request line (RFC 9112 2.2 asks for at least one).
const MAX_LEADING_EMPTY: usize = 64;

/// Parses the request head at the start of `buf`.
///
/// Returns `Ok(None)` while the head is incomplete, or the head and the number of bytes it
/// used; the body (if any) starts right after, so pipelined requests stay in order.
///
/// # Errors
///
/// An [`HttpError`] whose status the worker answers with before closing the connection.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let fields = match limits.fields {
        0 => MAX_FIELDS,
        n => n.min(MAX_FIELDS),
    };
    let mut slots = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    if fields < STACK_HEADERS {
        return parse_with(buf, limits, fields, &mut slots[..fields + 1]);
    }
    // A raised limit: try the stack first, go to the heap only for a request that needs it.
    match parse_with(buf, limits, fields, &mut slots) {
        Err(HttpError::TooManyFields) => {
            let mut slots = Vec::with_capacity(fields + 1);
            slots.resize_with(fields + 1, MaybeUninit::uninit);
            parse_with(buf, limits, fields, &mut slots)
        }
        other => other,
    }
}

fn parse_with<'b>(
    buf: &'b [u8],
    limits: &Limits,
    fields: usize,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let start = skip_empty_lines(buf)?;
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Partial) => {
            check_partial(buf, start, limits)?;
            Ok(None)
        }
        Ok(httparse::Status::Complete(consumed)) => {
            let head = build(&req, buf, start, consumed, limits, fields)?;
            Ok(Some((head, consumed)))
        }
        Err(httparse::Error::Version) if higher_minor(buf, start).is_some() => {
            let minor_at = higher_minor(buf, start).expect("checked by the guard");
            let mut copy = buf.to_vec();
            copy[minor_at] = b'1';
            parse_head(&copy, limits)
        }
        Err(err) => {
            check_partial(buf, start, limits)?;
            if err == httparse::Error::Version && version_may_complete(buf, start) {
                // `HTTP/2` so far: wait for the line to tell 505 (`HTTP/2.0`) from 400.
                return Ok(None);
            }
            Err(classify(err, buf, start))
        }
    }
}

/// Length of the empty lines (CRLF) before the request line; a bare LF there is an error.
fn skip_empty_lines(buf: &[u8]) -> Result<usize, HttpError> {
    let mut i = 0;
    loop {
        match buf.get(i..i + 2) {
            Some(b"\r\n") => i += 2,
            _ if buf.get(i) == Some(&b'\n') => return Err(HttpError::BareLineFeed),
            _ => break,
        }
        if i > MAX_LEADING_EMPTY {
            return Err(HttpError::Malformed);
        }
    }
    Ok(i)
}

/// Limit checks on an incomplete head (or one httparse rejected): the request line so far,
/// and the header line being received.
fn check_partial(buf: &[u8], start: usize, limits: &Limits) -> Result<(), HttpError> {
    let rest = &buf[start..];
    let scan = match limits.request_line {
        0 => rest,
        cap => &rest[..rest.len().min(cap + 2)],
    };
    match memchr::memchr(b'\n', scan) {
        None => {
            if limits.request_line > 0 && rest.len() > limits.request_line + 1 {
                return Err(HttpError::RequestLineTooLong);
            }
        }
        Some(lf) => {
            if limits.request_line > 0 && line_len(rest, lf) > limits.request_line {
                return Err(HttpError::RequestLineTooLong);
            }
            let last_lf = memchr::memrchr(b'\n', rest).expect("an LF was found above");
            // The line being received will be at least `tail - 1` long plus its CRLF.
            let tail = rest.len() - last_lf - 1;
            if limits.field_size > 0 && tail + 1 > limits.field_size {
                return Err(HttpError::FieldTooLarge);
            }
        }
    }
    Ok(())
}

/// Length of the line ending with the LF at `lf`, without its CR LF.
fn line_len(buf: &[u8], lf: usize) -> usize {
    if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    }
}

/// The first line of the request (without CR/LF), or what has arrived of it.
fn request_line(buf: &[u8], start: usize) -> &[u8] {
    let rest = &buf[start..];
    let end = memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
    &rest[..end]
}

/// For `HTTP/1.2`..`HTTP/1.9`, which RFC 9110 2.5 says to read as the highest 1.x minor we
/// speak, the offset of the minor digit in `buf`; httparse knows only 1.0 and 1.1.
fn higher_minor(buf: &[u8], start: usize) -> Option<usize> {
    let line = request_line(buf, start);
    let sp = memchr::memrchr(b' ', line)?;
    match &line[sp + 1..] {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'2'..=b'9'] => Some(start + line.len() - 1),
        _ => None,
    }
}

/// Whether the request line is unterminated and its last word could still become
/// `HTTP/<digit>.<digit>`.
fn version_may_complete(buf: &[u8], start: usize) -> bool {
    let line = request_line(buf, start);
    if start + line.len() < buf.len() {
        return false;
    }
    let Some(sp) = memchr::memrchr(b' ', line) else {
        return false;
    };
    let word = &line[sp + 1..];
    word.len() <= 8
        && word.iter().enumerate().all(|(i, b)| match i {
            0..=4 => *b == b"HTTP/"[i],
            6 => *b == b'.',
            _ => b.is_ascii_digit(),
        })
}

/// Maps an httparse error to ours, looking at the request line to tell the cases apart.
fn classify(err: httparse::Error, buf: &[u8], start: usize) -> HttpError {
    let line = request_line(buf, start);
    match err {
        httparse::Error::Version => {
            let version = match memchr::memrchr(b' ', line) {
                Some(sp) => &line[sp + 1..],
                None => return HttpError::InvalidRequestLine,
            };
            match version {
                [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
                    if major.is_ascii_digit() && minor.is_ascii_digit() && *major != b'1' =>
                {
                    HttpError::UnsupportedVersion
                }
                _ => HttpError::InvalidRequestLine,
            }
        }
        httparse::Error::Token => {
            let method_end = memchr::memchr(b' ', line).unwrap_or(line.len());
            let method = &line[..method_end];
            let after = line.get(method_end + 1..).unwrap_or(&[]);
            if method.is_empty() || !method.iter().all(|b| is_tchar(*b)) {
                HttpError::InvalidMethod
            } else if memchr::memchr(b' ', after).is_none() {
                HttpError::InvalidRequestLine
            } else {
                HttpError::InvalidTarget
            }
        }
        httparse::Error::HeaderName => {
            let rest = &buf[start..];
            let folded = memchr::memchr_iter(b'\n', rest)
                .any(|lf| matches!(rest.get(lf + 1), Some(b' ' | b'\t')));
            if folded {
                HttpError::ObsoleteFolding
            } else {
                HttpError::InvalidHeaderName
            }
        }
        httparse::Error::HeaderValue => HttpError::InvalidHeaderValue,
        httparse::Error::TooManyHeaders => HttpError::TooManyFields,
        httparse::Error::NewLine | httparse::Error::Status => HttpError::Malformed,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Turns httparse's complete result into a [`RequestHead`], applying every check httparse
/// leaves to us.
fn build(
    req: &httparse::Request<'_, '_>,
    buf: &[u8],
    start: usize,
    consumed: usize,
    limits: &Limits,
    fields: usize,
) -> Result<RequestHead, HttpError> {
    let head = &buf[..consumed];
    for lf in memchr::memchr_iter(b'\n', head) {
        if lf == 0 || head[lf - 1] != b'\r' {
            return Err(HttpError::BareLineFeed);
        }
    }
    let first_lf = memchr::memchr(b'\n', &head[start..]).expect("a complete head has a line");
    if limits.request_line > 0 && first_lf - 1 > limits.request_line {
        return Err(HttpError::RequestLineTooLong);
    }
    if req.headers.len() > fields {
        return Err(HttpError::TooManyFields);
    }

    let method = req.method.expect("a complete parse has a method");
    let target = req.path.expect("a complete parse has a target").as_bytes();
    let version = match req.version.expect("a complete parse has a version") {
        0 => Version::Http10,
        _ => Version::Http11,
    };
    // RFC 9112 3.2 (RFC 3986 2): the target is printable ASCII, anything else percent-encoded;
    // httparse lets bytes above 0x7F through.
    if !target.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(HttpError::InvalidTarget);
    }
    let (path, query) = split_target(method, target)?;

    let base = buf.as_ptr() as usize;
    let mut headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut te = TransferCodings::default();
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    let mut hosts = 0usize;
    let mut content_types = 0usize;
    for h in req.headers.iter() {
        if limits.field_size > 0 {
            let name_at = h.name.as_ptr() as usize - base;
            let value_end = h.value.as_ptr() as usize + h.value.len() - base;
            let len = value_end.saturating_sub(name_at).max(h.name.len() + 1);
            // gunicorn counts the line with its CRLF.
            if len + 2 > limits.field_size {
                return Err(HttpError::FieldTooLarge);
            }
        }
        let name = h.name;
        let value = h.value;
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                hosts += 1;
                if !value.iter().all(|b| is_host_byte(*b)) {
                    return Err(HttpError::InvalidHost);
                }
            }
            6 if name.eq_ignore_ascii_case("expect") => {
                expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                for token in list_elements(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        conn_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        conn_keep_alive = true;
                    }
                }
            }
            12 if name.eq_ignore_ascii_case("content-type") => {
                content_types += 1;
                if content_types > 1 {
                    return Err(HttpError::DuplicateContentType);
                }
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                if content_length.is_some() {
                    return Err(HttpError::DuplicateContentLength);
                }
                content_length = Some(parse_content_length(value)?);
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => te.add(value),
            _ => {}
        }
        headers.push((name.to_owned(), value.to_vec()));
    }

    if hosts > 1 || (hosts == 0 && version == Version::Http11) {
        return Err(HttpError::InvalidHost);
    }
    let framing = if te.present {
        te.check(version, content_length.is_some())?;
        BodyFraming::Chunked
    } else {
        match content_length {
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::None,
        }
    };
    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };

    Ok(RequestHead {
        method: known_method(method).map_or_else(|| Cow::Owned(method.to_owned()), Cow::Borrowed),
        target: target.to_vec(),
        path,
        query,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::Http11,
    })
}

/// Splits the request-target into path and query after checking its form (RFC 9112 3.2):
/// origin-form `/p?q`, absolute-form `scheme://authority/p?q`, authority-form for CONNECT,
/// `*` for OPTIONS. A fragment, which clients must not send, is dropped as gunicorn does.
/// The static name of a common method.
fn known_method(method: &str) -> Option<&'static str> {
    ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]
        .into_iter()
        .find(|m| *m == method)
}

fn split_target(method: &str, target: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HttpError> {
    let without_fragment = match memchr::memchr(b'#', target) {
        Some(i) => &target[..i],
        None => target,
    };
    if method == "CONNECT" {
        let authority_ok = !without_fragment.is_empty()
            && without_fragment.len() == target.len()
            && memchr::memchr3(b'/', b'?', b'@', target).is_none()
            && memchr::memchr(b':', target).is_some();
        return if authority_ok {
            Ok((target.to_vec(), Vec::new()))
        } else {
            Err(HttpError::InvalidTarget)
        };
    }
    let path_and_query = match target.first() {
        Some(b'/') => without_fragment,
        Some(b'*') if target.len() == 1 => {
            return if method == "OPTIONS" {
                Ok((b"*".to_vec(), Vec::new()))
            } else {
                Err(HttpError::InvalidTarget)
            };
        }
        _ => strip_scheme_and_authority(without_fragment)?,
    };
    Ok(match memchr::memchr(b'?', path_and_query) {
        Some(q) => (
            non_empty_path(&path_and_query[..q]),
            path_and_query[q + 1..].to_vec(),
        ),
        None => (non_empty_path(path_and_query), Vec::new()),
    })
}

fn non_empty_path(path: &[u8]) -> Vec<u8> {
    if path.is_empty() {
        b"/".to_vec()
    } else {
        path.to_vec()
    }
}

/// For absolute-form: checks `scheme "://" authority` and returns what follows (path-abempty
/// and query).
fn strip_scheme_and_authority(target: &[u8]) -> Result<&[u8], HttpError> {
    let colon = memchr::memchr(b':', target).ok_or(HttpError::InvalidTarget)?;
    let scheme = &target[..colon];
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    let rest = target[colon + 1..]
        .strip_prefix(b"//")
        .ok_or(HttpError::InvalidTarget)?;
    if !scheme_ok {
        return Err(HttpError::InvalidTarget);
    }
    let authority_end = memchr::memchr2(b'/', b'?', rest).unwrap_or(rest.len());
    if authority_end == 0 {
        return Err(HttpError::InvalidTarget);
    }
    Ok(&rest[authority_end..])
}

/// Bytes allowed in a Host value: uri-host (reg-name, IP literal) and port.
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:%[]".contains(&b)
}

/// The elements of a comma-separated list header, trimmed, empty ones skipped.
fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').filter_map(|e| {
        let e = e.trim_ascii();
        (!e.is_empty()).then_some(e)
    })
}

/// Content-Length = 1*DIGIT, without sign, inner whitespace or overflow.
fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    if value.is_empty() {
        return Err(HttpError::InvalidContentLength);
    }
    value.iter().try_fold(0u64, |n, b| {
        if !b.is_ascii_digit() {
            return Err(HttpError::InvalidContentLength);
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(HttpError::InvalidContentLength)
    })
}

/// The transfer codings of all Transfer-Encoding fields, read as one list (RFC 9110 5.3).
#[derive(Default)]
struct TransferCodings {
    present: bool,
    chunked: usize,
    last_is_chunked: bool,
    unknown: bool,
    /// A known coding we do not decode (gzip, deflate, compress).
    undecoded: bool,
    /// `chunked` with parameters, which RFC 9112 7 forbids.
    bad_chunked: bool,
}

impl TransferCodings {
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        for element in list_elements(value) {
            let (name, has_params) = match memchr::memchr(b';', element) {
                Some(i) => (element[..i].trim_ascii(), true),
                None => (element, false),
            };
            let is_chunked = name.eq_ignore_ascii_case(b"chunked");
            self.last_is_chunked = is_chunked;
            if is_chunked {
                self.chunked += 1;
                self.bad_chunked |= has_params;
            } else if [
                &b"gzip"[..],
                b"x-gzip",
                b"deflate",
                b"compress",
                b"x-compress",
            ]
            .iter()
            .any(|known| name.eq_ignore_ascii_case(known))
            {
                self.undecoded = true;
            } else if !name.eq_ignore_ascii_case(b"identity") {
                self.unknown = true;
            }
        }
    }

    /// RFC 9112 6.1/6.3: unknown coding -> 501; HTTP/1.0, with Content-Length, or `chunked`
    /// not exactly once and last -> 400; compression we would not undo -> 501.
    fn check(&self, version: Version, has_content_length: bool) -> Result<(), HttpError> {
        if self.unknown {
            return Err(HttpError::UnsupportedTransferCoding);
        }
        if version == Version::Http10 {
            return Err(HttpError::InvalidTransferEncoding);
        }
        if has_content_length {
            return Err(HttpError::ContentLengthWithTransferEncoding);
        }
        if self.chunked != 1 || !self.last_is_chunked || self.bad_chunked {
            return Err(HttpError::InvalidTransferEncoding);
        }
        if self.undecoded {
            return Err(HttpError::UnsupportedTransferCoding);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn simple_get() {
        let (head, n) = parse_head(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\nrest", &limits())
            .unwrap()
            .unwrap();
        assert_eq!(n, 32);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, b"/a");
        assert_eq!(head.query, b"b=c");
        assert_eq!(head.framing, BodyFraming::None);
        assert!(head.keep_alive);
    }

    #[test]
    fn incomplete_is_none() {
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", &limits()),
            Ok(None)
        );
        assert_eq!(parse_head(b"", &limits()), Ok(None));
    }

    #[test]
    fn http_1_2_is_read_as_1_1() {
        let (head, n) = parse_head(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n", &limits())
            .unwrap()
            .unwrap();
        assert_eq!(head.version, Version::Http11);
        assert_eq!(n, 27);
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET /\r\n\r\n", 400),
            (b"G(T / HTTP/1.1\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\n\r\n", 400),
        ];
        for (input, status) in cases {
            let err = parse_head(input, &limits()).unwrap_err();
            assert_eq!(
                err.status(),
                *status,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
