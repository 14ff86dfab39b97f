//! The HTTP surface: `/v1/...` behind the bearer token, `/healthz`, `/readyz`, `/metrics`
//! outside it; JSON bodies size-limited, every error a JSON [`crate::api::ErrorBody`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router, middleware};
use serde::de::DeserializeOwned;

use crate::api::{
    API_PREFIX, Health, LeaderActionResult, LeaderSelector, ProcessList, ProfileRequest,
    RecycleList, ScaleRequest, Session, SessionList,
};
use crate::error::ApiError;
use crate::paths::{self, under_prefix};
use crate::signals::Signal;
use crate::{AppState, auth, leader, openapi};

/// The largest request body accepted, bytes.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A JSON request body: an empty body reads as `{}`; anything malformed is a 400, anything
/// over [`BODY_LIMIT`] a 413, both as JSON errors.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A declared length over the limit is refused before any byte of the body is read.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
            return Err(ApiError::PayloadTooLarge(BODY_LIMIT));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(BODY_LIMIT)
            } else {
                ApiError::InvalidRequest(rejection.body_text())
            }
        })?;
        let text: &[u8] = if bytes.trim_ascii().is_empty() {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
    }
}

/// Builds the router over `state`.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route(under_prefix(paths::OPENAPI), get(openapi_doc))
        .route(under_prefix(paths::PROCESSES), get(processes))
        .route(under_prefix(paths::RECYCLES), get(recycles))
        .route(
            under_prefix(paths::PROFILES),
            post(start_profile).get(list_profiles),
        )
        .route(
            under_prefix(paths::PROFILE),
            get(get_profile).delete(cancel_profile),
        )
        .route(under_prefix(paths::PROFILE_CAPTURE), post(capture_profile))
        .route(under_prefix(paths::LEADER_RELOAD), post(reload))
        .route(under_prefix(paths::LEADER_REOPEN_LOGS), post(reopen_logs))
        .route_layer(middleware::from_fn(deadline))
        // Bounded by its own `timeout_seconds` (at most 600).
        .route(under_prefix(paths::LEADER_WORKERS), put(scale))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.token.clone(),
            auth::require_token,
        ));
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::READYZ, get(readyz))
        .route(paths::METRICS, get(metrics))
        .route_layer(middleware::from_fn(deadline))
        .nest(API_PREFIX, v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The longest a request may take, reading its body included; the worker-count change is
/// bounded by its own `timeout_seconds` instead.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Ends a request that outlasts [`REQUEST_TIMEOUT`] with a 504 (a slow or stalled client
/// cannot hold a connection and its task for longer).
async fn deadline(req: Request, next: middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(format!(
            "request not done within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(crate::api::ErrorBody {
            code: "method_not_allowed".into(),
            reason: "method not allowed on this route".into(),
            holder: None,
        }),
    )
        .into_response()
}

async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        checks: Default::default(),
    })
}

async fn readyz(State(state): State<AppState>) -> Response {
    let mut checks = std::collections::BTreeMap::new();
    let mut ready = true;
    let proc_ok = std::fs::read_dir(state.source.root()).is_ok();
    checks.insert(
        "proc".to_owned(),
        if proc_ok { "ok" } else { "unreadable" }.to_owned(),
    );
    ready &= proc_ok;
    let runtime_ok = state.runtime.root().is_dir();
    checks.insert(
        "runtime_dir".to_owned(),
        if runtime_ok { "ok" } else { "missing" }.to_owned(),
    );
    ready &= runtime_ok;
    let recovered = state.sessions.recovered();
    checks.insert(
        "orphan_recovery".to_owned(),
        if recovered { "done" } else { "running" }.to_owned(),
    );
    ready &= recovered;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        status: if ready { "ok" } else { "not ready" }.into(),
        checks,
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = state.metrics.scrape().await.map_err(ApiError::Internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn openapi_doc() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn processes(State(state): State<AppState>) -> Result<Json<ProcessList>, ApiError> {
    let source = state.source.clone();
    tokio::task::spawn_blocking(move || source.list())
        .await
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn recycles(State(state): State<AppState>) -> Result<Json<RecycleList>, ApiError> {
    let (source, runtime) = (state.source.clone(), state.runtime.clone());
    tokio::task::spawn_blocking(move || crate::recycles::list(&source.scan(), &runtime))
        .await
        .map(Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

async fn start_profile(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ProfileRequest>,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    let session = state.sessions.start(req).await?;
    Ok((StatusCode::CREATED, Json(session)))
}

async fn list_profiles(State(state): State<AppState>) -> Json<SessionList> {
    Json(state.sessions.list())
}

async fn get_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    state.sessions.get(&id).map(Json)
}

async fn cancel_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Session>, ApiError> {
    state.sessions.cancel(&id).await.map(Json)
}

async fn capture_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Session>), ApiError> {
    let session = state.sessions.capture(&id)?;
    Ok((StatusCode::ACCEPTED, Json(session)))
}

async fn reload(
    State(state): State<AppState>,
    JsonBody(sel): JsonBody<LeaderSelector>,
) -> Result<Json<LeaderActionResult>, ApiError> {
    signal_leader(&state, sel, Signal::Hup).await
}

async fn reopen_logs(
    State(state): State<AppState>,
    JsonBody(sel): JsonBody<LeaderSelector>,
) -> Result<Json<LeaderActionResult>, ApiError> {
    signal_leader(&state, sel, Signal::Usr1).await
}

/// One signal to a leader, its `/proc` scan on the blocking pool.
async fn signal_leader(
    state: &AppState,
    sel: LeaderSelector,
    signal: Signal,
) -> Result<Json<LeaderActionResult>, ApiError> {
    let source = state.source.clone();
    tokio::task::spawn_blocking(move || leader::signal_once(&source, sel.leader_pid, signal))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map(Json)
}

async fn scale(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ScaleRequest>,
) -> Result<Json<LeaderActionResult>, ApiError> {
    let Ok(_guard) = state.scale_lock.clone().try_lock_owned() else {
        return Err(ApiError::Conflict {
            reason: "another worker-count change is in progress".into(),
            holder: None,
        });
    };
    leader::scale(&state.source, &req, Duration::from_millis(20))
        .await
        .map(Json)
}

/// Keeps `Arc` in scope for the state type.
pub type ScaleLock = Arc<tokio::sync::Mutex<()>>;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    use crate::sessions::SessionLimits;

    fn state(root: &std::path::Path) -> (AppState, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken").expect("token");
        let config = crate::Config {
            proc_root: root.to_owned(),
            runtime_dir: dir.path().to_owned(),
            auth: crate::auth::AuthConfig::Static(token),
            limits: SessionLimits::default(),
        };
        (AppState::new(&config).expect("state"), dir)
    }

    async fn call(
        app: Router,
        method: &str,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn processes_of_a_fixture_tree_through_the_router() {
        let root = crate::discovery::fixture::one_leader("web:app");
        let r = root.path();
        let (state, _dir) = state(r);
        let sessions = state.sessions.clone();
        let app = router(state);
        let (status, body) = call(app.clone(), "GET", paths::PROCESSES, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["code"], "unauthorized");
        let (status, body) = call(app.clone(), "GET", paths::PROCESSES, Some("t0ken")).await;
        assert_eq!(status, StatusCode::OK);
        let leader = &body["leaders"][0];
        assert_eq!(leader["server"], "forkscope");
        assert_eq!(leader["app"], "web:app");
        assert_eq!(leader["leader"]["pid"], 100);
        assert_eq!(leader["leader"]["memory"], serde_json::Value::Null);
        assert_eq!(leader["workers"][0]["slot"], 0);
        assert_eq!(leader["workers"][0]["memory"]["pss_bytes"], 800 * 1024);
        // Ready only once orphan recovery ran (serve() starts it).
        let (status, body) = call(app.clone(), "GET", paths::READYZ, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["checks"]["orphan_recovery"], "running");
        sessions.recover_orphans().await;
        let (status, _) = call(app, "GET", paths::READYZ, None).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_outlasts_the_deadline_is_a_504() {
        let app = Router::new()
            .route("/stalled", get(std::future::pending::<()>))
            .route_layer(middleware::from_fn(deadline));
        let (status, body) = call(app, "GET", "/stalled", None).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(body["code"], "timeout");
    }
}
