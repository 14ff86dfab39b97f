//! `forkscope-sidecar`: parse flags, read the token, serve until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use forkscope_sidecar::auth::AuthConfig;
use forkscope_sidecar::auth::kubernetes::ApiServerKeys;
use forkscope_sidecar::sessions::SessionLimits;
use forkscope_sidecar::{AppState, Config};
use std::sync::Arc;

/// The forkscope sidecar: per-worker memory, profile sessions and leader management for the
/// pre-fork servers in this pod (docs/SIDECAR.md).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Address for the API and /metrics (one port).
    #[arg(long, env = "FORKSCOPE_SIDECAR_LISTEN", default_value = "0.0.0.0:9808")]
    listen: SocketAddr,
    /// Runtime directory shared with forkscope-server.
    #[arg(long, env = "FORKSCOPE_RUNTIME_DIR", default_value = forkscope_protocol::DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// How callers of the /v1 API authenticate: `static` (the token in --token-file) or
    /// `kubernetes` (ServiceAccount tokens of an allowed caller, verified against the cluster).
    /// Defaults to static when --token-file is given, else kubernetes.
    #[arg(long, value_enum, env = "FORKSCOPE_SIDECAR_AUTH")]
    auth: Option<AuthMode>,
    /// Static mode: the file holding the bearer token (a mounted Secret); never logged.
    #[arg(long, env = "FORKSCOPE_SIDECAR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Kubernetes mode: a caller allowed to use the API, as its token's subject
    /// (`system:serviceaccount:NAMESPACE:NAME`); repeat or separate with commas.
    #[arg(
        long = "allowed-caller",
        env = "FORKSCOPE_SIDECAR_ALLOWED_CALLERS",
        value_delimiter = ',',
        default_value = "system:serviceaccount:forkscope:forkscope-operator"
    )]
    allowed_callers: Vec<String>,
    /// Kubernetes mode: the audience tokens must be issued for.
    #[arg(
        long,
        env = "FORKSCOPE_SIDECAR_AUDIENCE",
        default_value = "forkscope-sidecar"
    )]
    audience: String,
    /// Root of the proc file system.
    #[arg(long, env = "FORKSCOPE_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// Seconds a worker may take to answer one profiler command.
    #[arg(long, env = "FORKSCOPE_SIDECAR_RESULT_TIMEOUT", default_value_t = 10.0)]
    result_timeout: f64,
    /// Seconds a heap diff without a duration may trace when the request sets no timeout.
    #[arg(
        long,
        env = "FORKSCOPE_SIDECAR_TRACE_TIMEOUT",
        default_value_t = 3600.0
    )]
    trace_timeout: f64,
    /// Finished sessions kept.
    #[arg(long, env = "FORKSCOPE_SIDECAR_MAX_FINISHED", default_value_t = 100)]
    max_finished: usize,
    /// Seconds finished sessions are kept.
    #[arg(long, env = "FORKSCOPE_SIDECAR_RETENTION", default_value_t = 3600.0)]
    retention: f64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AuthMode {
    Static,
    Kubernetes,
}

async fn auth_config(cli: &Cli) -> anyhow::Result<AuthConfig> {
    let mode = cli.auth.unwrap_or(if cli.token_file.is_some() {
        AuthMode::Static
    } else {
        AuthMode::Kubernetes
    });
    Ok(match mode {
        AuthMode::Static => AuthConfig::Static(
            cli.token_file
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--auth static needs --token-file"))?,
        ),
        AuthMode::Kubernetes => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "--auth kubernetes needs the cluster (in-cluster config or KUBECONFIG): {e}"
                )
            })?;
            AuthConfig::Kubernetes {
                audience: cli.audience.clone(),
                allowed: cli.allowed_callers.clone(),
                keys: Arc::new(ApiServerKeys::new(client)),
            }
        }
    })
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--{name} must be a positive number of seconds"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let auth = auth_config(&cli).await?;
    let config = Config {
        proc_root: cli.proc_root,
        runtime_dir: cli.runtime_dir,
        auth,
        limits: SessionLimits {
            result_timeout: seconds("result-timeout", cli.result_timeout)?,
            default_trace_timeout: seconds("trace-timeout", cli.trace_timeout)?,
            max_finished: cli.max_finished,
            retention: seconds("retention", cli.retention)?,
            ..SessionLimits::default()
        },
    };
    let state = AppState::new(&config)?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", cli.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        runtime_dir = %config.runtime_dir.display(),
        proc_root = %config.proc_root.display(),
        auth = ?config.auth,
        "listening on {addr}"
    );
    forkscope_sidecar::serve(listener, state, shutdown_signal()).await?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FORKSCOPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("forkscope-sidecar: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkscope-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
