//! The same app and the same requests, served by gunicorn and by forkscope-server: the environ
//! the app sees and the responses it sends must agree (except where the servers are named).

use forkscope_tests::gunicorn::Gunicorn;
use forkscope_tests::{ServerBuilder, request};

/// Keys that differ by nature: the server's name, the client's ephemeral port, and objects
/// whose repr names the implementing class.
const EXPECTED_DIFFERENCES: &[&str] = &[
    "SERVER_SOFTWARE",
    "REMOTE_PORT",
    "SERVER_PORT",
    "HTTP_HOST",
    "gunicorn.socket",
    "wsgi.errors",
    "wsgi.input",
    "wsgi.file_wrapper",
    "wsgi.early_hints",
];

fn environ(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> serde_json::Map<String, serde_json::Value> {
    let r = request(addr, method, path, headers, body);
    assert_eq!(r.status, 200, "{method} {path}");
    let serde_json::Value::Object(map) = serde_json::from_slice(&r.body).expect("json") else {
        panic!("environ is not an object");
    };
    map.into_iter()
        .filter(|(k, _)| !EXPECTED_DIFFERENCES.contains(&k.as_str()))
        .collect()
}

#[test]
fn environ_matches_gunicorn_for_the_same_requests() {
    let g = Gunicorn::start("app:app", &[]);
    let f = ServerBuilder::new("app:app").start();
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a [u8]);
    let cases: &[Case<'_>] = &[
        ("GET", "/environ", &[], b""),
        (
            "GET",
            "/environ/a%20b/caf%C3%A9?x=1&y=%2F",
            &[("Accept", "text/html"), ("X-Multi", "1"), ("X-Multi", "2")],
            b"",
        ),
        (
            "POST",
            "/environ",
            &[("Content-Type", "application/x-www-form-urlencoded")],
            b"a=1&b=2",
        ),
        (
            "GET",
            "/environ",
            &[("X-Forwarded-Proto", "https"), ("Cookie", "a=b; c=d")],
            b"",
        ),
        (
            "DELETE",
            "/environ?q",
            &[("User-Agent", "differential/1.0")],
            b"",
        ),
    ];
    for (method, path, headers, body) in cases {
        let ours = environ(f.addr, method, path, headers, body);
        let theirs = environ(g.addr, method, path, headers, body);
        let keys = |m: &serde_json::Map<String, serde_json::Value>| {
            m.keys().cloned().collect::<std::collections::BTreeSet<_>>()
        };
        assert_eq!(
            keys(&ours),
            keys(&theirs),
            "environ keys for {method} {path}"
        );
        for (k, v) in &theirs {
            assert_eq!(ours.get(k), Some(v), "{k} for {method} {path}");
        }
    }
}

#[test]
fn responses_match_gunicorn() {
    let g = Gunicorn::start("app:app", &[]);
    let f = ServerBuilder::new("app:app").start();
    for (method, path, body) in [
        ("GET", "/", &b""[..]),
        ("GET", "/large?n=100000", b""),
        ("POST", "/echo?mode=lines", b"a\nb\nc"),
        ("GET", "/stream?n=5", b""),
        ("GET", "/write", b""),
        ("HEAD", "/", b""),
        ("GET", "/status?code=204+No+Content", b""),
        ("GET", "/error", b""),
        ("GET", "/nope", b""),
    ] {
        let ours = request(f.addr, method, path, &[], body);
        let theirs = request(g.addr, method, path, &[], body);
        assert_eq!(ours.status, theirs.status, "{method} {path}");
        assert_eq!(ours.body, theirs.body, "{method} {path}");
        for h in ["content-type", "content-length", "transfer-encoding"] {
            assert_eq!(ours.header(h), theirs.header(h), "{h} of {method} {path}");
        }
    }
}
