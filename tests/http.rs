//! HTTP/1.x on real sockets: keep-alive, pipelining, 100-continue, malformed and smuggling
//! requests, limits, and clients that trickle or vanish.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forkscope_tests::client::{parse_one, parse_responses, read_response};
use forkscope_tests::{Held, ServerBuilder, request, send_raw};

fn status_of(raw: &[u8]) -> u16 {
    parse_one(raw, false).map_or(0, |(r, _)| r.status)
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let s = ServerBuilder::new("app:app").start();
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Three pipelined requests in one write, the last one closing the connection.
    c.write_all(
        b"GET /pid HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
          HEAD / HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /stream?n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("write");
    let mut out = Vec::new();
    c.read_to_end(&mut out).expect("read");
    let responses = parse_responses(&out, &[false, false, true, false]);
    assert_eq!(responses.len(), 4, "{:?}", String::from_utf8_lossy(&out));
    assert!(responses[0].text().parse::<u32>().is_ok());
    assert_eq!(responses[1].text(), "hello");
    assert!(responses[2].body.is_empty());
    assert_eq!(responses[3].text(), "chunk0\nchunk1\n");
    assert_eq!(responses[3].header("connection"), Some("close"));
}

#[test]
fn http_1_0_closes_unless_keep_alive_is_asked() {
    // Idle connections live longer than send_raw waits for a close: only the server's closing
    // of an HTTP/1.0 connection after its response ends the reads below.
    let s = ServerBuilder::new("app:app")
        .args(&["--keep-alive", "120"])
        .start();
    let out = send_raw(s.addr, b"GET / HTTP/1.0\r\n\r\n");
    let (r, _) = parse_one(&out, false).expect("response");
    assert_eq!(r.text(), "Hello, World!");
    // Streaming responses to HTTP/1.0 are delimited by close (no chunked encoding in 1.0).
    let out = send_raw(s.addr, b"GET /stream?n=2 HTTP/1.0\r\n\r\n");
    let (r, _) = parse_one(&out, false).expect("response");
    assert!(r.header("transfer-encoding").is_none());
    assert_eq!(r.text(), "chunk0\nchunk1\n");
    // Keep-alive on request: two requests on one connection.
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).expect("read");
        let (r, _) = parse_one(&buf[..n], false).expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
}

#[test]
fn expect_100_continue_gets_an_interim_response() {
    let s = ServerBuilder::new("app:app").start();
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .expect("write head");
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).expect("read interim");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    c.write_all(b"ping").expect("write body");
    let mut out = buf[..n].to_vec();
    c.read_to_end(&mut out).expect("read");
    let responses = parse_responses(&out, &[false, false]);
    assert_eq!(responses.len(), 2, "{:?}", String::from_utf8_lossy(&out));
    assert_eq!(responses[0].status, 100);
    assert_eq!(responses[1].status, 200);
    assert_eq!(responses[1].text(), "ping");
}

#[test]
fn malformed_and_smuggling_requests_get_4xx_and_the_worker_lives() {
    let s = ServerBuilder::new("app:app").start();
    let pid = request(s.addr, "GET", "/pid", &[], b"").text();
    let cases: &[(&[u8], u16)] = &[
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /\r\n\r\n", 400),
    ];
    for (raw, status) in cases {
        let out = send_raw(s.addr, raw);
        assert_eq!(
            status_of(&out),
            *status,
            "{:?} -> {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&out)
        );
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        assert!(
            text.contains("connection: close"),
            "error responses close the connection"
        );
    }
    assert_eq!(
        request(s.addr, "GET", "/pid", &[], b"").text(),
        pid,
        "the worker survived"
    );
}

#[test]
fn limits_give_414_and_431() {
    let s = ServerBuilder::new("app:app")
        .args(&[
            "--limit-request-line",
            "100",
            "--limit-request-fields",
            "5",
            "--limit-request-field_size",
            "200",
        ])
        .start();
    let long_line = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(200));
    assert_eq!(status_of(&send_raw(s.addr, long_line.as_bytes())), 414);
    let many: String = (0..10).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(status_of(&send_raw(s.addr, many.as_bytes())), 431);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "v".repeat(500)
    );
    assert_eq!(status_of(&send_raw(s.addr, big.as_bytes())), 431);
    assert_eq!(request(s.addr, "GET", "/", &[], b"").status, 200);
}

#[test]
fn a_trickling_client_does_not_block_others() {
    let s = ServerBuilder::new("app:app").start();
    let mut slow = TcpStream::connect(s.addr).expect("connect");
    slow.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
        .expect("write");
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(s.addr).expect("idle connection"));
    }
    // The one worker serves others while the slow upload and the idle connections wait.
    for _ in 0..20 {
        assert_eq!(request(s.addr, "GET", "/", &[], b"").status, 200);
    }
    slow.write_all(b"cdefghij").expect("finish upload");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; 4096];
    let n = slow.read(&mut buf).expect("read");
    let (r, _) = parse_one(&buf[..n], false).expect("response");
    assert_eq!(r.text(), "abcdefghij");
}

/// A request that arrives on a kept-alive connection while the worker runs a long request is
/// answered once the worker is free, however long the connection then looked idle.
#[test]
fn a_request_sent_while_the_worker_is_busy_is_answered() {
    let s = ServerBuilder::new("app:app")
        .args(&["--keep-alive", "1"])
        .start();
    let mut kept = TcpStream::connect(s.addr).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let ask = |c: &mut TcpStream| {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        read_response(c)
    };
    assert_eq!(ask(&mut kept).status, 200);
    let held = Held::start(s.addr);
    let asked = std::thread::spawn(move || ask(&mut kept));
    // The worker stays busy for longer than --keep-alive (what is tested is that time).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(held.release().text(), "released");
    assert_eq!(asked.join().expect("the kept-alive client").status, 200);
}

#[test]
fn a_client_that_vanishes_mid_request_costs_nothing() {
    let s = ServerBuilder::new("app:app").start();
    let pid = request(s.addr, "GET", "/pid", &[], b"").text();
    for _ in 0..20 {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
            .expect("write");
        drop(c);
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.write_all(b"GET /large?n=4000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        drop(c);
    }
    assert_eq!(request(s.addr, "GET", "/pid", &[], b"").text(), pid);
}

/// A worker writes the responses of one batch of events together, after the batch's requests
/// ran; a slow request in the batch must not hold the finished responses before it. Here one
/// worker is held in a request while client A (a fast request) and then client B (a request
/// that stays in the app until the test releases it) connect: once the worker is free it takes
/// both in one batch, answers A, and runs B. A's answer must come while B is still in the app
/// (held back behind B, it would never come: the test releases B only after reading it).
#[test]
fn a_finished_response_is_not_held_behind_a_slow_request() {
    let s = ServerBuilder::new("app:app").start();
    let busy = Held::start(s.addr);
    let mut a = TcpStream::connect(s.addr).expect("connect a");
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write a");
    let dir = tempfile::tempdir().expect("tempdir");
    let (marker, release) = (dir.path().join("in-app"), dir.path().join("release"));
    let mut b = TcpStream::connect(s.addr).expect("connect b");
    write!(
        b,
        "GET /hold?marker={}&release={} HTTP/1.1\r\nHost: x\r\n\r\n",
        marker.display(),
        release.display()
    )
    .expect("write b");
    assert_eq!(busy.release().text(), "released");
    a.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let answer = read_response(&mut a);
    assert_eq!(answer.text(), "Hello, World!");
    std::fs::write(&release, b"").expect("release b");
    b.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    assert_eq!(read_response(&mut b).text(), "released");
    assert!(marker.exists());
}

/// A client that sends its requests and then ends its side (`shutdown(SHUT_WR)`, as `nc -N`
/// and some health checks do) gets every answer before the server closes, also when the end of
/// input arrives with the requests in one event while the answers wait to be written (here:
/// sent while the one worker is held in another request).
#[test]
fn a_client_that_half_closes_after_its_requests_gets_every_answer() {
    let s = ServerBuilder::new("app:app").start();
    for requests in [1, 3] {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let ask = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        // A kept-alive connection first, so the worker watches it when the rest arrives.
        c.write_all(ask).expect("write");
        assert_eq!(read_response(&mut c).text(), "Hello, World!");
        let busy = Held::start(s.addr);
        c.write_all(&ask.repeat(requests)).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        assert_eq!(busy.release().text(), "released");
        let mut out = Vec::new();
        c.read_to_end(&mut out).expect("read");
        let answers = parse_responses(&out, &vec![false; requests]);
        assert_eq!(
            answers.len(),
            requests,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        assert!(answers.iter().all(|r| r.text() == "Hello, World!"));
    }
}
