//! The API over real HTTP: bearer auth, JSON errors, body limits, refusing PIDs the sidecar did
//! not discover, health, readiness and the OpenAPI document.

use std::process::{Command, Stdio};
use std::time::Duration;

use forkscope_sidecar::api::{ErrorBody, ProfileRequest};
use forkscope_sidecar::paths;
use forkscope_tests::procs;
use reqwest::StatusCode;

use crate::util::Sidecar;

async fn error_of(resp: reqwest::Response) -> (StatusCode, ErrorBody) {
    let status = resp.status();
    let body: ErrorBody = resp.json().await.expect("a JSON error body");
    (status, body)
}

#[tokio::test]
async fn v1_needs_the_bearer_token_and_health_and_metrics_do_not() {
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let http = reqwest::Client::new();
    // The guarded routes that answer GET (others answer 405 to a GET before any check).
    let guarded = [
        paths::PROCESSES,
        paths::PROFILES,
        paths::OPENAPI,
        paths::PROFILE,
    ]
    .iter()
    .map(|p| paths::with_id(p, "x"))
    .chain(["/v1/nonexistent".to_owned()]);
    for path in guarded {
        let path = path.as_str();
        let resp = http.get(sidecar.url(path)).send().await.expect("get");
        assert_eq!(
            resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
            Some(&b"Bearer"[..])
        );
        let (status, body) = error_of(resp).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(body.code, "unauthorized");
        for bad in [
            "Bearer wrong".to_owned(),
            format!("Bearer {}x", sidecar.token),
            format!("Basic {}", sidecar.token),
            "Bearer ".to_owned(),
        ] {
            let resp = http
                .get(sidecar.url(path))
                .header("authorization", bad.as_str())
                .send()
                .await
                .expect("get");
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path} with {bad}");
        }
    }
    let ok = http
        .get(sidecar.url("/v1/processes"))
        .bearer_auth(&sidecar.token)
        .send()
        .await
        .expect("get");
    assert_eq!(ok.status(), StatusCode::OK);
    for path in paths::OPEN {
        let resp = http.get(sidecar.url(path)).send().await.expect("get");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    assert!(
        !sidecar.log_text().contains(&sidecar.token),
        "the token must never be logged"
    );
}

#[tokio::test]
async fn bodies_are_limited_and_validated_with_json_errors() {
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(sidecar.url("/v1/profiles"))
            .bearer_auth(&sidecar.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // A 1 MiB body is refused from its Content-Length alone, before it is sent: the client
    // sends only the head and still gets the JSON 413.
    let raw = forkscope_tests::client::parse_one(
        &forkscope_tests::send_raw(
            sidecar.addr,
            format!(
                "POST /v1/profiles HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 1048576\r\n\
                 Connection: close\r\n\r\n",
                sidecar.token
            )
            .as_bytes(),
        ),
        false,
    )
    .expect("a response")
    .0;
    assert_eq!(raw.status, 413);
    let body: ErrorBody = serde_json::from_slice(&raw.body).expect("JSON error");
    assert_eq!(body.code, "payload_too_large");
    for bad in [
        &b"{not json"[..],
        br#"{"kind":"dance"}"#,
        br#"{"pid": 1}"#,
        br#"{"frames": 0}"#,
        br#"{"frames": 101}"#,
        br#"{"top": 0}"#,
        br#"{"duration_seconds": -1}"#,
        br#"{"targets": {"mode": "slots", "slots": []}}"#,
        br#"{"targets": {"mode": "top_pss", "count": 0}}"#,
    ] {
        let (status, body) = error_of(post(bad.to_vec()).await.expect("post")).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(body.code, "invalid_request");
        assert!(!body.reason.is_empty());
    }
    let scale = http
        .put(sidecar.url("/v1/leader/workers"))
        .bearer_auth(&sidecar.token)
        .body(r#"{"workers": 0}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(scale.status(), StatusCode::BAD_REQUEST);
    let wrong_method = http
        .delete(sidecar.url("/v1/processes"))
        .bearer_auth(&sidecar.token)
        .send()
        .await
        .expect("delete");
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    let missing = http
        .get(sidecar.url("/v1/profiles/fs-unknown"))
        .bearer_auth(&sidecar.token)
        .send()
        .await
        .expect("get");
    let (status, body) = error_of(missing).await;
    assert_eq!(
        (status, body.code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

#[tokio::test]
async fn processes_it_did_not_discover_are_never_signalled() {
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let client = sidecar.client();
    // A process that is no leader: HUP, USR1 or TTOU would end it.
    let mut bystander = Command::new("sleep")
        .arg("120")
        .stdin(Stdio::null())
        .spawn()
        .expect("sleep");
    let pid = bystander.id();
    let reload = client.reload(Some(pid)).await.expect_err("not a leader");
    assert_eq!(reload.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let logs = client
        .reopen_logs(Some(pid))
        .await
        .expect_err("not a leader");
    assert_eq!(logs.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let scale = client
        .set_workers(&forkscope_sidecar::api::ScaleRequest {
            leader_pid: Some(pid),
            workers: 2,
            timeout_seconds: None,
        })
        .await
        .expect_err("not a leader");
    assert_eq!(scale.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let profile = client
        .start_profile(&ProfileRequest {
            leader_pid: Some(pid),
            ..ProfileRequest::stacks()
        })
        .await
        .expect_err("not a leader");
    match profile {
        forkscope_sidecar::ClientError::Api { status, body } => {
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(body.code, "not_a_worker");
        }
        other => panic!("{other}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(procs::alive(pid as i32), "the bystander was signalled");
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[tokio::test]
async fn openapi_document_is_served_and_lists_every_route() {
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let doc: serde_json::Value = reqwest::Client::new()
        .get(sidecar.url(paths::OPENAPI))
        .bearer_auth(&sidecar.token)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    for p in paths::ALL {
        assert!(paths.contains_key(p), "{p}");
    }
    assert!(doc["components"]["schemas"]["Session"].is_object());
    let ready = sidecar.client().ready().await.expect("readyz");
    assert_eq!(ready.status, "ok");
    assert_eq!(
        ready.checks.get("orphan_recovery").map(String::as_str),
        Some("done")
    );
}

#[tokio::test]
async fn refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("token");
    std::fs::write(&empty, "\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_forkscope-sidecar"))
        .args(["--listen", "127.0.0.1:0", "--runtime-dir"])
        .arg(dir.path())
        .arg("--token-file")
        .arg(&empty)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
}
