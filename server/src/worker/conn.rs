//! One client connection: bytes in, complete requests out, response bytes back.
//!
//! The connection never blocks: it reads what the socket has, parses as far as the bytes allow
//! ("need more" is a state, not an error), and holds a request until its whole body is here.
//! Bodies larger than [`SPILL_THRESHOLD`] go to an unlinked temporary file as they arrive.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use mio::net::{TcpStream, UnixStream};

use crate::http::{self, BodyFraming, ChunkedDecoder, HttpError, Limits, RequestHead};
use crate::wsgi::Request;
use crate::wsgi::environ::Peer;
use crate::wsgi::input::{Body, SPILL_THRESHOLD};
use crate::wsgi::output::{FLUSH_AT, Output};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// Reads from `fd` straight into the unused capacity of `buf` (no zero-filling: a per-read
/// memset of the buffer showed up in profiles).
/// Returns the bytes read and the bytes asked for.
fn read_into_spare(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<(usize, usize)> {
    buf.reserve(READ_CHUNK);
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most `spare.len()` bytes into memory we own, and we extend
    // the length by exactly the number of bytes it reports.
    let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let asked = spare.len();
    // SAFETY: read(2) initialized the first `n` bytes of the spare capacity (n <= asked), so
    // the new length covers only initialized bytes within the allocation.
    unsafe { buf.set_len(buf.len() + n) };
    Ok((n, asked))
}

/// Upper bound of buffered head bytes, whatever the limits say (so a client cannot make the
/// worker buffer without end while sending a head that never completes).
const MAX_HEAD_BYTES: usize = 1024 * 1024;

/// The two kinds of stream a listener hands out.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// The descriptor, for direct writes by the WSGI bridge.
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    /// The mio source, to (de)register.
    pub fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => s,
        }
    }
}

/// Where a request body goes while it arrives.
#[derive(Debug)]
enum Sink {
    Memory(Vec<u8>),
    File(File),
}

impl Sink {
    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if let Sink::Memory(buf) = self {
            if buf.len() + data.len() <= SPILL_THRESHOLD {
                buf.extend_from_slice(data);
                return Ok(());
            }
            let mut file = tempfile::tempfile()?;
            file.write_all(buf)?;
            *self = Sink::File(file);
        }
        match self {
            Sink::File(f) => f.write_all(data),
            Sink::Memory(_) => unreachable!("spilled above"),
        }
    }

    fn into_body(self) -> Body {
        match self {
            Sink::Memory(v) => Body::Memory(v),
            Sink::File(f) => Body::Spilled(f),
        }
    }
}

#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// What the connection is waiting for. (One per connection, moved rarely: the size
/// difference between variants costs nothing worth a heap allocation per request.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    /// The next request head.
    Head,
    /// The body of `head`.
    Body {
        head: RequestHead,
        state: BodyState,
        sink: Sink,
    },
    /// A request is with the app (another thread, in threaded mode).
    Busy,
}

/// What the event loop should do next with a connection. (Returned by value once per step;
/// boxing the request would add an allocation per request.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Next {
    /// Wait for readiness (readable or writable, whichever it waits for).
    Wait,
    /// Run this request.
    Dispatch(Request),
    /// Close the connection now.
    Close,
}

/// One client connection.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    peer: Peer,
    rbuf: Vec<u8>,
    /// Response bytes not yet written.
    pub out: Vec<u8>,
    phase: Phase,
    /// Close once `out` is written (an error response, or keep-alive is off).
    close_after_write: bool,
    /// Last time bytes moved, for the idle and request timeouts.
    pub last_active: Instant,
    /// Requests served on this connection.
    pub served: u64,
    /// Listed among the connections whose bytes the event loop writes at the end of its batch.
    pub write_deferred: bool,
    eof: bool,
    /// The last read returned less than it asked for: the socket had nothing more, and (edge-
    /// triggered) new bytes will come with a new readable event. Saves one read(2) per request.
    drained: bool,
    /// The peer's end of input (or an error) was reported. It may have come with the same
    /// event as the last bytes, and no event follows it: reads go on until they return 0.
    hung_up: bool,
}

impl Conn {
    /// A fresh connection.
    pub fn new(stream: Stream, peer: Peer) -> Self {
        Self {
            stream,
            peer,
            rbuf: Vec::new(),
            out: Vec::new(),
            phase: Phase::Head,
            close_after_write: false,
            last_active: Instant::now(),
            served: 0,
            write_deferred: false,
            eof: false,
            drained: false,
            hung_up: false,
        }
    }

    /// The socket reported new bytes, or a hang-up (`hung_up`): reading may find something
    /// again.
    pub fn readable(&mut self, hung_up: bool) {
        self.drained = false;
        self.hung_up |= hung_up;
    }

    /// True while the app has a request of this connection.
    pub fn is_busy(&self) -> bool {
        matches!(self.phase, Phase::Busy)
    }

    /// True when no request is in progress and nothing is waiting to be sent.
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Head) && self.rbuf.is_empty() && self.out.is_empty()
    }

    /// True when the socket holds bytes not read yet (a peek; end of input and errors count as
    /// none).
    pub fn has_unread(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv writes at most one byte into `byte`, which lives for the call; MSG_PEEK
        // leaves the byte in the socket and MSG_DONTWAIT keeps the call from blocking.
        let n = unsafe {
            libc::recv(
                self.stream.fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }

    /// Takes back the connection after the app handled its request.
    pub fn finish_request(&mut self, keep_alive: bool, pending: Vec<u8>) {
        self.phase = Phase::Head;
        self.out = pending;
        self.served += 1;
        self.last_active = Instant::now();
        if !keep_alive {
            self.close_after_write = true;
        }
    }

    /// Moves the connection forward as far as it can without blocking. With `defer_writes`,
    /// response bytes are left in `out` for the caller to write later (unless the connection
    /// closes after them or they pass [`FLUSH_AT`]), and parsing goes on past them.
    pub fn advance(&mut self, limits: &Limits, defer_writes: bool) -> Next {
        loop {
            if self.is_busy() {
                return Next::Wait;
            }
            let defer = defer_writes && !self.close_after_write && self.out.len() < FLUSH_AT;
            if !defer && let Some(next) = self.flush_out() {
                return next;
            }
            if self.close_after_write {
                return Next::Close;
            }
            match self.step(limits) {
                // Bytes queued by this step (a 100 Continue) go out before we wait.
                Ok(Some(Next::Wait)) if !self.out.is_empty() && !defer => {}
                // The client ended its input: what it was answered still goes out first.
                Ok(Some(Next::Close)) if !self.out.is_empty() => self.close_after_write = true,
                // A pipelined request: the answers before it go out before it runs, not after.
                Ok(Some(Next::Dispatch(req))) => {
                    let _ = self.flush_out();
                    return Next::Dispatch(req);
                }
                Ok(Some(next)) => return next,
                Ok(None) => {}
                Err(err) => {
                    log::debug!("bad request from {:?}: {err}", self.peer.remote);
                    http::error_response(&err, &mut self.out);
                    self.close_after_write = true;
                    self.phase = Phase::Head;
                    self.rbuf.clear();
                }
            }
        }
    }

    /// Writes the response bytes left in `out` and nothing else: `Close` when the connection
    /// is done (its last bytes written, or the peer gone), `Wait` otherwise.
    pub fn write_out(&mut self) -> Next {
        match self.flush_out() {
            Some(next) => next,
            None if self.close_after_write => Next::Close,
            None => Next::Wait,
        }
    }

    /// Writes what the socket takes of `out`. `None` when all of it went (or there was
    /// nothing); `Wait` when the socket is full; `Close` when the peer is gone.
    fn flush_out(&mut self) -> Option<Next> {
        if self.out.is_empty() {
            return None;
        }
        let mut output = Output::new(
            self.stream.fd(),
            std::mem::take(&mut self.out),
            std::time::Duration::ZERO,
        );
        let flushed = output.try_flush();
        self.out = std::mem::take(&mut output.buf);
        match flushed {
            Ok(true) => {
                self.last_active = Instant::now();
                None
            }
            Ok(false) => Some(Next::Wait),
            Err(_) => Some(Next::Close),
        }
    }

    /// One parsing step. `Ok(None)`: progress was made, go on.
    fn step(&mut self, limits: &Limits) -> Result<Option<Next>, HttpError> {
        match &mut self.phase {
            Phase::Busy => Ok(Some(Next::Wait)),
            Phase::Head => match http::parse_head(&self.rbuf, limits)? {
                None => {
                    if self.rbuf.len() > MAX_HEAD_BYTES {
                        return Err(HttpError::TooManyFields);
                    }
                    self.fill()
                }
                Some((head, used)) => {
                    self.rbuf.drain(..used);
                    let state = match head.framing {
                        BodyFraming::None => None,
                        BodyFraming::Length(0) => None,
                        BodyFraming::Length(n) => Some(BodyState::Length(n)),
                        BodyFraming::Chunked => Some(BodyState::Chunked(ChunkedDecoder::new())),
                    };
                    match state {
                        None => Ok(Some(self.dispatch(head, Sink::Memory(Vec::new())))),
                        Some(state) => {
                            if head.expect_continue {
                                self.out.extend_from_slice(http::CONTINUE_100);
                            }
                            let sink = match state {
                                BodyState::Length(n) if n as usize <= SPILL_THRESHOLD => {
                                    Sink::Memory(Vec::with_capacity(n as usize))
                                }
                                _ => Sink::Memory(Vec::new()),
                            };
                            self.phase = Phase::Body { head, state, sink };
                            Ok(None)
                        }
                    }
                }
            },
            Phase::Body { state, sink, .. } => {
                let done = match state {
                    BodyState::Length(remaining) => {
                        let take = (*remaining).min(self.rbuf.len() as u64) as usize;
                        sink.push(&self.rbuf[..take])
                            .map_err(|_| HttpError::PayloadTooLarge)?;
                        self.rbuf.drain(..take);
                        *remaining -= take as u64;
                        *remaining == 0
                    }
                    BodyState::Chunked(decoder) => {
                        let mut decoded = Vec::new();
                        let (used, done) = decoder.decode(&self.rbuf, &mut decoded)?;
                        self.rbuf.drain(..used);
                        sink.push(&decoded)
                            .map_err(|_| HttpError::PayloadTooLarge)?;
                        done
                    }
                };
                if done {
                    let Phase::Body { head, sink, .. } =
                        std::mem::replace(&mut self.phase, Phase::Head)
                    else {
                        unreachable!("matched Body above");
                    };
                    return Ok(Some(self.dispatch(head, sink)));
                }
                self.fill()
            }
        }
    }

    fn dispatch(&mut self, head: RequestHead, sink: Sink) -> Next {
        self.phase = Phase::Busy;
        Next::Dispatch(Request {
            head,
            body: sink.into_body(),
            peer: self.peer.clone(),
        })
    }

    /// Reads what the socket has. `Ok(None)` when bytes arrived; `Wait` or `Close` otherwise.
    ///
    /// # Errors
    /// The client ended its input in the middle of a body.
    fn fill(&mut self) -> Result<Option<Next>, HttpError> {
        if self.eof {
            return Ok(Some(Next::Close));
        }
        if self.drained && !self.hung_up {
            return Ok(Some(Next::Wait));
        }
        match read_into_spare(self.stream.fd(), &mut self.rbuf) {
            Ok((0, _)) => {
                self.eof = true;
                // A half-closed client still reads: it is told its request was incomplete.
                if matches!(self.phase, Phase::Body { .. }) {
                    return Err(HttpError::IncompleteBody);
                }
                Ok(Some(Next::Close))
            }
            Ok((n, asked)) => {
                self.drained = n < asked;
                self.last_active = Instant::now();
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(Next::Wait)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(_) => Ok(Some(Next::Close)),
        }
    }

    /// True when the connection waits for bytes of a request it has begun to receive.
    pub fn mid_request(&self) -> bool {
        match self.phase {
            Phase::Head => !self.rbuf.is_empty(),
            Phase::Body { .. } => true,
            Phase::Busy => false,
        }
    }
}
