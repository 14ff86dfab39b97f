//! PEP 3333 behaviour of the real server with a real app.

use std::time::Duration;

use forkscope_tests::{ServerBuilder, client::parse_one, request, send_raw};

#[test]
fn hello_and_environ_match_pep_3333_and_gunicorn() {
    let s = ServerBuilder::new("app:app").start();
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Hello, World!");
    assert!(r.header("date").is_some());
    assert_eq!(r.header("server"), Some("forkscope"));

    let r = request(
        s.addr,
        "GET",
        "/environ?a=1&b=%20x",
        &[
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Content-Type", "text/x"),
            ("Bad_Header", "dropped"),
        ],
        b"",
    );
    let env: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(env["REQUEST_METHOD"], "GET");
    assert_eq!(env["PATH_INFO"], "/environ");
    assert_eq!(env["QUERY_STRING"], "a=1&b=%20x");
    assert_eq!(env["RAW_URI"], "/environ?a=1&b=%20x");
    assert_eq!(env["SERVER_PROTOCOL"], "HTTP/1.1");
    assert_eq!(env["SERVER_NAME"], "127.0.0.1");
    assert_eq!(env["SERVER_PORT"], s.addr.port().to_string());
    assert_eq!(env["REMOTE_ADDR"], "127.0.0.1");
    assert!(
        env["REMOTE_PORT"]
            .as_str()
            .expect("port")
            .parse::<u16>()
            .is_ok()
    );
    assert_eq!(env["HTTP_X_CUSTOM"], "one,two");
    assert_eq!(env["CONTENT_TYPE"], "text/x");
    assert!(env.get("HTTP_CONTENT_TYPE").is_none());
    assert!(
        env.get("HTTP_BAD_HEADER").is_none(),
        "headers with underscores are dropped"
    );
    assert_eq!(env["SCRIPT_NAME"], "");
    assert_eq!(env["wsgi.url_scheme"], "http");
    assert_eq!(env["wsgi.version"], serde_json::json!([1, 0]));
    assert_eq!(env["wsgi.multiprocess"], false);
    assert_eq!(env["wsgi.multithread"], false);
    assert_eq!(env["wsgi.run_once"], false);
    assert_eq!(env["wsgi.input_terminated"], true);
}

/// A worker reuses the strings of one request for the next and copies each environ from a
/// template holding the usual values: nothing of one request may show in another's environ.
#[test]
fn one_requests_environ_never_shows_in_the_next() {
    let s = ServerBuilder::new("app:app").start();
    let unusual = |addr| -> serde_json::Value {
        let raw = "POST /environ/one?x=1 HTTP/1.0\r\nHost: example.com:8080\r\n\
                   X-Forwarded-Proto: https\r\nUser-Agent: first\r\nX-Only-First: yes\r\n\
                   Content-Length: 0\r\n\r\n";
        let out = send_raw(addr, raw.as_bytes());
        let (r, _) = parse_one(&out, false).expect("a response");
        serde_json::from_slice(&r.body).expect("json")
    };
    let usual = |addr| -> serde_json::Value {
        let r = request(addr, "GET", "/environ", &[("User-Agent", "second")], b"");
        serde_json::from_slice(&r.body).expect("json")
    };
    // Twice each, alternating: the second of each kind is served from reused strings.
    for _ in 0..2 {
        let env = unusual(s.addr);
        assert_eq!(env["REQUEST_METHOD"], "POST");
        assert_eq!(env["QUERY_STRING"], "x=1");
        assert_eq!(env["SERVER_PROTOCOL"], "HTTP/1.0");
        assert_eq!(env["wsgi.url_scheme"], "https");
        assert_eq!(env["SERVER_NAME"], "example.com");
        assert_eq!(env["SERVER_PORT"], "8080");
        assert_eq!(env["HTTP_USER_AGENT"], "first");
        assert_eq!(env["HTTP_X_ONLY_FIRST"], "yes");

        let env = usual(s.addr);
        assert_eq!(env["REQUEST_METHOD"], "GET");
        assert_eq!(env["QUERY_STRING"], "");
        assert_eq!(env["SERVER_PROTOCOL"], "HTTP/1.1");
        assert_eq!(env["wsgi.url_scheme"], "http");
        assert_eq!(env["SERVER_NAME"], "127.0.0.1");
        assert_eq!(env["SERVER_PORT"], s.addr.port().to_string());
        assert_eq!(env["PATH_INFO"], "/environ");
        assert_eq!(env["HTTP_USER_AGENT"], "second");
        assert!(env.get("HTTP_X_ONLY_FIRST").is_none(), "{env}");
        assert!(env.get("HTTP_X_FORWARDED_PROTO").is_none(), "{env}");
        let map = env.as_object().expect("an object");
        for (key, value) in map {
            assert!(!value.is_null(), "{key} has no value: {env}");
            assert!(!key.starts_with("forkscope."), "{key} is not WSGI: {env}");
        }
    }
}

#[test]
fn percent_encoded_paths_are_decoded_as_latin1() {
    let s = ServerBuilder::new("app:app").start();
    let r = request(s.addr, "GET", "/environ/caf%C3%A9%20x", &[], b"");
    let env: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    // UTF-8 bytes C3 A9 decoded as latin-1, as PEP 3333 requires.
    assert_eq!(env["PATH_INFO"], "/environ/caf\u{c3}\u{a9} x");
}

#[test]
fn forwarded_proto_is_honoured_only_from_allowed_ips() {
    let s = ServerBuilder::new("app:app").start();
    let env = |s: &forkscope_tests::Server| -> serde_json::Value {
        let r = request(
            s.addr,
            "GET",
            "/environ",
            &[("X-Forwarded-Proto", "https")],
            b"",
        );
        serde_json::from_slice(&r.body).expect("json")
    };
    // 127.0.0.1 is in the default --forwarded-allow-ips.
    assert_eq!(env(&s)["wsgi.url_scheme"], "https");
    drop(s);
    let s = ServerBuilder::new("app:app")
        .args(&["--forwarded-allow-ips", "10.1.2.3"])
        .start();
    assert_eq!(env(&s)["wsgi.url_scheme"], "http");
}

#[test]
fn request_bodies_reach_wsgi_input_every_way() {
    let s = ServerBuilder::new("app:app").start();
    let body = b"line one\nline two\nlast";
    for mode in ["read", "lines", "iter", "chunks"] {
        let r = request(s.addr, "POST", &format!("/echo?mode={mode}"), &[], body);
        assert_eq!(r.status, 200, "{mode}");
        assert_eq!(r.body, body, "{mode}");
        assert_eq!(r.header("x-content-length"), Some("22"));
    }
}

#[test]
fn chunked_request_bodies_are_decoded() {
    let s = ServerBuilder::new("app:app").start();
    let raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
    let out = send_raw(s.addr, raw);
    let (r, _) = parse_one(&out, false).expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(
        r.header("x-content-length"),
        Some("None"),
        "no CONTENT_LENGTH for chunked bodies"
    );
}

#[test]
fn uploads_larger_than_memory_buffers_arrive_whole() {
    let s = ServerBuilder::new("app:app").start();
    // 8 MiB: well past the 1 MiB in-memory threshold, so the body is spilled to a file.
    let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = request(s.addr, "POST", "/digest", &[], &body);
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["size"], body.len());
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(&body)?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    let expected = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        v["sha256"],
        expected.split_whitespace().next().expect("digest")
    );
}

#[test]
fn streaming_write_and_close_follow_pep_3333() {
    let s = ServerBuilder::new("app:app").start();
    let r = request(s.addr, "GET", "/stream?n=4", &[], b"");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.text(), "chunk0\nchunk1\nchunk2\nchunk3\n");

    let r = request(s.addr, "GET", "/write", &[], b"");
    assert_eq!(r.text(), "written and returned");

    let marker = s.dir().join("closed");
    let r = request(
        s.addr,
        "GET",
        &format!("/close?marker={}", marker.display()),
        &[],
        b"",
    );
    assert_eq!(r.text(), "body");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("close() was called"),
        "closed"
    );

    let r = request(s.addr, "GET", "/file", &[], b"");
    let source = std::fs::read(forkscope_tests::apps_dir().join("app.py")).expect("read app.py");
    assert_eq!(r.body, source);

    let r = request(s.addr, "GET", "/large?n=65536", &[], b"");
    assert_eq!(r.body.len(), 65536);
}

#[test]
fn app_errors_give_500_and_a_traceback_and_the_worker_lives() {
    let s = ServerBuilder::new("app:app").start();
    let pid_before = request(s.addr, "GET", "/pid", &[], b"").text();
    for path in ["/error", "/bad-type", "/no-start"] {
        let r = request(s.addr, "GET", path, &[], b"");
        assert_eq!(r.status, 500, "{path}");
    }
    s.wait_log(
        "RuntimeError: boom from the test app",
        Duration::from_secs(10),
    );
    s.wait_log("Traceback (most recent call last)", Duration::from_secs(10));
    // An error after the head was sent cuts the response short instead.
    let out = send_raw(s.addr, b"GET /error-after-head HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "an incomplete chunked body must not look complete"
    );
    let pid_after = request(s.addr, "GET", "/pid", &[], b"").text();
    assert_eq!(pid_before, pid_after, "the same worker keeps serving");
}

#[test]
fn factory_form_and_head_requests() {
    let s = ServerBuilder::new("app:create_app('bonjour')").start();
    assert_eq!(request(s.addr, "GET", "/", &[], b"").text(), "bonjour");
    let r = request(s.addr, "HEAD", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("7"));
    assert!(r.body.is_empty());
}

#[test]
fn the_stdlib_validator_finds_nothing_to_complain_about() {
    let s = ServerBuilder::new("validated:app").start();
    for (method, path, body) in [
        ("GET", "/", &b""[..]),
        ("GET", "/environ?x=1", b""),
        ("POST", "/echo?mode=chunks", b"abc\ndef"),
        ("POST", "/echo?mode=lines", b"abc\ndef\n"),
        ("POST", "/echo?mode=iter", b"abc\ndef\n"),
        ("GET", "/stream", b""),
        ("GET", "/write", b""),
        ("GET", "/errors", b""),
        ("GET", "/large?n=100000", b""),
    ] {
        let r = request(s.addr, method, path, &[], body);
        assert_eq!(r.status, 200, "{method} {path}: {}", s.log_text());
    }
    let log = s.log_text();
    assert!(
        !log.contains("AssertionError"),
        "the validator complained:\n{log}"
    );
    assert!(!log.contains("WSGIWarning"), "the validator warned:\n{log}");
}

#[test]
fn access_log_lines_follow_gunicorns_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let access = dir.path().join("access.log");
    let s = ServerBuilder::new("app:app")
        .args(&["--access-logfile", access.to_str().expect("utf-8")])
        .start();
    request(
        s.addr,
        "GET",
        "/?x=1",
        &[("User-Agent", "probe/1"), ("Referer", "http://r/")],
        b"",
    );
    let line = forkscope_tests::wait_for("the access-log line", Duration::from_secs(10), || {
        std::fs::read_to_string(&access)
            .ok()
            .filter(|t| t.ends_with('\n'))
    });
    // 127.0.0.1 - - [25/Nov/2026:21:10:00 +0000] "GET /?x=1 HTTP/1.1" 200 13 "http://r/" "probe/1"
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("] \"GET /?x=1 HTTP/1.1\" 200 13 \"http://r/\" \"probe/1\"\n"),
        "{line}"
    );
}

#[test]
fn file_wrapper_sends_files_from_their_position_and_iterates_the_rest() {
    let s = ServerBuilder::new("app:app").start();
    let source = std::fs::read(forkscope_tests::apps_dir().join("app.py")).expect("read app.py");
    for (path, expected) in [
        ("/file", &source[..]),
        ("/file?seek=100", &source[100..]),
        ("/file?nolength=1", &source[..]),
    ] {
        let r = request(s.addr, "GET", path, &[], b"");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.body, expected, "{path}");
    }
    let r = request(s.addr, "HEAD", "/file", &[], b"");
    assert!(r.body.is_empty());
    let r = request(s.addr, "GET", "/bytesio", &[], b"");
    assert_eq!(r.body, b"in-memory ".repeat(1000));
}

/// With `--threads`, a request thread keeps its Python thread state between requests, so what
/// an app keeps in a `threading.local` (a per-thread database connection, a cache) is still
/// there for the thread's next request. (The main thread always had its own; the test looks
/// for a connection held by another thread.)
#[test]
fn thread_local_data_lives_across_requests_of_a_thread() {
    let s = ServerBuilder::new("app:app")
        .args(&["--threads", "3"])
        .start();
    let ask = |conn: &mut std::net::TcpStream| -> (String, u32, bool) {
        std::io::Write::write_all(conn, b"GET /thread-local HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let text = forkscope_tests::client::read_response(conn).text();
        let f: Vec<&str> = text.split(' ').collect();
        (f[0].to_owned(), f[1].parse().expect("count"), f[2] == "1")
    };
    let mut open = Vec::new();
    let (mut conn, first) = loop {
        assert!(open.len() < 30, "no connection went to a request thread");
        let mut conn = std::net::TcpStream::connect(s.addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let first = ask(&mut conn);
        if !first.2 {
            break (conn, first);
        }
        // Kept open, so the main thread's loop keeps holding it and the next goes elsewhere.
        open.push(conn);
    };
    // The requests of one keep-alive connection run on the thread whose loop holds it.
    let mut last = first;
    for _ in 0..4 {
        let next = ask(&mut conn);
        assert_eq!(next.0, last.0, "one thread serves the connection");
        assert_eq!(
            next.1,
            last.1 + 1,
            "the thread's threading.local count grows by one per request"
        );
        last = next;
    }
}
