//! gunicorn options users put in their Dockerfiles, on the real binary.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use forkscope_tests::{ServerBuilder, request, server_bin, venv, wait_for};

#[test]
fn unix_socket_pidfile_and_env() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("app.sock");
    let pidfile = dir.path().join("app.pid");
    let s = ServerBuilder::new("app:app")
        .args(&[
            "-b",
            &format!("unix:{}", sock.display()),
            "--pid",
            pidfile.to_str().expect("utf-8"),
            "-e",
            "GREETING=bonjour",
        ])
        .start();
    assert_eq!(
        std::fs::read_to_string(&pidfile).expect("pid file").trim(),
        s.pid().to_string()
    );
    assert_eq!(
        request(s.addr, "GET", "/osenv?k=GREETING", &[], b"").text(),
        "bonjour"
    );
    let mut c = UnixStream::connect(&sock).expect("unix socket");
    c.write_all(b"GET /environ HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut out = Vec::new();
    c.read_to_end(&mut out).expect("read");
    let (r, _) = forkscope_tests::client::parse_one(&out, false).expect("response");
    let env: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(env["REMOTE_ADDR"], "");
    assert_eq!(env["SERVER_NAME"], "local");
    drop(s);
    wait_for(
        "the pid file and socket to be removed",
        Duration::from_secs(30),
        || (!pidfile.exists() && !sock.exists()).then_some(()),
    );
}

#[test]
fn pythonpath_makes_other_folders_importable() {
    let s = ServerBuilder::new("far_app:app")
        .args(&["--pythonpath", "elsewhere"])
        .start();
    assert_eq!(request(s.addr, "GET", "/", &[], b"").text(), "far");
}

#[test]
fn idle_keep_alive_connections_last_keep_alive_seconds_then_close() {
    // Far above the default (2 s): a connection idle for longer than the default allows is
    // still served, so an ignored flag fails the second request.
    let s = ServerBuilder::new("app:app")
        .args(&["--keep-alive", "10"])
        .start();
    let mut c = std::net::TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let get = |c: &mut std::net::TcpStream| {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        forkscope_tests::client::read_response(c)
    };
    assert_eq!(get(&mut c).status, 200);
    // The idle time is what is tested: past the default keep-alive (the server closes such a
    // connection within 4 s), well within --keep-alive.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(get(&mut c).status, 200, "open after 5 idle seconds");
    // Then the server closes it: read_to_end returns at the close (the read timeout is far
    // longer than --keep-alive).
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("the server closes the idle connection");
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn check_config_imports_the_app_without_serving() {
    let run = |app: &str| {
        Command::new(server_bin())
            .args(["--check-config", "--chdir"])
            .arg(forkscope_tests::apps_dir())
            .arg(app)
            .env("VIRTUAL_ENV", venv())
            .output()
            .expect("run")
    };
    assert!(run("app:app").status.success());
    let broken = run("broken:app");
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("this module is broken on purpose"));
}

#[test]
fn unsupported_gunicorn_options_are_named() {
    let out = Command::new(server_bin())
        .args(["--daemon", "app:app"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--daemon"));
}
