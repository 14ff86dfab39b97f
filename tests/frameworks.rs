//! Real third-party frameworks from PyPI, served unchanged.

use forkscope_tests::{ServerBuilder, request};

#[test]
fn flask_app_serves_routes_and_json() {
    flask_serves_routes_and_json(ServerBuilder::new);
}

#[test]
fn django_app_serves_with_preload() {
    django_serves_with_preload(ServerBuilder::new);
}

/// The Flask app's routes, served by the server `server(app)` starts (tests/wheel.rs passes the
/// command a wheel installed).
pub(crate) fn flask_serves_routes_and_json(server: fn(&str) -> ServerBuilder) {
    let s = server("flask_app:app").workers(2).start();
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello from Flask"));
    let r = request(s.addr, "GET", "/items/42?q=x", &[], b"");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v, serde_json::json!({"id": 42, "q": "x"}));
    let r = request(
        s.addr,
        "POST",
        "/json",
        &[("Content-Type", "application/json")],
        br#"{"a": [1, 2]}"#,
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["received"], serde_json::json!({"a": [1, 2]}));
    assert_eq!(request(s.addr, "GET", "/missing", &[], b"").status, 404);
}

/// The Django project with `--preload`, served by the server `server(app)` starts.
pub(crate) fn django_serves_with_preload(server: fn(&str) -> ServerBuilder) {
    let s = server("djangoproj.wsgi:application")
        .args(&["--preload"])
        .start();
    let r = request(s.addr, "GET", "/", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello from Django"));
    let r = request(
        s.addr,
        "POST",
        "/echo",
        &[("Content-Type", "text/plain")],
        b"payload",
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(v["body"], "payload");
    assert_eq!(v["method"], "POST");
}
