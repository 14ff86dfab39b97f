//! The `forkscope-operator` binary: a thin command-line front over the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use forkscope_operator::controller::{self, Context};
use forkscope_operator::lease::Elector;
use forkscope_operator::metrics::Metrics;
use forkscope_operator::request::Tunables;
use forkscope_operator::serve::{self, Health};
use forkscope_operator::sidecar::HttpSidecars;
use forkscope_operator::token::{ServiceAccountTokens, TokenSource};
use kube::runtime::events::Reporter;

/// Kubernetes operator for forkscope's ProfileRequests.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ProfileRequest CustomResourceDefinition as YAML (what crds/ holds).
    Crd,
    /// Reconcile ProfileRequests (KUBECONFIG, or the in-cluster config in a pod).
    Run(Box<RunArgs>),
}

/// How the operator proves itself to sidecars.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Auth {
    /// A short-lived token of the operator's ServiceAccount, audience `forkscope-sidecar`.
    Kubernetes,
    /// The token in --sidecar-token-file.
    Static,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "FORKSCOPE_OPERATOR_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// How to authenticate to sidecars.
    #[arg(
        long,
        value_enum,
        env = "FORKSCOPE_OPERATOR_AUTH",
        default_value = "kubernetes"
    )]
    auth: Auth,
    /// With --auth static: the file holding the sidecars' bearer token; never logged.
    #[arg(long, env = "FORKSCOPE_OPERATOR_SIDECAR_TOKEN_FILE")]
    sidecar_token_file: Option<PathBuf>,
    /// With --auth kubernetes: the operator's ServiceAccount (tokens are requested for it).
    #[arg(
        long,
        env = "FORKSCOPE_OPERATOR_SERVICE_ACCOUNT",
        default_value = "forkscope-operator"
    )]
    service_account: String,
    /// The operator's own namespace (ServiceAccount and Lease); defaults to the pod's.
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,
    /// This replica's name in the Lease and in events; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Elect a leader among replicas through a Lease.
    #[arg(long, env = "FORKSCOPE_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, default_value = "forkscope-operator")]
    lease_name: String,
    /// Seconds a Lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "FORKSCOPE_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    listen: SocketAddr,
    /// Seconds to connect to a sidecar.
    #[arg(long, default_value_t = 3.0)]
    sidecar_connect_timeout: f64,
    /// Seconds one sidecar call may take in all.
    #[arg(long, default_value_t = 15.0)]
    sidecar_timeout: f64,
    /// Seconds a pod whose workers are busy with another session is retried.
    #[arg(long, default_value_t = 120.0)]
    busy_wait: f64,
    /// Seconds past a session's expected end before its pod fails as timed out.
    #[arg(long, default_value_t = 60.0)]
    collect_grace: f64,
}

fn seconds(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() <= 86_400)
        .ok_or_else(|| anyhow::anyhow!("--{name} must be between 0 and 86400 seconds"))
}

const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn operator_namespace(args: &RunArgs) -> anyhow::Result<String> {
    if let Some(ns) = &args.operator_namespace {
        return Ok(ns.clone());
    }
    std::fs::read_to_string(IN_CLUSTER_NAMESPACE)
        .map(|s| s.trim().to_owned())
        .map_err(|_| anyhow::anyhow!("set --operator-namespace (or POD_NAMESPACE) outside a pod"))
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
    let result = match Cli::parse().command {
        Command::Crd => crd(),
        Command::Run(args) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("forkscope-operator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn crd() -> anyhow::Result<()> {
    let yaml = forkscope_operator::crd::crd_yaml()?;
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(())
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let identity = match &args.identity {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "forkscope-operator".into()),
    };
    let token = match args.auth {
        Auth::Static => {
            let file = args
                .sidecar_token_file
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--auth static needs --sidecar-token-file"))?;
            let source = TokenSource::Static(file);
            source.token().await?;
            source
        }
        Auth::Kubernetes => {
            let ns = operator_namespace(&args)?;
            TokenSource::Kubernetes(Box::new(ServiceAccountTokens::new(
                kube::Api::namespaced(client.clone(), &ns),
                args.service_account.clone(),
            )))
        }
    };
    let metrics = Metrics::new();
    let sidecars = HttpSidecars::new(
        token,
        metrics.clone(),
        seconds("sidecar-connect-timeout", args.sidecar_connect_timeout)?,
        seconds("sidecar-timeout", args.sidecar_timeout)?,
    )?;
    let tunables = Tunables {
        busy_wait: seconds("busy-wait", args.busy_wait)?,
        collect_grace: seconds("collect-grace", args.collect_grace)?,
        ..Tunables::default()
    };
    let reporter = Reporter {
        controller: "forkscope-operator".into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        sidecars,
        metrics.clone(),
        tunables,
        reporter,
    ));

    let health = Health {
        metrics,
        ready: Arc::new(AtomicBool::new(false)),
        store: Arc::new(std::sync::OnceLock::new()),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", args.listen))?;
    tracing::info!("metrics and probes on {}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let http = tokio::spawn(
        axum::serve(listener, serve::router(health.clone()))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    client.apiserver_version().await?;
    health.ready.store(true, Ordering::Relaxed);

    let elector = if args.leader_elect {
        let ns = operator_namespace(&args)?;
        let elector = Elector::new(
            kube::Api::namespaced(client.clone(), &ns),
            args.lease_name.clone(),
            identity.clone(),
            Duration::from_secs(args.lease_seconds.max(3)),
        );
        tokio::select! {
            () = elector.acquire() => {}
            () = stopped() => return Ok(()),
        }
        Some(elector)
    } else {
        None
    };
    let store = health.store.clone();
    let controller = controller::run(ctx, args.namespace.clone(), stopped(), move |s| {
        let _ = store.set(s);
    });
    let outcome = match &elector {
        Some(elector) => tokio::select! {
            () = controller => Ok(()),
            () = elector.hold() => Err(anyhow::anyhow!("lost the leader lease; exiting so a standby takes over")),
        },
        None => {
            controller.await;
            Ok(())
        }
    };
    let _ = http.await;
    outcome
}
