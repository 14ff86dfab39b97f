//! The Grafana dashboard (`charts/forkscope/dashboards/forkscope.json`) against a real
//! Prometheus. This test: three real application pods (forkscope-server with two workers +
//! sidecar, on the kubelet harness) discovered through Kubernetes pod service discovery on the
//! real apiserver ([`scrape`]) and scraped every second, with leaking traffic, finished and
//! cancelled profile sessions and a reload; then every panel and variable query must show
//! every worker of every pod with the values the sidecars' API reports ([`check`], which the
//! whole flow on the real node runs too, in `node_app.rs`). At the end
//! `scripts/render-dashboard` draws the panels from that Prometheus to a PNG.
//!
//! `FORKSCOPE_DASHBOARD_PICTURE=docs/dashboard.png FORKSCOPE_DASHBOARD_LOAD_SECONDS=60` renders
//! the README's picture from a longer run with leaking traffic.

pub mod check;
pub mod grafana;
pub mod prometheus;
pub mod scrape;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use check::PodSidecar;
use forkscope_e2e::cluster;
use forkscope_e2e::fleet::{AppPod, SidecarAuth};
use forkscope_e2e::kubelet::Kubelet;
use forkscope_sidecar::api::{ProfileRequest, SessionState};
use grafana::Dashboard;
use prometheus::Prometheus;
use scrape::{SCRAPE_SECONDS, Scraping, now};

const TOKEN: &str = "e2e-dashboard-token";
const PODS: [&str; 3] = ["web-a", "web-b", "web-c"];
/// The pod whose leader is reloaded, so its slots show restarts and the others none.
const RELOADED: &str = "web-a";
/// How long a profile session or a reload may take to settle.
const AGREE: Duration = Duration::from_secs(90);

/// Leaking traffic to every pod for `seconds`, two requests a second per pod (each keeps
/// 200 kB in the worker that serves it), so the memory lines move.
async fn leak_for(pods: &[AppPod], seconds: u64) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // A slow round of requests delays the next instead of bunching the missed ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..seconds * 2 {
        tick.tick().await;
        for pod in pods {
            pod.leak(1).await;
        }
    }
}

/// The session outcomes the panel counts: a stack dump of every pod (completed), and on one
/// pod a heap diff cancelled while it traces.
async fn profile_sessions(pods: &[AppPod]) -> anyhow::Result<()> {
    for pod in pods {
        let client = pod.client(TOKEN);
        let session = client.start_profile(&ProfileRequest::stacks()).await?;
        let done = client
            .wait(
                &session.id,
                Duration::from_secs(60),
                Duration::from_millis(100),
            )
            .await?;
        ensure!(
            done.state == SessionState::Completed,
            "{}: {done:?}\n{}",
            pod.name,
            pod.logs()
        );
    }
    let client = pods[1].client(TOKEN);
    let session = client
        .start_profile(&ProfileRequest::heap_diff(None))
        .await?;
    forkscope_e2e::wait::until("a heap diff tracing", AGREE, || {
        let (client, id) = (&client, &session.id);
        async move {
            let state = client
                .profile(id)
                .await
                .map_err(|e| forkscope_e2e::Error::Spawn {
                    program: "GET /v1/profiles/ID".into(),
                    source: std::io::Error::other(e),
                })?
                .state;
            Ok((state != SessionState::Starting).then_some(()))
        }
    })
    .await?;
    let cancelled = client.cancel(&session.id).await?;
    ensure!(cancelled.state == SessionState::Cancelled, "{cancelled:?}");
    Ok(())
}

/// Reloads `pod`'s leader and waits until the sidecar sees two new workers.
async fn reload(pod: &AppPod) -> anyhow::Result<()> {
    let client = pod.client(TOKEN);
    let before: BTreeSet<u32> = client.processes().await?.leaders[0]
        .workers
        .iter()
        .map(|w| w.pid)
        .collect();
    client.reload(None).await?;
    forkscope_e2e::wait::until("reloaded workers", AGREE, || {
        let (client, before) = (&client, &before);
        async move {
            let list = client
                .processes()
                .await
                .map_err(|e| forkscope_e2e::Error::Spawn {
                    program: "GET /v1/processes".into(),
                    source: std::io::Error::other(e),
                })?;
            let workers = &list.leaders[0].workers;
            Ok(
                (workers.len() == 2 && workers.iter().all(|w| !before.contains(&w.pid)))
                    .then_some(()),
            )
        }
    })
    .await
    .with_context(|| pod.logs())?;
    Ok(())
}

/// Draws the dashboard with `scripts/render-dashboard` from `prom` over `[start, end]`.
async fn render(
    prom: &Prometheus,
    ns: &str,
    app: &str,
    start: f64,
    end: f64,
    out: &Path,
) -> anyhow::Result<()> {
    let python = forkscope_tests::venv().join("bin/python");
    let output = tokio::process::Command::new(python)
        .arg(cluster::repo_path("scripts/render-dashboard"))
        .arg("--prometheus")
        .arg(&prom.url)
        .arg("--dashboard")
        .arg(cluster::repo_path(grafana::PATH))
        .args([
            "--start",
            &format!("{start:.3}"),
            "--end",
            &format!("{end:.3}"),
        ])
        .args(["--scrape-interval", &SCRAPE_SECONDS.to_string()])
        .args(["--var", &format!("namespace={ns}")])
        .args(["--var", &format!("app={app}")])
        .args(["--var", &format!("pod=({})", PODS.join("|"))])
        .arg("--out")
        .arg(out)
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "render-dashboard failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let png = std::fs::read(out).with_context(|| format!("{}", out.display()))?;
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} is not a rendered PNG ({} bytes)",
        out.display(),
        png.len()
    );
    Ok(())
}

#[tokio::test]
async fn every_panel_shows_every_worker_with_the_sidecars_values() -> anyhow::Result<()> {
    let admin = cluster::client().await?;
    let ns = cluster::test_namespace(&admin, "dashboard").await?;
    let dir = tempfile::tempdir()?;
    let dashboard = Dashboard::load(&cluster::repo_path(grafana::PATH))?;

    let kubelet = Kubelet::new(admin.clone(), &ns);
    let auth = SidecarAuth::Static(TOKEN.into());
    let mut pods = Vec::new();
    for name in PODS {
        pods.push(
            AppPod::start(&kubelet, name, &[("app", "web")], &auth)
                .await
                .with_context(|| format!("starting pod {name}"))?,
        );
    }

    let scraping = Scraping::start(&admin, &ns).await?;
    scraping.prom.await_targets(&PODS).await?;

    let load: u64 = std::env::var("FORKSCOPE_DASHBOARD_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    leak_for(&pods, load / 2).await;
    profile_sessions(&pods).await?;
    reload(&pods[0]).await?;
    leak_for(&pods, load - load / 2).await;

    let sidecars: Vec<PodSidecar> = pods
        .iter()
        .map(|pod| PodSidecar {
            pod: pod.name.clone(),
            client: pod.client(TOKEN),
        })
        .collect();
    check::await_agreement(
        &scraping,
        &dashboard,
        &sidecars,
        &[(RELOADED, 0), (RELOADED, 1)],
    )
    .await?;

    let app = check::app(&sidecars).await?;
    let out = match std::env::var_os("FORKSCOPE_DASHBOARD_PICTURE") {
        Some(path) => cluster::repo_path("").join(path),
        None => dir.path().join("dashboard.png"),
    };
    render(&scraping.prom, &ns, &app, scraping.since, now(), &out).await?;
    Ok(())
}
