//! A keep-alive client: one connection, many requests, each answer read before the next.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::client::{Response, parse_one};

/// One open HTTP/1.1 connection.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    /// Connects (the server accepts whenever it chooses; the first request waits for that).
    ///
    /// # Panics
    /// When the connection cannot be made.
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// `GET path` on this connection; the response must keep the connection open.
    ///
    /// # Panics
    /// When the request cannot be written, or the server closes or answers garbage.
    pub fn get(&mut self, path: &str) -> Response {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream.write_all(raw.as_bytes()).expect("write");
        loop {
            if let Some((resp, used)) = parse_one(&self.buf, false) {
                self.buf.drain(..used);
                assert_ne!(
                    resp.header("connection"),
                    Some("close"),
                    "the server closes a keep-alive connection"
                );
                return resp;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "the server closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}
