//! forkscope-sidecar: the pod-local companion of forkscope-server (and of plain gunicorn).
//!
//! It finds leaders and workers through `/proc`, reports their memory (PSS, RSS, USS, shared,
//! swap) over a JSON API and as Prometheus metrics, drives profile sessions through the
//! runtime-directory contract of [`forkscope_protocol`] (command file + `SIGUSR2` doorbell +
//! result files), and manages the leader with signals. The operator talks to it through the
//! types in [`api`] and the [`client::Client`] exported here.
//!
//! # Layout
//! - [`api`]: the `/v1` request and response types (shared with the operator).
//! - [`client`]: typed async client.
//! - [`discovery`]: `/proc` scan, roles from titles, PID-reuse-safe identity.
//! - [`memory`]: `smaps_rollup` (or `smaps`) reading.
//! - [`sessions`]: profile sessions, their journal and orphan recovery.
//! - [`summary`]: aggregation of heap diffs across workers.
//! - [`signals`]: signals only to discovered processes, through pidfds.
//! - [`leader`]: reload, reopen logs, worker count.
//! - [`metrics`]: the Prometheus registry and the scrape-time `/proc` collector.
//! - [`auth`]: the bearer-token check.
//! - [`routes`], [`error`], [`openapi`]: the HTTP surface.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod client;
pub mod discovery;
pub mod error;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod sessions;
pub mod signals;
pub mod summary;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use forkscope_protocol::RuntimeDir;

pub use client::{Client, ClientError};
pub use routes::router as app;

use discovery::ProcSource;
use sessions::{SessionLimits, Sessions};

/// Everything needed to build the service; plain data (the CLI fills it).
#[derive(Debug, Clone)]
pub struct Config {
    /// The proc file system root (`/proc`).
    pub proc_root: PathBuf,
    /// The runtime directory shared with the server.
    pub runtime_dir: PathBuf,
    /// The file holding the bearer token.
    pub token_file: PathBuf,
    /// Session tunables.
    pub limits: SessionLimits,
}

/// The state every route shares (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    /// Where processes are read.
    pub source: ProcSource,
    /// The runtime directory.
    pub runtime: RuntimeDir,
    /// Profile sessions.
    pub sessions: Sessions,
    /// Prometheus registry and counters.
    pub metrics: Arc<metrics::Metrics>,
    /// The bearer-token check.
    pub token: Arc<auth::TokenCheck>,
    /// Serializes worker-count changes.
    pub scale_lock: routes::ScaleLock,
}

impl AppState {
    /// Resolves `config`: reads the token and registers metrics. Orphan recovery is started by
    /// [`serve`].
    ///
    /// # Errors
    /// When the token file is unreadable or empty.
    pub fn new(config: &Config) -> Result<Self, auth::TokenError> {
        let token = Arc::new(auth::TokenCheck::from_file(&config.token_file)?);
        let source = ProcSource::new(&config.proc_root);
        let runtime = RuntimeDir::new(&config.runtime_dir);
        let metrics = Arc::new(metrics::Metrics::new(source.clone()));
        let sessions = Sessions::new(
            source.clone(),
            runtime.clone(),
            config.limits.clone(),
            metrics.sessions.clone(),
        );
        Ok(Self {
            source,
            runtime,
            sessions,
            metrics,
            token,
            scale_lock: Arc::new(tokio::sync::Mutex::new(())),
        })
    }
}

/// Serves the API on `listener` until `shutdown` completes; first starts recovering the
/// sessions an earlier sidecar process left behind (`/readyz` says when that is done), and at
/// the end cancels the sessions still running, so tracing stops with the sidecar.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sessions = state.sessions.clone();
    let recovery = sessions.clone();
    tokio::spawn(async move { recovery.recover_orphans().await });
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    // Tracing must not outlive the sidecar: stop what still runs.
    sessions.cancel_all().await;
    served
}
