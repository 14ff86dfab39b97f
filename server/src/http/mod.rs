//! Pure HTTP/1.x: request-head parsing, body framing and response heads. No sockets here.
//!
//! - [`request`]: [`parse_head`] turns buffered bytes into a validated [`RequestHead`] or asks
//!   for more; it decides keep-alive, `Expect: 100-continue` and the [`BodyFraming`].
//! - [`body`]: [`ChunkedDecoder`] and [`BodyDecoder`] read the body incrementally.
//! - [`response`]: [`ResponsePlan`] validates the application's status and headers, picks the
//!   response framing and encodes head and body; [`error_response`] answers a refused request.
//! - [`date`]: [`DateCache`], the `Date` value formatted once per second.
//! - [`error`]: [`HttpError`] (status of a refused request) and [`HeaderError`] (a bad
//!   application response).
//!
//! Every step is "bytes in, bytes out", so the test corpus in `server/tests/requests/` can feed
//! requests at any chunking without a socket.

pub mod body;
pub mod date;
pub mod error;
pub mod request;
pub mod response;

pub use body::{BodyDecoder, ChunkedDecoder};
pub use date::DateCache;
pub use error::{HeaderError, HttpError};
pub use request::{BodyFraming, RequestHead, parse_head};
pub use response::{CONTINUE_100, FramedBody, ResponseFraming, ResponsePlan, error_response};

/// Request-head limits with gunicorn's meaning (`--limit-request-line`,
/// `--limit-request-fields`, `--limit-request-field_size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line without CRLF (414 beyond); 0 = unlimited.
    pub request_line: usize,
    /// Most header fields (431 beyond); 0 = gunicorn's ceiling of 32768.
    pub fields: usize,
    /// Longest header field line `name: value` counted with its CRLF, as gunicorn counts it
    /// (431 beyond); 0 = unlimited.
    pub field_size: usize,
}

impl Default for Limits {
    /// gunicorn's defaults: 4094, 100, 8190.
    fn default() -> Self {
        Limits {
            request_line: 4094,
            fields: 100,
            field_size: 8190,
        }
    }
}

/// The HTTP versions this server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: no keep-alive unless asked for, no chunked coding.
    Http10,
    /// HTTP/1.1 (and later 1.x minors, read as 1.1).
    Http11,
}

impl Version {
    /// `HTTP/1.0` or `HTTP/1.1`, as in a request line (and the access log's `%(H)s`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}
