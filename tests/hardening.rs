//! Issue 14, the server half: what a buggy worker, a racing app thread or a half-closing client
//! must not be able to do to the server (app: tests/apps/hardening.py).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use forkscope_tests::client::parse_one;
use forkscope_tests::{ServerBuilder, request};

/// A file of `len` copies of `byte`.
fn file_of(dir: &std::path::Path, name: &str, byte: u8, len: usize) -> String {
    let path = dir.join(name);
    std::fs::write(&path, vec![byte; len]).expect("write test file");
    path.to_str().expect("UTF-8 temp path").to_owned()
}

/// sendfile(2) runs with the GIL released: another thread of the app may close the file and
/// its descriptor number be reused by the time the kernel reads it. The response must still be
/// the file the app returned.
#[test]
fn sendfile_sends_the_returned_file_even_if_its_descriptor_is_reused() {
    let s = ServerBuilder::new("hardening:app")
        .args(&["--threads", "2"])
        .start();
    // Larger than what the socket buffers hold, so sendfile is still at work when /swap runs.
    const LEN: usize = 32 << 20;
    let sent = file_of(s.dir(), "sent", b'A', LEN);
    let other = file_of(s.dir(), "other", b'B', LEN);

    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        c,
        "GET /sendfile?path={sent} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    // Body bytes have arrived: the response is being sent from the file.
    let mut received = vec![0u8; 64 * 1024];
    c.read_exact(&mut received)
        .expect("the start of the response");

    let swap = request(s.addr, "GET", &format!("/swap?path={other}"), &[], b"");
    assert_eq!(swap.text(), "swapped");

    c.read_to_end(&mut received)
        .expect("the rest of the response");
    let (r, _) = parse_one(&received, false).expect("a complete response");
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), LEN);
    let foreign = r.body.iter().filter(|b| **b != b'A').count();
    assert_eq!(foreign, 0, "bytes of another file were sent");
}
