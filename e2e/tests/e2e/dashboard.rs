//! The Grafana dashboard (`charts/forkscope/dashboards/forkscope.json`) against a real
//! Prometheus: three real application pods (forkscope-server with two workers + sidecar, on the
//! kubelet harness) are discovered through Kubernetes pod service discovery on the real
//! apiserver, with Prometheus's own ServiceAccount and Role, and scraped every second. Then every
//! panel's query and every variable query of the dashboard runs as Grafana would run it, and
//! each must show every worker of every pod with the values the sidecar's own API reports. At
//! the end `scripts/render-dashboard` draws the panels from that Prometheus to a PNG.
//!
//! `FORKSCOPE_DASHBOARD_PICTURE=docs/dashboard.png FORKSCOPE_DASHBOARD_LOAD_SECONDS=60` renders
//! the README's picture from a longer run with leaking traffic.

mod grafana;
mod prometheus;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use forkscope_e2e::cluster;
use forkscope_e2e::fleet::{AppPod, SidecarAuth};
use forkscope_e2e::kubelet::Kubelet;
use forkscope_sidecar::api::{LeaderView, Memory, ProcessList, ProfileRequest, SessionState};
use grafana::{Dashboard, Query, Variables};
use kube::config::Kubeconfig;
use prometheus::{Prometheus, Series};

const TOKEN: &str = "e2e-dashboard-token";
const PODS: [&str; 3] = ["web-a", "web-b", "web-c"];
/// The pod whose leader is reloaded, so its slots show restarts and the others none.
const RELOADED: &str = "web-a";
/// Prometheus's scrape interval in this test, seconds.
const SCRAPE_SECONDS: f64 = 1.0;
/// How long the panels may take to agree with the sidecars (scrapes lag, a reload settles).
const AGREE: Duration = Duration::from_secs(90);

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

async fn kubectl_apply(dir: &Path, name: &str, yaml: &str) -> anyhow::Result<()> {
    let file = dir.join(name);
    std::fs::write(&file, yaml)?;
    let out = cluster::kubectl(["apply", "-f", &file.display().to_string()]).await?;
    ensure!(
        out.status.success(),
        "kubectl apply {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What Prometheus needs to discover pods in `ns`: its own ServiceAccount, allowed to list and
/// watch pods there and nothing else.
fn prometheus_rbac(ns: &str) -> String {
    format!(
        "apiVersion: v1
kind: ServiceAccount
metadata:
  name: prometheus
  namespace: {ns}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: prometheus-pod-discovery
  namespace: {ns}
rules:
  - apiGroups: [\"\"]
    resources: [pods]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: prometheus-pod-discovery
  namespace: {ns}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: prometheus-pod-discovery
subjects:
  - kind: ServiceAccount
    name: prometheus
    namespace: {ns}
"
    )
}

/// The scrape configuration documented in docs/DASHBOARD.md, pointed at the test apiserver
/// from outside the cluster (URL, CA file, token file) and restricted to `ns`.
fn scrape_config(ns: &str, api_server: &str, ca: &Path, token: &Path) -> String {
    format!(
        "global:
  scrape_interval: {SCRAPE_SECONDS}s
  scrape_timeout: {SCRAPE_SECONDS}s
scrape_configs:
  - job_name: forkscope-sidecar
    kubernetes_sd_configs:
      - role: pod
        api_server: {api_server}
        authorization:
          credentials_file: {token}
        tls_config:
          ca_file: {ca}
        namespaces:
          names: [{ns}]
    relabel_configs:
      # Only the sidecar's port: the container port named forkscope.
      - source_labels: [__meta_kubernetes_pod_container_port_name]
        regex: forkscope
        action: keep
      - source_labels: [__meta_kubernetes_namespace]
        target_label: namespace
      - source_labels: [__meta_kubernetes_pod_name]
        target_label: pod
",
        token = token.display(),
        ca = ca.display(),
    )
}

/// The control plane's URL, with its CA written to `dir/ca.crt`.
fn api_server_and_ca(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let path = cluster::kubeconfig_path()?;
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let cluster = kubeconfig
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("a cluster in the kubeconfig")?;
    let server = cluster.server.context("the cluster's server")?;
    let ca = base64::engine::general_purpose::STANDARD.decode(
        cluster
            .certificate_authority_data
            .context("certificate-authority-data")?,
    )?;
    let file = dir.join("ca.crt");
    std::fs::write(&file, ca)?;
    Ok((server, file))
}

/// What the sidecar of one pod reports through its API.
struct PodView {
    name: String,
    leader: LeaderView,
    /// Sessions that ended, by outcome.
    outcomes: BTreeMap<&'static str, u64>,
}

impl PodView {
    fn worker(&self, slot: &str) -> Option<&Memory> {
        self.leader
            .workers
            .iter()
            .find(|w| w.slot.is_some_and(|s| s.to_string() == slot))
            .and_then(|w| w.memory.as_ref())
    }

    fn slots(&self) -> BTreeSet<String> {
        self.leader
            .workers
            .iter()
            .filter_map(|w| w.slot.map(|s| s.to_string()))
            .collect()
    }
}

async fn pod_views(pods: &[AppPod]) -> anyhow::Result<Vec<PodView>> {
    let mut views = Vec::new();
    for pod in pods {
        let client = pod.client(TOKEN);
        let ProcessList { leaders } = client.processes().await?;
        let [leader] = <[LeaderView; 1]>::try_from(leaders)
            .map_err(|l| anyhow::anyhow!("{}: want one leader, got {l:?}", pod.name))?;
        let mut outcomes = BTreeMap::new();
        for s in client.profiles().await?.sessions {
            if s.state.is_final() {
                *outcomes.entry(s.state.as_str()).or_default() += 1;
            }
        }
        views.push(PodView {
            name: pod.name.clone(),
            leader,
            outcomes,
        });
    }
    Ok(views)
}

/// What a panel's target must show, in terms of the sidecars' API.
enum Expect {
    /// One series per worker of every pod (labels pod, slot), its last value this.
    Worker(fn(&Memory) -> f64, Tolerance),
    /// One series per pod, its last value this.
    Pod(fn(&LeaderView) -> f64, Tolerance),
    /// One series per worker of every pod; over the range, above zero exactly for the slots of
    /// the reloaded pod.
    Restarts,
    /// One series per outcome, the number of sessions that ended so over all pods.
    SessionsByOutcome,
    /// One series per pod: the sidecar's scrape time, positive and under a second.
    ScrapeDuration,
    /// Series from another exporter (kube-state-metrics), not running here: the query must be
    /// valid; series, if any, are not checked.
    OtherExporter,
}

#[derive(Clone, Copy)]
enum Tolerance {
    /// Memory changes a little between a scrape and the API call: 2 % or 256 KiB.
    Bytes,
    /// A ratio, within 0.02.
    Ratio,
    Exact,
}

impl Tolerance {
    fn accepts(self, got: f64, want: f64) -> bool {
        let diff = (got - want).abs();
        match self {
            Tolerance::Bytes => diff <= (want.abs() * 0.02).max(256.0 * 1024.0),
            Tolerance::Ratio => diff <= 0.02,
            Tolerance::Exact => diff < 1e-9,
        }
    }
}

fn pss(m: &Memory) -> f64 {
    m.pss_bytes as f64
}

/// The expectation of each target, by panel title and refId. A target without one fails the
/// test, so a new panel cannot go unchecked.
fn expectation(q: &Query) -> Option<Expect> {
    Some(match (q.panel.as_str(), q.ref_id.as_str()) {
        ("PSS per worker", "A") => Expect::Worker(pss, Tolerance::Bytes),
        ("Workers per pod", "A") => Expect::Pod(|l| l.workers.len() as f64, Tolerance::Exact),
        ("Profile sessions by outcome", "A") => Expect::SessionsByOutcome,
        ("Private (USS) and shared memory per worker", "A") => {
            Expect::Worker(|m| m.uss_bytes as f64, Tolerance::Bytes)
        }
        ("Private (USS) and shared memory per worker", "B") => {
            Expect::Worker(|m| m.shared_bytes as f64, Tolerance::Bytes)
        }
        ("Copy-on-write sharing ratio per worker", "A") => Expect::Worker(
            |m| m.shared_bytes as f64 / m.rss_bytes as f64,
            Tolerance::Ratio,
        ),
        ("Pod PSS against the container's memory limit", "A") => Expect::Pod(
            |l| {
                let workers: u64 = l
                    .workers
                    .iter()
                    .filter_map(|w| w.memory.map(|m| m.pss_bytes))
                    .sum();
                (l.leader.memory.map_or(0, |m| m.pss_bytes) + workers) as f64
            },
            Tolerance::Bytes,
        ),
        ("Pod PSS against the container's memory limit", "B") => Expect::OtherExporter,
        ("Leader PSS", "A") => Expect::Pod(
            |l| l.leader.memory.map_or(f64::NAN, |m| m.pss_bytes as f64),
            Tolerance::Bytes,
        ),
        ("Worker restarts", "A") => Expect::Restarts,
        ("Sidecar scrape duration", "A") => Expect::ScrapeDuration,
        _ => return None,
    })
}

/// The series of `result` by the values of `keys`; a key seen twice is a mismatch.
fn by_labels<'a>(
    result: &'a [Series],
    keys: &[&str],
    problems: &mut Vec<String>,
) -> BTreeMap<Vec<String>, &'a Series> {
    let mut map = BTreeMap::new();
    for s in result {
        let key: Vec<String> = keys.iter().map(|k| s.label(k).to_owned()).collect();
        if map.insert(key.clone(), s).is_some() {
            problems.push(format!("two series for {key:?}"));
        }
    }
    map
}

/// Compares one target's result with the sidecars; returns what disagrees.
fn compare(expect: &Expect, result: &[Series], views: &[PodView]) -> Vec<String> {
    let mut problems = Vec::new();
    let value = |s: &Series| s.last().unwrap_or(f64::NAN);
    match expect {
        Expect::Worker(of, tolerance) => {
            let series = by_labels(result, &["pod", "slot"], &mut problems);
            let mut want_keys = BTreeSet::new();
            for view in views {
                for slot in view.slots() {
                    let key = vec![view.name.clone(), slot.clone()];
                    want_keys.insert(key.clone());
                    let Some(memory) = view.worker(&slot) else {
                        problems.push(format!("{} slot {slot}: the API has no memory", view.name));
                        continue;
                    };
                    let want = of(memory);
                    match series.get(&key) {
                        None => problems.push(format!("{key:?}: no series")),
                        Some(s) if !tolerance.accepts(value(s), want) => problems.push(format!(
                            "{key:?}: prometheus {} vs sidecar {want}",
                            value(s)
                        )),
                        Some(_) => {}
                    }
                }
            }
            for key in series.keys().filter(|k| !want_keys.contains(*k)) {
                problems.push(format!("{key:?}: a series of no worker"));
            }
        }
        Expect::Pod(of, tolerance) => {
            let series = by_labels(result, &["pod"], &mut problems);
            for view in views {
                let want = of(&view.leader);
                match series.get(&vec![view.name.clone()]) {
                    None => problems.push(format!("{}: no series", view.name)),
                    Some(s) if !tolerance.accepts(value(s), want) => problems.push(format!(
                        "{}: prometheus {} vs sidecar {want}",
                        view.name,
                        value(s)
                    )),
                    Some(_) => {}
                }
            }
            if series.len() != views.len() {
                problems.push(format!("{} series for {} pods", series.len(), views.len()));
            }
        }
        Expect::Restarts => {
            let series = by_labels(result, &["pod", "slot"], &mut problems);
            for view in views {
                for slot in view.slots() {
                    let key = vec![view.name.clone(), slot];
                    let Some(s) = series.get(&key) else {
                        problems.push(format!("{key:?}: no series"));
                        continue;
                    };
                    let max = s.max().unwrap_or(f64::NAN);
                    let restarted = view.name == RELOADED;
                    if restarted != (max >= 0.5) {
                        problems.push(format!(
                            "{key:?}: at most {max} restarts per interval, want {}",
                            if restarted { "some" } else { "none" }
                        ));
                    }
                }
            }
        }
        Expect::SessionsByOutcome => {
            let series = by_labels(result, &["outcome"], &mut problems);
            for outcome in [
                SessionState::Completed,
                SessionState::Failed,
                SessionState::Cancelled,
                SessionState::TimedOut,
                SessionState::Orphaned,
            ]
            .map(SessionState::as_str)
            {
                let want: u64 = views
                    .iter()
                    .map(|v| v.outcomes.get(outcome).copied().unwrap_or(0))
                    .sum();
                match series.get(&vec![outcome.to_owned()]) {
                    None => problems.push(format!("outcome {outcome}: no series")),
                    Some(s) if value(s) != want as f64 => problems.push(format!(
                        "outcome {outcome}: prometheus {} vs sidecars {want}",
                        value(s)
                    )),
                    Some(_) => {}
                }
            }
        }
        Expect::ScrapeDuration => {
            let series = by_labels(result, &["pod"], &mut problems);
            for view in views {
                match series.get(&vec![view.name.clone()]) {
                    None => problems.push(format!("{}: no series", view.name)),
                    Some(s) if !(value(s) > 0.0 && value(s) < 1.0) => {
                        problems.push(format!("{}: scrape took {} s", view.name, value(s)))
                    }
                    Some(_) => {}
                }
            }
        }
        Expect::OtherExporter => {}
    }
    problems
}

/// The dashboard's variables as a user selecting exactly this test's pods would set them
/// (Grafana formats a multi-value selection as a regex alternation).
fn selection(ns: &str, app: &str) -> Variables {
    Variables::default()
        .with("datasource", "prometheus")
        .with("namespace", ns)
        .with("app", app)
        .with("pod", format!("({})", PODS.join("|")))
        .with("container", "app")
}

/// Runs every query of the dashboard over `[start, end]`; the problems found, empty when
/// every panel agrees with the sidecars.
async fn check_dashboard(
    prom: &Prometheus,
    dashboard: &Dashboard,
    pods: &[AppPod],
    ns: &str,
    start: f64,
) -> anyhow::Result<Vec<String>> {
    let views = pod_views(pods).await?;
    let app = views[0].leader.app.clone();
    let end = now();
    let range = end - start;
    let step = (range / 300.0).ceil().max(SCRAPE_SECONDS);
    let vars = selection(ns, &app).with_time(range, step, SCRAPE_SECONDS);
    let mut problems = Vec::new();

    for var in &dashboard.variables {
        let matcher = vars.substitute(&var.matcher)?;
        let mut got = prom.label_values(&var.label, &matcher).await?;
        got.sort();
        let want: Vec<String> = match var.name.as_str() {
            "namespace" => vec![ns.to_owned()],
            "app" => vec![app.clone()],
            "pod" => PODS.iter().map(|p| (*p).to_owned()).collect(),
            other => bail!("variable ${other} has no expectation in this test"),
        };
        if got != want {
            problems.push(format!("variable ${}: {got:?}, want {want:?}", var.name));
        }
    }

    for q in &dashboard.queries {
        let expect = expectation(q).with_context(|| {
            format!(
                "panel {:?} target {} has no expectation in this test: add one",
                q.panel, q.ref_id
            )
        })?;
        let expr = vars.substitute(&q.expr)?;
        let result = if q.instant {
            prom.query(&expr, end).await?
        } else {
            prom.query_range(&expr, start, end, step).await?
        };
        if result.is_empty() && !matches!(expect, Expect::OtherExporter) {
            problems.push(format!("{} / {}: no series for {expr}", q.panel, q.ref_id));
            continue;
        }
        for s in &result {
            grafana::legend(&q.legend, &s.labels)
                .with_context(|| format!("panel {:?} target {}", q.panel, q.ref_id))?;
        }
        problems.extend(
            compare(&expect, &result, &views)
                .into_iter()
                .map(|p| format!("{} / {}: {p}", q.panel, q.ref_id)),
        );
    }
    Ok(problems)
}

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

    kubectl_apply(dir.path(), "prometheus-rbac.yaml", &prometheus_rbac(&ns)).await?;
    let token = cluster::service_account_token(&admin, &ns, "prometheus").await?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token)?;
    let (api_server, ca) = api_server_and_ca(dir.path())?;
    let start = now();
    let prom = Prometheus::start(
        dir.path(),
        &scrape_config(&ns, &api_server, &ca, &token_file),
    )
    .await?;
    prom.await_targets(&PODS).await?;

    let load: u64 = std::env::var("FORKSCOPE_DASHBOARD_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    leak_for(&pods, load / 2).await;
    profile_sessions(&pods).await?;
    reload(&pods[0]).await?;
    leak_for(&pods, load - load / 2).await;

    let deadline = tokio::time::Instant::now() + AGREE;
    loop {
        let problems = check_dashboard(&prom, &dashboard, &pods, &ns, start).await?;
        if problems.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the dashboard disagrees with the sidecars after {AGREE:?}:\n{}\n--- prometheus log\n{}",
                problems.join("\n"),
                prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let app = pod_views(&pods[..1]).await?[0].leader.app.clone();
    let out = match std::env::var_os("FORKSCOPE_DASHBOARD_PICTURE") {
        Some(path) => cluster::repo_path("").join(path),
        None => dir.path().join("dashboard.png"),
    };
    render(&prom, &ns, &app, start, now(), &out).await?;
    Ok(())
}
