//! Benchmark of the operator at fleet scale (docs/BENCHMARKS.md): 100 pods × 8 workers served by
//! simulated sidecars, one small axum server per pod address 127.0.0.N built from the sidecar's
//! own API types, and the real `forkscope-operator` binary (release build) against the real
//! apiserver. For a 10 s HeapDiff at parallelism 100 and at 10 it prints, per run: wall time
//! from apply to `Succeeded`, status writes, the operator's CPU seconds and its peak RSS.
//!
//! ```text
//! cargo build --release -p forkscope-operator
//! e2e/with-controlplane cargo bench -p forkscope-e2e --bench operator_fleet
//! ```
//!
//! The pods are kubelet-harness pods (Running and Ready, pod IP 127.0.0.N); nothing but
//! loopback addresses is contacted.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use forkscope_e2e::kubelet::{Kubelet, TestPod};
use forkscope_e2e::wait::until;
use forkscope_e2e::{cluster, crds};
use forkscope_operator::crd::{Phase, ProfileRequest};
use forkscope_protocol::{
    Action, CommandResult, Frame, GroupBy, HeapDiff, Outcome, SiteDiff, TracedMemory,
};
use forkscope_sidecar::api::{
    ProfileRequest as SidecarRequest, Session, SessionList, SessionState, WorkerRun, WorkerState,
};
use kube::Api;

const PODS: u8 = 100;
const WORKERS: u32 = 8;
const SITES: usize = 50;
const PORT: u16 = 9808;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One simulated sidecar: sessions complete `duration` after they start, with a heap diff per
/// worker in which the leak line grows most.
#[derive(Default)]
struct Fake {
    sessions: Mutex<HashMap<String, Session>>,
}

fn heap_diff(pid: u32) -> CommandResult {
    let sites: Vec<SiteDiff> = (0..SITES)
        .map(|i| SiteDiff {
            traceback: vec![Frame {
                filename: if i == 0 {
                    "app/views.py".into()
                } else {
                    format!("lib/module{i}.py")
                },
                lineno: 42,
                function: None,
            }],
            size_before: 0,
            size_after: 1_000_000 / (i as u64 + 1),
            size_diff: 1_000_000 / (i as i64 + 1),
            count_before: 0,
            count_after: 100,
            count_diff: 100,
        })
        .collect();
    CommandResult {
        version: forkscope_protocol::FORMAT_VERSION,
        request_id: "bench".into(),
        action: Action::Capture,
        pid,
        slot: pid % WORKERS,
        started_at: now(),
        finished_at: now(),
        outcome: Outcome::HeapDiff(HeapDiff {
            frames: 1,
            group_by: GroupBy::Lineno,
            baseline_at: now(),
            captured_at: now(),
            traced_before: TracedMemory::default(),
            traced_after: TracedMemory {
                current: 5_000_000,
                peak: 5_000_000,
            },
            tracemalloc_overhead_bytes: 100_000,
            pss_before_bytes: Some(50_000_000),
            pss_after_bytes: Some(56_000_000),
            total_size_diff: sites.iter().map(|s| s.size_diff).sum(),
            total_sites: SITES as u64,
            sites,
        }),
    }
}

impl Fake {
    fn settle(&self, s: &mut Session) {
        let due = s.created_at + s.request.duration_seconds.unwrap_or(0.0);
        if s.state == SessionState::Tracing && now() >= due {
            s.state = SessionState::Completed;
            s.finished_at = Some(now());
            for w in &mut s.workers {
                w.state = WorkerState::Done;
                w.result = Some(heap_diff(w.pid));
            }
        }
    }
}

async fn start(State(fake): State<Arc<Fake>>, Json(req): Json<SidecarRequest>) -> Json<Session> {
    let mut sessions = fake.sessions.lock().expect("lock");
    let id = format!("fake-{}", sessions.len());
    let session = Session {
        id: id.clone(),
        state: SessionState::Tracing,
        request: req,
        leader_pid: 1,
        created_at: now(),
        finished_at: None,
        deadline_at: None,
        error: None,
        workers: (0..WORKERS)
            .map(|slot| WorkerRun {
                pid: 10 + slot,
                start_ticks: 1,
                slot: Some(slot),
                state: WorkerState::Tracing,
                error: None,
                result: None,
            })
            .collect(),
        summary: None,
    };
    sessions.insert(id, session.clone());
    Json(session)
}

async fn list(State(fake): State<Arc<Fake>>) -> Json<SessionList> {
    let sessions = fake.sessions.lock().expect("lock");
    Json(SessionList {
        sessions: sessions
            .values()
            .map(|s| Session {
                workers: Vec::new(),
                ..s.clone()
            })
            .collect(),
    })
}

async fn one(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
) -> Result<Json<Session>, axum::http::StatusCode> {
    let mut sessions = fake.sessions.lock().expect("lock");
    let s = sessions
        .get_mut(&id)
        .ok_or(axum::http::StatusCode::NOT_FOUND)?;
    fake.settle(s);
    Ok(Json(s.clone()))
}

async fn serve_fake(ip: Ipv4Addr) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/v1/profiles", get(list).post(start))
        .route("/v1/profiles/{id}", get(one))
        .with_state(Arc::new(Fake::default()));
    let listener = tokio::net::TcpListener::bind((ip, PORT)).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

/// utime + stime in seconds, and peak RSS in MiB, of `pid`.
fn cpu_and_peak(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, r)| r.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the state field.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    (cpu, peak)
}

async fn status_writes(metrics: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(metrics).await?.text().await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("forkscope_operator_status_writes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    crds::install_profile_request_crd(&client).await?;
    let ns = cluster::test_namespace(&client, "bench-fleet").await?;
    let kubelet = Kubelet::new(client.clone(), &ns);
    for i in 0..PODS {
        let ip = Ipv4Addr::new(127, 0, 1, i + 2);
        serve_fake(ip).await?;
        kubelet
            .run(
                &TestPod::new(&format!("web-{i:03}"))
                    .label("app", "web")
                    .port("forkscope", i32::from(PORT)),
                ip,
            )
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "bench")?;
    let release = forkscope_tests::server_bin()
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("release/forkscope-operator"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build it first: cargo build --release -p forkscope-operator")
        })?;
    let listen = "127.0.0.1:18089";
    let mut operator = tokio::process::Command::new(&release)
        .args([
            "run",
            "--namespace",
            &ns,
            "--leader-elect",
            "false",
            "--auth",
            "static",
            "--listen",
            listen,
        ])
        .arg("--sidecar-token-file")
        .arg(&token)
        .env("KUBECONFIG", cluster::kubeconfig_path()?)
        .env("FORKSCOPE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = operator.id().unwrap_or(0);
    let metrics = format!("http://{listen}/metrics");
    until("operator up", Duration::from_secs(30), || async {
        Ok(reqwest::get(&metrics).await.ok().map(|_| ()))
    })
    .await?;

    let api: Api<ProfileRequest> = Api::namespaced(client.clone(), &ns);
    println!(
        "| parallelism | apply → Succeeded (s) | status writes | operator CPU (s) | operator peak RSS (MiB) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for parallelism in [100, 10] {
        let name = format!("fleet-p{parallelism}");
        let manifest = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: forkscope.dev/v1alpha1\nkind: ProfileRequest\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: web\n  duration: 10s\n  top: 20\n  parallelism: {parallelism}\n"
            ),
        )?;
        let (cpu0, _) = cpu_and_peak(pid);
        let writes0 = status_writes(&metrics).await?;
        let started = Instant::now();
        let out = cluster::kubectl(["apply", "-f", &manifest.display().to_string()]).await?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pr = until(&name, Duration::from_secs(600), || async {
            let pr = api.get(&name).await?;
            Ok(pr
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .filter(|p| p.is_finished())
                .map(|_| pr))
        })
        .await?;
        let wall = started.elapsed().as_secs_f64();
        let status = pr.status.unwrap_or_default();
        anyhow::ensure!(status.phase == Some(Phase::Succeeded), "{status:?}");
        anyhow::ensure!(
            status.top_site.as_deref() == Some("app/views.py:42"),
            "{:?}",
            status.top_site
        );
        let (cpu1, peak) = cpu_and_peak(pid);
        let writes = status_writes(&metrics).await? - writes0;
        println!(
            "| {parallelism} | {wall:.1} | {writes:.0} | {:.2} | {peak:.0} |",
            cpu1 - cpu0
        );
    }
    let _ = operator.kill().await;
    Ok(())
}
