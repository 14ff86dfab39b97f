//! A deliberately small HTTP/1.1 client for tests: raw bytes out, parsed responses in, so tests
//! can send malformed requests and check exactly what came back.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` on a new connection and returns every byte the server sent until it closed the
/// connection (an orderly close or a reset: the server may reset a connection whose request it
/// rejected before reading all of it).
///
/// # Panics
/// When the connection cannot be made, when the server keeps it open for 30 s without sending
/// anything more, or when the write fails and nothing came back.
pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let written = s.write_all(raw);
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the server did not close the connection ({e}) after sending {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    if let Err(e) = written {
        assert!(!out.is_empty(), "write failed ({e}) and nothing came back");
    }
    out
}

/// Reads one response from a connection that stays open (keep-alive), not past its end.
///
/// # Panics
/// When the connection ends or fails before a whole response came.
pub fn read_response(conn: &mut impl Read) -> Response {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((r, _)) = parse_one(&buf, false) {
            return r;
        }
        match conn.read(&mut chunk) {
            Ok(0) => panic!(
                "the connection ended after {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&buf)),
        }
    }
}

/// Parses every complete response in `bytes`, in order (for pipelining tests). `head` tells,
/// per response, whether it answers a HEAD request (no body follows).
pub fn parse_responses(mut bytes: &[u8], head: &[bool]) -> Vec<Response> {
    let mut out = Vec::new();
    let mut i = 0;
    while !bytes.is_empty() {
        let is_head = head.get(i).copied().unwrap_or(false);
        match parse_one(bytes, is_head) {
            Some((r, used)) => {
                out.push(r);
                bytes = &bytes[used..];
                i += 1;
            }
            None => break,
        }
    }
    out
}

/// Parses one response; `None` when incomplete or malformed.
pub fn parse_one(bytes: &[u8], is_head: bool) -> Option<(Response, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(bytes).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = resp.code?;
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let rest = &bytes[head_len..];
    if is_head || status == 204 || status == 304 || (100..200).contains(&status) {
        return Some((
            Response {
                status,
                headers,
                body: Vec::new(),
            },
            head_len,
        ));
    }
    if let Some(len) = find("content-length") {
        let len: usize = len.trim().parse().ok()?;
        if rest.len() < len {
            return None;
        }
        return Some((
            Response {
                status,
                headers,
                body: rest[..len].to_vec(),
            },
            head_len + len,
        ));
    }
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let line_end = rest[pos..].windows(2).position(|w| w == b"\r\n")? + pos;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[pos..line_end]).ok()?.trim(), 16)
                    .ok()?;
            pos = line_end + 2;
            if size == 0 {
                // No trailers in our responses: the final CRLF follows.
                if rest.len() < pos + 2 {
                    return None;
                }
                return Some((
                    Response {
                        status,
                        headers,
                        body,
                    },
                    head_len + pos + 2,
                ));
            }
            if rest.len() < pos + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
    }
    // Delimited by close.
    Some((
        Response {
            status,
            headers,
            body: rest.to_vec(),
        },
        bytes.len(),
    ))
}

/// Sends one request with `Connection: close` and parses the response.
///
/// # Panics
/// When the response cannot be parsed.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    let out = send_raw(addr, &bytes);
    parse_one(&out, method == "HEAD")
        .map(|(r, _)| r)
        .unwrap_or_else(|| {
            panic!(
                "unparsable response to {method} {path}: {:?}",
                String::from_utf8_lossy(&out)
            )
        })
}
