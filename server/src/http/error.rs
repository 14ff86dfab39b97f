//! Errors of the HTTP layer: [`HttpError`] for a request the server must refuse (each maps to one
//! status code, so the worker answers with [`super::error_response`] and closes), and
//! [`HeaderError`] for a response the application described wrongly (the worker answers 500).
//!
//! Messages are static on purpose: they end up in an HTML error body and in the error log, and
//! must never echo attacker-controlled bytes.

/// Why a request (head or body) was refused. [`HttpError::status`] gives the status code to
/// answer with; the connection is always closed afterwards, since the framing of whatever follows
/// can no longer be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line is longer than `--limit-request-line` (414).
    #[error("request line too long")]
    RequestLineTooLong,
    /// More header fields than `--limit-request-fields` (431).
    #[error("too many header fields")]
    TooManyFields,
    /// One header field line is longer than `--limit-request-field_size` (431).
    #[error("header field too large")]
    FieldTooLarge,
    /// The request method is not a token (400).
    #[error("invalid request method")]
    InvalidMethod,
    /// The request-target has invalid bytes or a form the method does not allow (400).
    #[error("invalid request target")]
    InvalidTarget,
    /// The request line is malformed, e.g. missing its HTTP version (HTTP/0.9) (400).
    #[error("invalid request line")]
    InvalidRequestLine,
    /// A well-formed HTTP version this server does not speak, e.g. `HTTP/2.0` (505).
    #[error("HTTP version not supported")]
    UnsupportedVersion,
    /// A header name with invalid bytes or whitespace before the colon (400).
    #[error("invalid header name")]
    InvalidHeaderName,
    /// A header value with NUL, CR or another control byte (400).
    #[error("invalid header value")]
    InvalidHeaderValue,
    /// A header line starting with whitespace (obsolete line folding, RFC 9112 5.2) (400).
    #[error("obsolete line folding")]
    ObsoleteFolding,
    /// A line ended by LF without CR (400).
    #[error("bare LF in request head")]
    BareLineFeed,
    /// Malformed lines in the request head (400).
    #[error("malformed request head")]
    Malformed,
    /// HTTP/1.1 request without a Host header, or with more than one (400).
    #[error("missing or duplicate Host header")]
    InvalidHost,
    /// Content-Length that is not 1*DIGIT or overflows (400).
    #[error("invalid Content-Length")]
    InvalidContentLength,
    /// More than one Content-Length field (400).
    #[error("duplicate Content-Length")]
    DuplicateContentLength,
    /// More than one Content-Type field, a singleton whose repeats cannot be merged (400,
    /// RFC 9110 5.3).
    #[error("duplicate Content-Type")]
    DuplicateContentType,
    /// Both Transfer-Encoding and Content-Length (400; a request-smuggling classic).
    #[error("both Transfer-Encoding and Content-Length")]
    ContentLengthWithTransferEncoding,
    /// Transfer-Encoding whose final coding is not a single `chunked`, or in an HTTP/1.0
    /// request (400, RFC 9112 6.1 and 6.3).
    #[error("invalid Transfer-Encoding")]
    InvalidTransferEncoding,
    /// A transfer coding this server does not implement (501).
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    /// A chunk-size that is not hex, has whitespace, or overflows (400).
    #[error("invalid chunk size")]
    InvalidChunkSize,
    /// A chunk-size line (with extensions) longer than allowed (400).
    #[error("chunk size line too long")]
    ChunkLineTooLong,
    /// Chunk data not followed by CRLF, or a bare LF/CR in chunk framing (400).
    #[error("invalid chunk framing")]
    InvalidChunkFraming,
    /// A malformed trailer field (400).
    #[error("invalid trailer")]
    InvalidTrailer,
    /// A field that must not be sent as a trailer, such as Content-Length or Host (400,
    /// RFC 9110 6.5.1).
    #[error("field not allowed in a trailer")]
    ForbiddenTrailer,
    /// Trailer section larger than allowed (431).
    #[error("trailer section too large")]
    TrailersTooLarge,
    /// The client ended its side of the connection before the whole body arrived (400). Not
    /// produced by the parser itself.
    #[error("request body cut short")]
    IncompleteBody,
    /// The body is larger than the worker accepts (413). Not produced by the parser itself.
    #[error("request body too large")]
    PayloadTooLarge,
    /// The client was too slow to send a request (408). Not produced by the parser itself.
    #[error("request timeout")]
    RequestTimeout,
}

impl HttpError {
    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::RequestLineTooLong => 414,
            HttpError::TooManyFields | HttpError::FieldTooLarge | HttpError::TrailersTooLarge => {
                431
            }
            HttpError::UnsupportedVersion => 505,
            HttpError::UnsupportedTransferCoding => 501,
            HttpError::PayloadTooLarge => 413,
            HttpError::RequestTimeout => 408,
            HttpError::InvalidMethod
            | HttpError::InvalidTarget
            | HttpError::InvalidRequestLine
            | HttpError::InvalidHeaderName
            | HttpError::InvalidHeaderValue
            | HttpError::ObsoleteFolding
            | HttpError::BareLineFeed
            | HttpError::Malformed
            | HttpError::InvalidHost
            | HttpError::InvalidContentLength
            | HttpError::DuplicateContentLength
            | HttpError::DuplicateContentType
            | HttpError::ContentLengthWithTransferEncoding
            | HttpError::InvalidTransferEncoding
            | HttpError::InvalidChunkSize
            | HttpError::ChunkLineTooLong
            | HttpError::InvalidChunkFraming
            | HttpError::InvalidTrailer
            | HttpError::ForbiddenTrailer
            | HttpError::IncompleteBody => 400,
        }
    }

    /// The reason phrase of [`HttpError::status`], for the status line and the error body.
    pub fn reason(&self) -> &'static str {
        match self.status() {
            408 => "Request Timeout",
            413 => "Payload Too Large",
            414 => "URI Too Long",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            505 => "HTTP Version Not Supported",
            _ => "Bad Request",
        }
    }
}

/// Why the application's status or headers cannot be sent (the worker answers 500 instead and
/// logs this; PEP 3333 makes these the application's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The status is not three digits, a space and a reason phrase without control bytes.
    #[error("invalid status line {0:?}")]
    InvalidStatus(String),
    /// A header name that is not an RFC 9110 token.
    #[error("invalid header name {0:?}")]
    InvalidName(String),
    /// A header value with CR, LF, NUL or another control byte, or a character beyond latin-1.
    #[error("invalid value for header {0:?}")]
    InvalidValue(String),
    /// A Content-Length value that is not a non-negative integer, or two that differ.
    #[error("invalid Content-Length {0:?}")]
    InvalidContentLength(String),
}
