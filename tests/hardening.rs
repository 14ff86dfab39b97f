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

/// A client that sends less body than its Content-Length and then half-closes its side gets
/// its answer at once, every time. The race: bytes and end of input that arrive together
/// (while the worker is busy) come with one readiness event, and a read that returns less
/// than asked was taken to mean "nothing more until the next event", which never came.
/// Holding the worker inside the app while they arrive makes every round hit it.
#[test]
fn a_body_cut_short_by_a_half_close_is_answered_at_once_every_time() {
    // Without the fix the stalled connection is closed, unanswered, by the slow-client sweep.
    let s = ServerBuilder::new("hardening:app")
        .args(&["--timeout", "5"])
        .start();
    let fifo = s.dir().join("hold");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let hold = format!(
        "GET /hold?fifo={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        fifo.display()
    );
    for round in 0..20 {
        // A keep-alive connection the worker has served and now waits on.
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut first = [0u8; 512];
        let n = c.read(&mut first).expect("first response");
        assert_eq!(
            parse_one(&first[..n], false).expect("response").0.text(),
            "ok"
        );

        // The worker's only thread goes into the app; opening the FIFO for writing returns
        // once the app has it open for reading.
        let mut holder = TcpStream::connect(s.addr).expect("connect");
        holder.write_all(hold.as_bytes()).expect("write");
        let release = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the FIFO");
        // Meanwhile the short body and the end of input arrive together.
        c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        drop(release);
        let mut held = Vec::new();
        holder.read_to_end(&mut held).expect("read");
        assert_eq!(
            parse_one(&held, false).expect("response").0.text(),
            "released"
        );

        let mut answer = Vec::new();
        c.read_to_end(&mut answer).expect("read");
        let status = parse_one(&answer, false).map(|(r, _)| r.status);
        assert_eq!(
            status,
            Some(400),
            "round {round}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}

/// The leader's own folder in the runtime directory, which the sidecar finds it by.
fn leader_info(s: &forkscope_tests::Server) -> std::path::PathBuf {
    s.runtime.join(s.pid().to_string()).join("process.json")
}

/// Waits for the leader to report that worker `pid` panicked, and checks that the panic itself
/// (thread and message) is in the error log.
fn assert_panicked(s: &forkscope_tests::Server, pid: &str, thread: &str, message: &str) {
    s.wait_log(
        &format!("Worker (pid:{pid}) panicked"),
        Duration::from_secs(30),
    );
    let log = s.log_text();
    assert!(
        log.contains(&format!("panic in thread '{thread}'")) && log.contains(message),
        "the panic and its message are in the error log:\n{log}"
    );
}

/// A panic in a worker's main thread ends that worker with the panic in the error log, and
/// nothing else: it used to unwind into the leader's code inside the child, whose cleanup
/// deleted the leader's runtime folder. The leader serves on with a new worker.
/// (`FORKSCOPE_FAILPOINTS` injects the panic; debug builds only.)
#[test]
fn a_worker_panic_ends_that_worker_loudly_and_the_leader_serves_on() {
    let s = ServerBuilder::new("hardening:app")
        .env("FORKSCOPE_FAILPOINTS", "request=/panic")
        .start();
    assert!(leader_info(&s).is_file());
    let first = request(s.addr, "GET", "/pid", &[], b"").text();

    let answer = forkscope_tests::send_raw(
        s.addr,
        b"GET /panic HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    assert_panicked(&s, &first, "main", "failpoint request");

    let next = forkscope_tests::wait_for("a new worker", Duration::from_secs(30), || {
        let pid = request(s.addr, "GET", "/pid", &[], b"").text();
        (pid != first).then_some(pid)
    });
    assert!(!next.is_empty());
    assert!(
        leader_info(&s).is_file(),
        "the leader's runtime folder is intact"
    );
    assert_eq!(s.workers().len(), 1);
}

/// A panic in one of a worker's request threads (not the main one) ends the whole worker,
/// loudly, instead of leaving it to serve on one thread short without a word.
#[test]
fn a_panic_in_a_request_thread_ends_the_worker_loudly() {
    let s = ServerBuilder::new("hardening:app")
        .args(&["--threads", "2"])
        .env("FORKSCOPE_FAILPOINTS", "thread-start=loop-1")
        .start();
    // Each new worker panics the same way; any of them will do.
    let first = forkscope_tests::wait_for("a worker", Duration::from_secs(30), || {
        s.workers().first().map(|(_, pid)| pid.to_string())
    });
    assert_panicked(&s, &first, "loop-1", "failpoint thread-start");
    assert!(leader_info(&s).is_file());
}
