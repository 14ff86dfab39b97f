//! Request body decoding: [`ChunkedDecoder`] for `Transfer-Encoding: chunked` (RFC 9112 7.1)
//! and [`BodyDecoder`], which covers every [`BodyFraming`] behind one call.
//!
//! Both are incremental: feed whatever arrived, get back how much was used, the payload so far,
//! and whether the body is complete. Bytes after the body (a pipelined request) are never
//! consumed. Chunk-size lines and trailers are bounded so a client cannot make us buffer
//! without end, and the framing is strict: whitespace in chunk sizes, overflow, and anything
//! but CRLF after chunk data are errors (request smuggling vectors).

use super::{BodyFraming, HttpError};

/// Longest chunk-size line (size, extensions) we accept, without CRLF.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section we accept (all trailer lines with their CRLFs).
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Fields a request must not send as trailers (RFC 9110 6.5.1), lower case: they are needed
/// before the content, so a trailer copy could only be read differently by us and by whatever
/// merges trailers downstream. gunicorn refuses the first six.
pub const FORBIDDEN_TRAILERS: &[&str] = &[
    // Framing, routing, authentication, and the request modifiers gunicorn names.
    "host",
    "content-length",
    "transfer-encoding",
    "trailer",
    "authorization",
    "te",
    // The rest of RFC 9110's request modifiers: controls (7.8, 10.1) and conditionals (13.1).
    "cache-control",
    "expect",
    "max-forwards",
    "pragma",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    // Authentication (11.6, RFC 6265).
    "proxy-authorization",
    "cookie",
    // How to process the content (8.3, 8.4, 14.4).
    "content-type",
    "content-encoding",
    "content-range",
];

/// The longest name in [`FORBIDDEN_TRAILERS`]; longer trailer names are not compared.
const LONGEST_FORBIDDEN: usize = 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size,
    /// After the digits, in the whitespace that may only precede `;` (BWS).
    SizeSpace,
    /// Inside chunk extensions (ignored), up to CR.
    Extension,
    /// Saw the CR of the chunk-size line.
    SizeLf,
    /// Copying chunk data.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line or of the final empty line.
    TrailerStart,
    /// In a trailer field name.
    TrailerName,
    /// In a trailer field value.
    TrailerValue,
    /// Saw the CR ending a trailer line.
    TrailerLf,
    /// Saw the CR of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// Incremental decoder of a chunked request body. Extensions are skipped and trailers are
/// validated and dropped (WSGI has no place for them).
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Size of the chunk being read (while in `Size`), or data still to copy (in `Data`).
    remaining: u64,
    digits: usize,
    line_len: usize,
    trailer_len: usize,
    /// The start of the trailer name being read, lower-cased, and its full length.
    name: [u8; LONGEST_FORBIDDEN],
    name_len: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder positioned at the first chunk-size line.
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size,
            remaining: 0,
            digits: 0,
            line_len: 0,
            trailer_len: 0,
            name: [0; LONGEST_FORBIDDEN],
            name_len: 0,
        }
    }

    /// Adds a byte to the trailer name being read.
    fn push_name(&mut self, b: u8) {
        if let Some(slot) = self.name.get_mut(self.name_len) {
            *slot = b.to_ascii_lowercase();
        }
        self.name_len += 1;
    }

    /// Whether the trailer name just read is one a request must not send.
    fn name_is_forbidden(&self) -> bool {
        let name = self.name.get(..self.name_len).unwrap_or_default();
        FORBIDDEN_TRAILERS.iter().any(|f| f.as_bytes() == name)
    }

    /// Whether the last chunk and the trailer section have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes as much of `input` as possible, appending payload to `out`. Returns the bytes
    /// consumed and whether the final chunk and trailers are complete; bytes after the end are
    /// left unconsumed.
    ///
    /// # Errors
    ///
    /// [`HttpError`] (400, or 431 for oversized trailers) on malformed framing; the decoder
    /// must not be used afterwards.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        if self.state == State::Done {
            return Ok((0, true));
        }
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Data {
                let available = input.len() - i;
                let take = usize::try_from(self.remaining).map_or(available, |r| r.min(available));
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.step(b)?;
            if self.state == State::Done {
                break;
            }
        }
        Ok((i, self.state == State::Done))
    }

    /// Advances the framing state machine by one byte (every state but `Data`).
    fn step(&mut self, b: u8) -> Result<(), HttpError> {
        match self.state {
            State::Size | State::SizeSpace | State::Extension => {
                self.line_len += 1;
                if self.line_len > MAX_CHUNK_LINE + 1 {
                    return Err(HttpError::ChunkLineTooLong);
                }
            }
            State::TrailerStart | State::TrailerName | State::TrailerValue | State::TrailerLf => {
                self.trailer_len += 1;
                if self.trailer_len > MAX_TRAILERS {
                    return Err(HttpError::TrailersTooLarge);
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::Size, _) if b.is_ascii_hexdigit() => {
                if self.remaining > u64::MAX >> 4 {
                    return Err(HttpError::InvalidChunkSize);
                }
                let digit = (b as char).to_digit(16).expect("checked hex digit");
                self.remaining = (self.remaining << 4) | u64::from(digit);
                self.digits += 1;
                State::Size
            }
            (State::Size, _) if self.digits == 0 => return Err(HttpError::InvalidChunkSize),
            (State::Size | State::SizeSpace, b' ' | b'\t') => State::SizeSpace,
            (State::Size | State::SizeSpace, b';') => State::Extension,
            (State::Size, b'\r') => State::SizeLf,
            (State::Size | State::SizeSpace, _) => return Err(HttpError::InvalidChunkSize),
            (State::Extension, b'\r') => State::SizeLf,
            (State::Extension, _) if is_field_byte(b) => State::Extension,
            (State::Extension, _) => return Err(HttpError::InvalidChunkFraming),
            (State::SizeLf, b'\n') => {
                self.line_len = 0;
                self.digits = 0;
                if self.remaining == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            (State::SizeLf, _) => return Err(HttpError::InvalidChunkFraming),
            (State::Data, _) => unreachable!("data is copied in bulk by decode"),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size,
            (State::DataCr | State::DataLf, _) => return Err(HttpError::InvalidChunkFraming),
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart, _) if is_tchar(b) => {
                self.name_len = 0;
                self.push_name(b);
                State::TrailerName
            }
            (State::TrailerStart, _) => return Err(HttpError::InvalidTrailer),
            (State::TrailerName, b':') if self.name_is_forbidden() => {
                return Err(HttpError::ForbiddenTrailer);
            }
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerName, _) if is_tchar(b) => {
                self.push_name(b);
                State::TrailerName
            }
            (State::TrailerName, _) => return Err(HttpError::InvalidTrailer),
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, _) if is_field_byte(b) => State::TrailerValue,
            (State::TrailerValue, _) => return Err(HttpError::InvalidTrailer),
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::TrailerLf, _) => return Err(HttpError::InvalidTrailer),
            (State::EndLf, b'\n') => State::Done,
            (State::EndLf, _) => return Err(HttpError::InvalidChunkFraming),
            (State::Done, _) => State::Done,
        };
        Ok(())
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes allowed inside a field value or chunk extension: HTAB, SP, VCHAR, obs-text.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// One decoder for every framing, so the worker has a single body path.
#[derive(Debug, Clone)]
pub enum BodyDecoder {
    /// A body of known length; `remaining` bytes are still to come.
    Length {
        /// Bytes of body not yet consumed.
        remaining: u64,
    },
    /// A chunked body.
    Chunked(ChunkedDecoder),
}

impl BodyDecoder {
    /// The decoder for a request's framing (`None` is a zero-length body).
    pub fn new(framing: BodyFraming) -> Self {
        match framing {
            BodyFraming::None => BodyDecoder::Length { remaining: 0 },
            BodyFraming::Length(n) => BodyDecoder::Length { remaining: n },
            BodyFraming::Chunked => BodyDecoder::Chunked(ChunkedDecoder::new()),
        }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        match self {
            BodyDecoder::Length { remaining } => *remaining == 0,
            BodyDecoder::Chunked(decoder) => decoder.is_done(),
        }
    }

    /// Like [`ChunkedDecoder::decode`] for any framing. To bound memory, pass a bounded slice
    /// of `input`: the payload appended is never longer than the input consumed.
    ///
    /// # Errors
    ///
    /// Only chunked framing errors.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), HttpError> {
        match self {
            BodyDecoder::Length { remaining } => {
                let take = usize::try_from(*remaining).map_or(input.len(), |r| r.min(input.len()));
                out.extend_from_slice(&input[..take]);
                *remaining -= take as u64;
                Ok((take, *remaining == 0))
            }
            BodyDecoder::Chunked(decoder) => decoder.decode(input, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize, bool), HttpError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let (n, done) = d.decode(input, &mut out)?;
        Ok((out, n, done))
    }

    #[test]
    fn decodes_and_stops_at_end() {
        let (out, n, done) =
            decode_all(b"4;x=y\r\nWiki\r\n5\r\npedia\r\n0\r\nA: b\r\n\r\nGET").unwrap();
        assert_eq!(out, b"Wikipedia");
        assert!(done);
        assert_eq!(n, 34);
    }

    #[test]
    fn byte_by_byte() {
        let input = b"a\r\n0123456789\r\n00\r\n\r\n";
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            let (n, done) = d.decode(std::slice::from_ref(b), &mut out).unwrap();
            assert_eq!(n, 1);
            assert_eq!(done, i == input.len() - 1);
        }
        assert_eq!(out, b"0123456789");
    }

    #[test]
    fn rejects_bad_framing() {
        for bad in [
            &b" 5\r\nhello\r\n0\r\n\r\n"[..],
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"\r\n",
            b"0\r\n folded: x\r\n\r\n",
            b"0\r\nname value\r\n\r\n",
        ] {
            let err = decode_all(bad).unwrap_err();
            assert_eq!(err.status(), 400, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn refuses_every_forbidden_trailer_in_any_case_and_keeps_others() {
        for name in FORBIDDEN_TRAILERS {
            assert!(name.len() <= LONGEST_FORBIDDEN, "{name}");
            for spelled in [name.to_string(), name.to_ascii_uppercase()] {
                let input = format!("0\r\n{spelled}: x\r\n\r\n");
                assert_eq!(
                    decode_all(input.as_bytes()),
                    Err(HttpError::ForbiddenTrailer),
                    "{spelled}"
                );
            }
        }
        for allowed in [
            "X-Checksum",
            "Hostname",
            "Content-Length-X",
            "T",
            "Server-Timing",
        ] {
            let input = format!("0\r\n{allowed}: x\r\n\r\n");
            assert!(decode_all(input.as_bytes()).is_ok(), "{allowed}");
        }
    }

    #[test]
    fn bounds_lines() {
        let mut line = b"1;".to_vec();
        line.resize(MAX_CHUNK_LINE + 10, b'a');
        assert_eq!(decode_all(&line), Err(HttpError::ChunkLineTooLong));
        let mut trailers = b"0\r\n".to_vec();
        while trailers.len() < MAX_TRAILERS + 100 {
            trailers.extend_from_slice(b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(decode_all(&trailers), Err(HttpError::TrailersTooLarge));
    }

    #[test]
    fn length_body_stops_at_length() {
        let mut d = BodyDecoder::new(BodyFraming::Length(3));
        let mut out = Vec::new();
        assert_eq!(d.decode(b"abcdef", &mut out), Ok((3, true)));
        assert_eq!(out, b"abc");
    }
}
