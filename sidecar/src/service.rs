//! The service's shared state and its `serve` entry point (feature `service`).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use forkscope_protocol::RuntimeDir;

pub use crate::routes::router as app;

use crate::discovery::ProcSource;
use crate::sessions::{SessionLimits, Sessions};
use crate::{auth, metrics, routes};

/// Everything needed to build the service; plain data (the CLI fills it).
#[derive(Debug, Clone)]
pub struct Config {
    /// The proc file system root (`/proc`).
    pub proc_root: PathBuf,
    /// The runtime directory shared with the server.
    pub runtime_dir: PathBuf,
    /// How callers authenticate.
    pub auth: auth::AuthConfig,
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
    pub token: Arc<auth::Auth>,
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
        let token = Arc::new(auth::Auth::new(&config.auth)?);
        let source = ProcSource::new(&config.proc_root);
        let runtime = RuntimeDir::new(&config.runtime_dir);
        let metrics = Arc::new(metrics::Metrics::new(source.clone(), Some(runtime.clone())));
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

/// Serves the API on `listener` until `shutdown` completes; first makes the process
/// non-dumpable and starts recovering the sessions an earlier sidecar process left behind
/// (`/readyz` says when that is done), and at the end (open connections get a bounded grace,
/// see [`crate::http_server`]) cancels the sessions still running, so tracing stops with the
/// sidecar.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Err(e) = crate::hardening::make_non_dumpable() {
        tracing::warn!("cannot make the sidecar non-dumpable: {e}");
    }
    let sessions = state.sessions.clone();
    let recovery = sessions.clone();
    tokio::spawn(async move { recovery.recover_orphans().await });
    let served = crate::http_server::serve(
        listener,
        app(state),
        shutdown,
        crate::http_server::HttpLimits::default(),
    )
    .await;
    // Tracing must not outlive the sidecar: stop what still runs.
    sessions.cancel_all().await;
    served
}
