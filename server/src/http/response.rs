//! Response heads and body framing: [`ResponsePlan`] turns the application's WSGI status and
//! headers into validated bytes and decides how the body is delimited and whether the
//! connection stays open; [`error_response`] answers a request the parser refused.
//!
//! Framing table (RFC 9112 6.3, as gunicorn does it):
//!
//! | request / status                    | framing                               |
//! | ----------------------------------- | ------------------------------------- |
//! | HEAD, 1xx, 204, 304                 | no body (the app's body is discarded)  |
//! | app sent Content-Length: n          | exactly n bytes, the rest truncated   |
//! | HTTP/1.1 otherwise                  | `Transfer-Encoding: chunked`          |
//! | HTTP/1.0 otherwise                  | until close (keep-alive off)          |
//!
//! Hop-by-hop headers from the application (PEP 3333 forbids them) are dropped, as gunicorn
//! does; only `Connection: close` is honoured, by closing after the response.

use std::io::Write as _;

use super::{DateCache, HeaderError, HttpError, Version};

/// What a server sends to a client waiting on `Expect: 100-continue`.
pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body may be sent (HEAD, 1xx, 204, 304).
    NoBody,
    /// The application's Content-Length.
    Length(u64),
    /// HTTP/1.1 chunked transfer coding.
    Chunked,
    /// HTTP/1.0 without Content-Length: the body ends when the connection closes.
    UntilClose,
}

/// How to send one piece of body without copying it: write what
/// [`ResponsePlan::frame_body`] appended to `out`, then `data[..take]`, then `suffix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramedBody {
    /// How many bytes of the data to send (fewer when Content-Length truncates, 0 for no body).
    pub take: usize,
    /// Bytes to send after the data (the CRLF closing a chunk).
    pub suffix: &'static [u8],
}

/// The validated, framed response to one request. Build it from `start_response`'s
/// arguments, write the head once, then the body pieces, then [`ResponsePlan::finish`].
#[derive(Debug, Clone)]
pub struct ResponsePlan {
    status_code: u16,
    /// `HTTP/1.1 <status>\r\n`, then the application's headers, each ending in CRLF.
    encoded: Vec<u8>,
    status_line_len: usize,
    version: Version,
    framing: ResponseFraming,
    keep_alive: bool,
    app_sets_server: bool,
    app_sets_date: bool,
    sent: u64,
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
];

impl ResponsePlan {
    /// Validates the application's `status` (e.g. `"200 OK"`) and `headers` and decides the
    /// framing and keep-alive for a request of `version` (`head_request` for HEAD;
    /// `request_keep_alive` from [`super::RequestHead::keep_alive`]).
    ///
    /// # Errors
    ///
    /// [`HeaderError`] when the status is not 3 digits + SP + reason, a name is not a token,
    /// a value holds CR, LF, NUL, another control byte or a non-latin-1 character, or
    /// Content-Length is not a number (or two differ).
    pub fn new(
        version: Version,
        head_request: bool,
        request_keep_alive: bool,
        status: &str,
        headers: &[(String, String)],
    ) -> Result<Self, HeaderError> {
        let status_code = parse_status(status)?;
        let mut encoded = Vec::with_capacity(64 + headers.len() * 48);
        encoded.extend_from_slice(b"HTTP/1.1 ");
        encoded.extend_from_slice(status.as_bytes());
        if status.len() == 3 {
            encoded.push(b' ');
        }
        encoded.extend_from_slice(b"\r\n");
        let status_line_len = encoded.len();

        let no_body_status = status_code < 200 || status_code == 204 || status_code == 304;
        let mut content_length: Option<u64> = None;
        let mut app_close = false;
        let mut app_sets_server = false;
        let mut app_sets_date = false;
        for (name, value) in headers {
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(HeaderError::InvalidName(name.clone()));
            }
            let mark = encoded.len();
            encoded.extend_from_slice(name.as_bytes());
            encoded.extend_from_slice(b": ");
            encode_value(value, &mut encoded)
                .ok_or_else(|| HeaderError::InvalidValue(name.clone()))?;
            encoded.extend_from_slice(b"\r\n");

            let mut keep = true;
            if name.eq_ignore_ascii_case("content-length") {
                let n = parse_length(value)
                    .ok_or_else(|| HeaderError::InvalidContentLength(value.clone()))?;
                match content_length {
                    Some(previous) if previous != n => {
                        return Err(HeaderError::InvalidContentLength(value.clone()));
                    }
                    Some(_) => keep = false,
                    None => content_length = Some(n),
                }
                // RFC 9110 8.6: never in 1xx or 204.
                keep &= status_code >= 200 && status_code != 204;
            } else if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                if name.eq_ignore_ascii_case("connection") {
                    app_close |= value
                        .split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("close"));
                }
                keep = false;
            } else if name.eq_ignore_ascii_case("server") {
                app_sets_server = true;
            } else if name.eq_ignore_ascii_case("date") {
                app_sets_date = true;
            }
            if !keep {
                encoded.truncate(mark);
            }
        }

        let framing = if head_request || no_body_status {
            ResponseFraming::NoBody
        } else if let Some(n) = content_length {
            ResponseFraming::Length(n)
        } else if version == Version::Http11 {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::UntilClose
        };
        let keep_alive = request_keep_alive && !app_close && framing != ResponseFraming::UntilClose;
        Ok(ResponsePlan {
            status_code,
            encoded,
            status_line_len,
            version,
            framing,
            keep_alive,
            app_sets_server,
            app_sets_date,
            sent: 0,
        })
    }

    /// The numeric status (for the access log and metrics).
    pub fn status_code(&self) -> u16 {
        self.status_code
    }

    /// Whether the connection may carry another request after this response (assuming the
    /// body is sent in full; see [`ResponsePlan::finish`]).
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// How the body is delimited.
    pub fn framing(&self) -> ResponseFraming {
        self.framing
    }

    /// Payload bytes sent so far (without chunk framing), for the access log.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Turns keep-alive off (e.g. the worker is shutting down); call before
    /// [`ResponsePlan::write_head`].
    pub fn force_close(&mut self) {
        self.keep_alive = false;
    }

    /// Appends the status line and headers: `Server` and `Date` (unless the application set
    /// them), `Connection` when it is not HTTP/1.1's default, `Transfer-Encoding: chunked`
    /// when chunking, then the application's headers.
    pub fn write_head(&self, out: &mut Vec<u8>, date: &DateCache) {
        out.extend_from_slice(&self.encoded[..self.status_line_len]);
        if !self.app_sets_server {
            out.extend_from_slice(b"Server: forkscope\r\n");
        }
        if !self.app_sets_date {
            out.extend_from_slice(b"Date: ");
            out.extend_from_slice(&date.get());
            out.extend_from_slice(b"\r\n");
        }
        if !self.keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.version == Version::Http10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        if self.framing == ResponseFraming::Chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        out.extend_from_slice(&self.encoded[self.status_line_len..]);
        out.extend_from_slice(b"\r\n");
    }

    /// Frames `len` bytes of body without copying them: appends the chunk header (if any) to
    /// `out` and says how much of the data to send and what follows it. Counts the bytes as
    /// sent.
    pub fn frame_body(&mut self, len: usize, out: &mut Vec<u8>) -> FramedBody {
        let take = match self.framing {
            ResponseFraming::NoBody => 0,
            ResponseFraming::Length(n) => {
                usize::try_from(n - self.sent).map_or(len, |left| left.min(len))
            }
            ResponseFraming::Chunked | ResponseFraming::UntilClose => len,
        };
        self.sent += take as u64;
        if self.framing == ResponseFraming::Chunked && take > 0 {
            write_hex(take, out);
            out.extend_from_slice(b"\r\n");
            return FramedBody {
                take,
                suffix: b"\r\n",
            };
        }
        FramedBody { take, suffix: b"" }
    }

    /// Appends one piece of body, framed: chunk-encoded, truncated beyond Content-Length (as
    /// gunicorn does), or nothing at all for HEAD/1xx/204/304.
    pub fn write_body(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let framed = self.frame_body(data.len(), out);
        out.extend_from_slice(&data[..framed.take]);
        out.extend_from_slice(framed.suffix);
    }

    /// Ends the body (the terminal chunk when chunking). Returns whether the connection may
    /// be reused: false when keep-alive is off, the body runs until close, or fewer bytes
    /// than Content-Length were sent (the client would wait for the rest).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> bool {
        match self.framing {
            ResponseFraming::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
                self.keep_alive
            }
            ResponseFraming::Length(n) => self.keep_alive && self.sent == n,
            ResponseFraming::NoBody => self.keep_alive,
            ResponseFraming::UntilClose => false,
        }
    }
}

/// `NNN` or `NNN reason` with a status of 100..=999 and a reason of visible ASCII, SP, HTAB.
fn parse_status(status: &str) -> Result<u16, HeaderError> {
    let bytes = status.as_bytes();
    let invalid = || HeaderError::InvalidStatus(status.to_owned());
    let code = match bytes {
        [a @ b'1'..=b'9', b, c, rest @ ..] if b.is_ascii_digit() && c.is_ascii_digit() => {
            if let [sp, reason @ ..] = rest
                && (*sp != b' '
                    || !reason
                        .iter()
                        .all(|b| *b == b'\t' || (b' '..=b'~').contains(b)))
            {
                return Err(invalid());
            }
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err(invalid()),
    };
    Ok(code)
}

/// Appends `value` as latin-1; `None` on CR, LF, NUL, other controls, DEL or a character
/// beyond U+00FF.
fn encode_value(value: &str, out: &mut Vec<u8>) -> Option<()> {
    let ok = |b: u8| b == b'\t' || (b' '..=b'~').contains(&b);
    if value.bytes().all(ok) {
        out.extend_from_slice(value.as_bytes());
        return Some(());
    }
    for c in value.chars() {
        let code = u32::from(c);
        match u8::try_from(code) {
            Ok(b) if ok(b) || b >= 0x80 => out.push(b),
            _ => return None,
        }
    }
    Some(())
}

/// The application's Content-Length: digits with optional surrounding whitespace.
fn parse_length(value: &str) -> Option<u64> {
    let digits = value.trim_matches([' ', '\t']);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Appends `n` in lowercase hex without allocating.
fn write_hex(mut n: usize, out: &mut Vec<u8>) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends a small complete response for a refused request: status, `Connection: close`, and
/// an HTML body naming the problem (like gunicorn's error pages; nothing from the request is
/// echoed). The worker closes the connection after sending it.
pub fn error_response(err: &HttpError, out: &mut Vec<u8>) {
    let reason = err.reason();
    let body_len = "<html><head><title></title></head><body><h1><p></p></h1></body></html>".len()
        + 2 * reason.len()
        + err.to_string().len();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nServer: forkscope\r\nConnection: close\r\n\
         Content-Type: text/html\r\nContent-Length: {body_len}\r\n\r\n\
         <html><head><title>{reason}</title></head><body><h1><p>{reason}</p></h1>{err}</body></html>",
        status = err.status(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        version: Version,
        head: bool,
        keep_alive: bool,
        status: &str,
        headers: &[(&str, &str)],
    ) -> Result<ResponsePlan, HeaderError> {
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        ResponsePlan::new(version, head, keep_alive, status, &headers)
    }

    /// Head, every body piece and the finish, as text, plus finish's verdict.
    fn render(plan: &mut ResponsePlan, pieces: &[&[u8]]) -> (String, bool) {
        let mut out = Vec::new();
        plan.write_head(&mut out, &DateCache::new());
        for piece in pieces {
            plan.write_body(piece, &mut out);
        }
        let reusable = plan.finish(&mut out);
        (String::from_utf8(out).unwrap(), reusable)
    }

    #[test]
    fn framing_table() {
        use ResponseFraming::*;
        use Version::*;
        let cl = [("Content-Length", "5")];
        type Case<'a> = (
            Version,
            bool,
            &'a str,
            &'a [(&'a str, &'a str)],
            ResponseFraming,
        );
        let cases: &[Case] = &[
            (Http11, false, "200 OK", &[], Chunked),
            (Http10, false, "200 OK", &[], UntilClose),
            (Http11, false, "200 OK", &cl, Length(5)),
            (Http10, false, "200 OK", &cl, Length(5)),
            (Http11, true, "200 OK", &[], NoBody),
            (Http11, true, "200 OK", &cl, NoBody),
            (Http11, false, "204 No Content", &[], NoBody),
            (Http11, false, "304 Not Modified", &cl, NoBody),
            (Http11, false, "101 Switching Protocols", &[], NoBody),
            (Http10, false, "204 No Content", &[], NoBody),
        ];
        for (version, head, status, headers, framing) in cases {
            let p = plan(*version, *head, true, status, headers).unwrap();
            assert_eq!(
                p.framing(),
                *framing,
                "{version:?} head={head} {status} {headers:?}"
            );
        }
    }

    #[test]
    fn chunked_http11() {
        let mut p = plan(Version::Http11, false, true, "200 OK", &[("X-A", "b")]).unwrap();
        let (text, reusable) = render(&mut p, &[b"hello", b"", b"0123456789abcdefg"]);
        assert!(reusable);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nServer: forkscope\r\nDate: "));
        assert!(text.contains("\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"));
        assert!(!text.contains("Connection"));
        assert!(text.ends_with("\r\n\r\n5\r\nhello\r\n11\r\n0123456789abcdefg\r\n0\r\n\r\n"));
        assert_eq!(p.bytes_sent(), 22);
    }

    #[test]
    fn http10_until_close_and_keep_alive() {
        let mut p = plan(Version::Http10, false, true, "200 OK", &[]).unwrap();
        assert!(!p.keep_alive());
        let (text, reusable) = render(&mut p, &[b"abc"]);
        assert!(!reusable);
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nabc"));

        let mut p = plan(
            Version::Http10,
            false,
            true,
            "200 OK",
            &[("Content-Length", "3")],
        )
        .unwrap();
        let (text, reusable) = render(&mut p, &[b"abc"]);
        assert!(reusable);
        assert!(text.contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn truncates_beyond_content_length_and_detects_short_bodies() {
        let mut p = plan(
            Version::Http11,
            false,
            true,
            "200 OK",
            &[("content-length", "4")],
        )
        .unwrap();
        let (text, reusable) = render(&mut p, &[b"ab", b"cdef"]);
        assert!(reusable);
        assert!(text.ends_with("\r\n\r\nabcd"));
        assert_eq!(p.bytes_sent(), 4);

        let mut p = plan(
            Version::Http11,
            false,
            true,
            "200 OK",
            &[("Content-Length", "4")],
        )
        .unwrap();
        let (_, reusable) = render(&mut p, &[b"ab"]);
        assert!(!reusable, "a short body must close the connection");
    }

    #[test]
    fn head_and_no_body_statuses_send_no_body() {
        for (head, status) in [
            (true, "200 OK"),
            (false, "204 No Content"),
            (false, "304 Not Modified"),
        ] {
            let mut p = plan(
                Version::Http11,
                head,
                true,
                status,
                &[("Content-Length", "5")],
            )
            .unwrap();
            let (text, reusable) = render(&mut p, &[b"hello"]);
            assert!(reusable);
            assert!(text.ends_with("\r\n\r\n"), "{text:?}");
            assert!(!text.contains("hello"));
            assert_eq!(p.bytes_sent(), 0);
            assert_eq!(
                text.contains("Content-Length: 5"),
                status != "204 No Content"
            );
        }
    }

    #[test]
    fn connection_close_from_app_or_request() {
        let p = plan(
            Version::Http11,
            false,
            true,
            "200 OK",
            &[("Connection", "Close")],
        )
        .unwrap();
        assert!(!p.keep_alive());
        let mut p = plan(Version::Http11, false, false, "200 OK", &[]).unwrap();
        let (text, reusable) = render(&mut p, &[]);
        assert!(!reusable);
        assert!(text.contains("Connection: close\r\n"));
        assert_eq!(
            text.matches("Connection").count(),
            1,
            "app's Connection is dropped"
        );
    }

    #[test]
    fn hop_by_hop_dropped_and_server_date_respected() {
        let mut p = plan(
            Version::Http11,
            false,
            true,
            "200 OK",
            &[
                ("Transfer-Encoding", "gzip"),
                ("Keep-Alive", "timeout=5"),
                ("Server", "app"),
                ("Date", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
        )
        .unwrap();
        let (text, _) = render(&mut p, &[]);
        assert!(!text.contains("gzip") && !text.contains("timeout=5"));
        assert_eq!(text.matches("Server:").count(), 1);
        assert!(text.contains("Server: app\r\n"));
        assert_eq!(text.matches("Date:").count(), 1);
    }

    #[test]
    fn invalid_status_and_headers() {
        for status in [
            "", "20 OK", "2000 OK", "200OK", "abc OK", "200 O\rK", "099 x", "200\tOK",
        ] {
            assert!(
                matches!(
                    plan(Version::Http11, false, true, status, &[]),
                    Err(HeaderError::InvalidStatus(_))
                ),
                "{status:?}"
            );
        }
        for (name, value) in [
            ("", "x"),
            ("Bad Name", "x"),
            ("Bad:Name", "x"),
            ("X-Evil", "a\r\nSet-Cookie: x"),
            ("X-Evil", "a\nb"),
            ("X-Evil", "a\0b"),
            ("X-Evil", "a\x7fb"),
            ("X-Evil", "snowman \u{2603}"),
            ("Content-Length", "-1"),
            ("Content-Length", "1 2"),
        ] {
            assert!(
                plan(Version::Http11, false, true, "200 OK", &[(name, value)]).is_err(),
                "{name:?}: {value:?}"
            );
        }
        assert!(
            plan(
                Version::Http11,
                false,
                true,
                "200 OK",
                &[("Content-Length", "1"), ("Content-Length", "2")]
            )
            .is_err()
        );
    }

    #[test]
    fn latin1_values_and_bare_status_code() {
        let mut p = plan(
            Version::Http11,
            false,
            true,
            "200",
            &[("X-Name", "caf\u{e9}")],
        )
        .unwrap();
        let mut out = Vec::new();
        p.write_head(&mut out, &DateCache::new());
        assert!(out.starts_with(b"HTTP/1.1 200 \r\n"));
        assert!(out.windows(12).any(|w| w == b"X-Name: caf\xe9"));
        assert!(p.finish(&mut Vec::new()));
    }

    #[test]
    fn error_response_is_complete() {
        let mut out = Vec::new();
        error_response(&HttpError::RequestLineTooLong, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
