//! The access log: every gunicorn atom against expected text, format errors, file output.

use std::ffi::OsString;
use std::time::{Duration, UNIX_EPOCH};

use chrono::{Datelike, Timelike};

use super::*;
use crate::settings::load_with_env;

fn settings(format: &str, target: &str) -> Settings {
    let args = vec![
        OsString::from("forkscope-server"),
        OsString::from("--access-logfile"),
        OsString::from(target),
        OsString::from(format!("--access-logformat={format}")),
    ];
    load_with_env(args, &|_| None, None)
        .expect("valid settings")
        .settings
}

fn access_log(format: &str) -> (tempfile::TempDir, AccessLog) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new(&settings(format, path.to_str().unwrap()))
        .expect("valid format")
        .expect("access log is on");
    (dir, log)
}

fn request_headers() -> Vec<(String, Vec<u8>)> {
    vec![
        ("Host".into(), b"example.com".to_vec()),
        ("User-Agent".into(), b"curl/8.5.0".to_vec()),
        ("Referer".into(), b"https://ref.example/a?b=\"c\"".to_vec()),
        // "alice:secret"
        ("Authorization".into(), b"Basic YWxpY2U6c2VjcmV0".to_vec()),
        ("X-Forwarded-For".into(), b"10.0.0.1".to_vec()),
        ("x-forwarded-for".into(), b"10.0.0.2".to_vec()),
        ("X-Latin".into(), b"caf\xe9".to_vec()),
    ]
}

fn response_headers() -> Vec<(String, String)> {
    vec![
        ("Content-Type".into(), "text/plain".into()),
        ("X-Request-Id".into(), "abc-123".into()),
    ]
}

/// 2026-11-25 20:42:14 UTC.
const START_SECS: u64 = 1_795_639_334;

fn record<'a>(
    request_headers: &'a [(String, Vec<u8>)],
    response_headers: &'a [(String, String)],
    environ: Option<EnvironLookup<'a>>,
) -> AccessRecord<'a> {
    AccessRecord {
        remote_addr: "192.0.2.7",
        method: "GET",
        path: "/shop/items",
        query: "page=2&q=\"x\"",
        version: "HTTP/1.1",
        status: 200,
        response_length: Some(1234),
        request_headers,
        response_headers,
        request_time: Duration::from_micros(2_345_678),
        start: UNIX_EPOCH + Duration::from_secs(START_SECS) + Duration::from_micros(100),
        pid: 4242,
        environ,
    }
}

fn render(format: &str) -> String {
    let (_dir, log) = access_log(format);
    let request = request_headers();
    let response = response_headers();
    let environ = |name: &str| match name {
        "wsgi.url_scheme" => Some("https".to_owned()),
        "REMOTE_USER" => Some("bob".to_owned()),
        _ => None,
    };
    let line = log.render(&record(&request, &response, Some(&environ)));
    line.strip_suffix('\n')
        .expect("lines end in a newline")
        .to_owned()
}

/// `[dd/Mon/yyyy:HH:MM:SS +zzzz]` built independently of the implementation.
fn expected_time(at: SystemTime) -> String {
    let at: DateTime<Local> = at.into();
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let offset = at.offset().local_minus_utc();
    let sign = if offset < 0 { '-' } else { '+' };
    let offset = offset.abs();
    format!(
        "[{:02}/{}/{}:{:02}:{:02}:{:02} {sign}{:02}{:02}]",
        at.day(),
        months[at.month0() as usize],
        at.year(),
        at.hour(),
        at.minute(),
        at.second(),
        offset / 3600,
        offset % 3600 / 60
    )
}

#[test]
fn every_atom() {
    let end = UNIX_EPOCH + Duration::from_secs(START_SECS) + Duration::from_micros(2_345_778);
    for (atom, expected) in [
        ("h", "192.0.2.7".to_owned()),
        ("l", "-".to_owned()),
        ("u", "alice".to_owned()),
        ("t", expected_time(end)),
        ("r", r#"GET /shop/items?page=2&q=\"x\" HTTP/1.1"#.to_owned()),
        ("m", "GET".to_owned()),
        ("U", "/shop/items".to_owned()),
        ("q", r#"page=2&q=\"x\""#.to_owned()),
        ("H", "HTTP/1.1".to_owned()),
        ("s", "200".to_owned()),
        ("B", "1234".to_owned()),
        ("b", "1234".to_owned()),
        ("f", r#"https://ref.example/a?b=\"c\""#.to_owned()),
        ("a", "curl/8.5.0".to_owned()),
        ("T", "2".to_owned()),
        ("M", "2345".to_owned()),
        ("D", "2345678".to_owned()),
        ("L", "2.345678".to_owned()),
        ("p", "<4242>".to_owned()),
        ("{host}i", "example.com".to_owned()),
        ("{X-FORWARDED-FOR}i", "10.0.0.2".to_owned()),
        ("{x-latin}i", "caf\u{e9}".to_owned()),
        ("{missing}i", "-".to_owned()),
        ("{content-type}o", "text/plain".to_owned()),
        ("{X-Request-Id}o", "abc-123".to_owned()),
        ("{missing}o", "-".to_owned()),
        ("{wsgi.url_scheme}e", "https".to_owned()),
        ("{REMOTE_USER}e", "bob".to_owned()),
        ("{missing}e", "-".to_owned()),
        ("nosuchatom", "-".to_owned()),
        ("{odd}x", "-".to_owned()),
    ] {
        assert_eq!(render(&format!("%({atom})s")), expected, "atom {atom}");
    }
}

#[test]
fn default_format_is_apache_combined() {
    let end = UNIX_EPOCH + Duration::from_secs(START_SECS) + Duration::from_micros(2_345_778);
    assert_eq!(
        render(crate::settings::DEFAULT_ACCESS_LOG_FORMAT),
        format!(
            r#"192.0.2.7 - alice {} "GET /shop/items?page=2&q=\"x\" HTTP/1.1" 200 1234 "https://ref.example/a?b=\"c\"" "curl/8.5.0""#,
            expected_time(end)
        )
    );
}

#[test]
fn missing_values_and_unknown_lengths() {
    let (_dir, log) = access_log(r#"%(h)s %(u)s %(b)s %(B)s "%(f)s" "%(a)s" %(r)s %({x}e)s"#);
    let mut rec = record(&[], &[], None);
    rec.response_length = None;
    rec.query = "";
    assert_eq!(
        log.render(&rec),
        "192.0.2.7 - - 0 \"-\" \"-\" GET /shop/items HTTP/1.1 -\n"
    );
    let bad_auth = vec![("Authorization".to_owned(), b"Basic !!!notbase64".to_vec())];
    let bearer = vec![("Authorization".to_owned(), b"Bearer abc".to_vec())];
    let (_dir, log) = access_log("%(u)s");
    for headers in [bad_auth, bearer] {
        assert_eq!(log.render(&record(&headers, &[], None)), "-\n");
    }
}

#[test]
fn literals_percent_and_width() {
    assert_eq!(
        render("100%% of %(m)s [%(s)5s] [%(m)-6s]"),
        "100% of GET [  200] [GET   ]"
    );
    assert_eq!(
        render("%(s)d %(M)i no atoms here"),
        "200 2345 no atoms here"
    );
    assert_eq!(render("%((nested))s"), "-");
}

#[test]
fn bad_formats_are_refused_at_start() {
    for format in ["%(h)", "%(h", "100% done", "%(h)z", "%s"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let error = AccessLog::new(&settings(format, path.to_str().unwrap()))
            .expect_err("a broken format must be refused");
        assert!(
            error.to_string().contains("access log format"),
            "{format}: {error}"
        );
    }
}

#[test]
fn off_by_default() {
    let settings = load_with_env(vec![OsString::from("forkscope-server")], &|_| None, None)
        .unwrap()
        .settings;
    assert!(AccessLog::new(&settings).unwrap().is_none());
}

#[test]
fn writes_lines_to_the_file_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new(&settings("%(m)s %(U)s %(s)s", path.to_str().unwrap()))
        .unwrap()
        .unwrap();
    let rec = record(&[], &[], None);
    log.log(&rec);
    log.log(&rec);
    std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    log.reopen().unwrap();
    log.log(&rec);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("access.log.1")).unwrap(),
        "GET /shop/items 200\nGET /shop/items 200\n"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "GET /shop/items 200\n"
    );
}

#[test]
fn lines_from_threads_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::new(&settings("%(m)s %(U)s %(q)s", path.to_str().unwrap()))
        .unwrap()
        .unwrap();
    let long_query = "q".repeat(2000);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let mut rec = record(&[], &[], None);
                rec.query = &long_query;
                for _ in 0..200 {
                    log.log(&rec);
                }
            });
        }
    });
    let text = std::fs::read_to_string(&path).unwrap();
    let expected = format!("GET /shop/items {long_query}");
    assert_eq!(text.lines().count(), 800);
    assert!(text.lines().all(|line| line == expected));
}

/// gunicorn itself renders the same request, through its own `glogging.Logger.atoms` and
/// `SafeAtoms`, in the test venv's Python; every atom but the clock (`t`) and the pid (`p`)
/// must match byte for byte.
#[test]
fn matches_gunicorn_rendering() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = std::process::Command::new(root.join("scripts/python-env"))
        .output()
        .expect("run scripts/python-env");
    assert!(
        venv.status.success(),
        "{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let venv = String::from_utf8(venv.stdout).unwrap();
    let python = std::path::Path::new(venv.trim()).join("bin/python");

    let atoms = [
        "h",
        "l",
        "u",
        "r",
        "m",
        "U",
        "q",
        "H",
        "s",
        "B",
        "b",
        "f",
        "a",
        "T",
        "M",
        "D",
        "L",
        "{host}i",
        "{X-FORWARDED-FOR}i",
        "{x-latin}i",
        "{missing}i",
        "{content-type}o",
        "{X-Request-Id}o",
        "{missing}o",
        "{wsgi.url_scheme}e",
        "{missing}e",
        "nosuchatom",
    ];
    let mut formats: Vec<String> = atoms.iter().map(|atom| format!("%({atom})s")).collect();
    formats.push(
        atoms
            .iter()
            .map(|atom| format!("%({atom})s"))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    formats.push(r#"100%% "%(r)s" [%(s)5s] [%(m)-6s]"#.to_owned());

    let script = r#"
import datetime, json, sys
from gunicorn.config import Config
from gunicorn.glogging import Logger, SafeAtoms

class Resp:
    status = "200 OK"
    sent = 1234
    headers = [("Content-Type", "text/plain"), ("X-Request-Id", "abc-123")]

class Req:
    headers = [
        ("HOST", "example.com"),
        ("USER-AGENT", "curl/8.5.0"),
        ("REFERER", 'https://ref.example/a?b="c"'),
        ("AUTHORIZATION", "Basic YWxpY2U6c2VjcmV0"),
        ("X-FORWARDED-FOR", "10.0.0.1"),
        ("X-FORWARDED-FOR", "10.0.0.2"),
        ("X-LATIN", "caf\u00e9"),
    ]

environ = {
    "REQUEST_METHOD": "GET",
    "RAW_URI": '/shop/items?page=2&q="x"',
    "PATH_INFO": "/shop/items",
    "QUERY_STRING": 'page=2&q="x"',
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "192.0.2.7",
    "HTTP_USER_AGENT": "curl/8.5.0",
    "HTTP_REFERER": 'https://ref.example/a?b="c"',
    "HTTP_AUTHORIZATION": "Basic YWxpY2U6c2VjcmV0",
    "wsgi.url_scheme": "https",
}
logger = Logger(Config())
atoms = SafeAtoms(logger.atoms(Resp(), Req(), environ,
                               datetime.timedelta(seconds=2, microseconds=345678)))
print(json.dumps([fmt % atoms for fmt in json.load(sys.stdin)]))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the venv's Python");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&formats).unwrap().as_bytes())
            .unwrap();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let gunicorn: Vec<String> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(gunicorn.len(), formats.len());

    let request = request_headers();
    let response = response_headers();
    let environ = |name: &str| (name == "wsgi.url_scheme").then(|| "https".to_owned());
    for (format, expected) in formats.iter().zip(&gunicorn) {
        let (_dir, log) = access_log(format);
        let line = log.render(&record(&request, &response, Some(&environ)));
        assert_eq!(
            line.strip_suffix('\n').unwrap(),
            expected,
            "format {format}"
        );
    }
}
