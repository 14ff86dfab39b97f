//! The operator's own HTTP endpoints: `/metrics` (Prometheus), `/healthz` (the process runs),
//! `/readyz` (this replica either leads with its watch cache filled, or stands by).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kube::runtime::reflector::Store;

use crate::crd::ProfileRequest;
use crate::metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct Health {
    /// The metrics.
    pub metrics: Metrics,
    /// Set once the replica is ready.
    pub ready: Arc<AtomicBool>,
    /// The controller's cache of requests, once it leads (for the requests-by-phase gauge).
    pub store: Arc<std::sync::OnceLock<Store<ProfileRequest>>>,
}

async fn metrics(
    State(h): State<Health>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    if let Some(store) = h.store.get() {
        // A request without a status yet is Pending.
        h.metrics.set_requests(
            store
                .state()
                .iter()
                .map(|pr| pr.status.as_ref().and_then(|s| s.phase).unwrap_or_default()),
        );
    }
    (
        StatusCode::OK,
        [("content-type", "text/plain; version=0.0.4")],
        h.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(h): State<Health>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// The router of the endpoints.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}
