//! The example application (`examples/app.yaml`: forkscope-server serving a leaky app with
//! forkscope-sidecar in the same pod, two replicas) on the real node, and a plain gunicorn pod
//! with the sidecar. Everything is reached from the host at the pods' own addresses, as
//! Prometheus and the operator reach them; in the whole flow a real Prometheus scrapes the
//! pods through Kubernetes discovery and the dashboard's queries run on it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use forkscope_e2e::{cluster, node, wait};
use forkscope_operator::crd::{Phase, ProfileRequest};
use forkscope_sidecar::api::{LeaderView, ProcessList, ServerKind, SessionState};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};

use crate::dashboard::check::{self, PodSidecar};
use crate::dashboard::grafana::Dashboard;
use crate::dashboard::scrape::Scraping;

/// The line of `examples/leaky_app.py` that allocates what the app leaks (1-based).
/// The request's top site is the leak line of examples/leaky_app.py; that site.
fn ensure_leak_on_top(
    status: &forkscope_operator::crd::ProfileRequestStatus,
) -> anyhow::Result<String> {
    let site = format!("leaky_app.py:{}", leak_line()?);
    ensure!(
        status
            .top_site
            .as_deref()
            .is_some_and(|s| s.ends_with(&site)),
        "top site {:?}, want {site}: {status:#?}",
        status.top_site
    );
    Ok(site)
}

fn leak_line() -> anyhow::Result<u32> {
    let source = std::fs::read_to_string(cluster::repo_path("examples/leaky_app.py"))?;
    let index = source
        .lines()
        .position(|l| l.trim_end().ends_with("# LEAK"))
        .context("examples/leaky_app.py marks its leak with `# LEAK`")?;
    Ok(u32::try_from(index + 1)?)
}

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of a Prometheus text exposition (label values without escapes, as the
/// sidecar's are).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once("=\"")?;
                    Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// The value of the series `name` whose labels include all of `want`.
fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// The only leader the sidecar lists, checked to be of `kind` with `workers` workers in slots
/// 0..workers, every process with its memory read.
fn only_leader(list: &ProcessList, kind: ServerKind, workers: u32) -> anyhow::Result<&LeaderView> {
    let [leader] = list.leaders.as_slice() else {
        bail!("expected one leader: {list:?}");
    };
    ensure!(leader.server == kind, "{leader:?}");
    let mut slots: Vec<u32> = leader.workers.iter().filter_map(|w| w.slot).collect();
    slots.sort_unstable();
    ensure!(
        slots == (0..workers).collect::<Vec<_>>(),
        "slots {slots:?}: {leader:?}"
    );
    for process in std::iter::once(&leader.leader).chain(&leader.workers) {
        let memory = process.memory.context("memory of every process is read")?;
        ensure!(
            memory.pss_bytes > 0 && memory.rss_bytes >= memory.pss_bytes,
            "{process:?}"
        );
    }
    Ok(leader)
}

/// Polls the sidecar until it lists one leader of `kind` with all `workers` (a pod is Ready
/// once one worker answers the probe; the other may still be booting).
async fn wait_for_workers(
    sidecar: &forkscope_sidecar::Client,
    kind: ServerKind,
    workers: u32,
) -> anyhow::Result<ProcessList> {
    let what = format!("the sidecar lists a {kind:?} leader with {workers} workers");
    let last = std::sync::Mutex::new(None);
    let found = wait::until(&what, node::POD_TIMEOUT, || {
        let last = &last;
        async move {
            let list = sidecar.processes().await.map_err(tool)?;
            let ok = only_leader(&list, kind, workers).is_ok();
            *last.lock().expect("not poisoned") = Some(list.clone());
            Ok(ok.then_some(list))
        }
    })
    .await;
    found.with_context(|| format!("last seen: {:?}", last.lock().expect("not poisoned")))
}

/// Each worker slot has a PSS series with a positive value in the sidecar's /metrics. The
/// sidecar serves a read up to 10 s old while it reads afresh (docs/METRICS.md), and a
/// Prometheus may have scraped it before the workers booted: a few reads may come first.
async fn metrics_have_worker_pss(
    sidecar: &forkscope_sidecar::Client,
    server: &str,
    workers: u32,
) -> anyhow::Result<Vec<Sample>> {
    let missing = |scraped: &[Sample]| {
        (0..workers).find_map(|slot| {
            let slot = slot.to_string();
            let labels = [
                ("server", server),
                ("role", "worker"),
                ("slot", slot.as_str()),
            ];
            match value(scraped, "forkscope_process_pss_bytes", &labels) {
                Some(pss) if pss > 0.0 => None,
                other => Some(format!("PSS of {labels:?}: {other:?}")),
            }
        })
    };
    let last = std::sync::Mutex::new(String::new());
    let found = wait::until(
        "every worker's PSS in /metrics",
        Duration::from_secs(30),
        || {
            let last = &last;
            async move {
                let scraped = samples(&sidecar.metrics_text().await.map_err(tool)?);
                match missing(&scraped) {
                    None => Ok(Some(scraped)),
                    Some(why) => {
                        *last.lock().expect("not poisoned") = why;
                        Ok(None)
                    }
                }
            }
        },
    )
    .await;
    found.with_context(|| last.lock().expect("not poisoned").clone())
}

fn pod_name(pod: &Pod) -> anyhow::Result<&str> {
    pod.metadata.name.as_deref().context("pod name")
}

/// Run in a pod's container: one line per forkscope process of the pod, with its user and
/// confinement from `/proc/PID/status`.
const PROCESS_STATUS: &str = r#"
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv0 = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")[0].decode()
        fields = dict(l.split(":", 1) for l in open("/proc/%s/status" % pid).read().splitlines())
    except OSError:
        continue
    program = argv0.split("/")[-1].split(":")[0]
    if program.startswith("forkscope-"):
        print(program, "uid=%s caps=%s no_new_privs=%s seccomp=%s" % (
            fields["Uid"].split()[0], fields["CapEff"].strip(), fields["NoNewPrivs"].strip(),
            fields["Seccomp"].strip()))
"#;

#[test]
fn the_example_configmap_holds_examples_leaky_app_py() -> anyhow::Result<()> {
    let manifest = std::fs::read_to_string(cluster::repo_path("examples/app.yaml"))?;
    let source = std::fs::read_to_string(cluster::repo_path("examples/leaky_app.py"))?;
    let mut found = false;
    for document in manifest.split("\n---\n") {
        let value: serde_yaml::Value = serde_yaml::from_str(&format!("{document}\n"))?;
        if value["kind"] == "ConfigMap" {
            assert_eq!(
                value["data"]["leaky_app.py"].as_str(),
                Some(source.as_str()),
                "examples/app.yaml's ConfigMap is stale: copy examples/leaky_app.py into it"
            );
            found = true;
        }
    }
    ensure!(found, "examples/app.yaml has the app's ConfigMap");
    Ok(())
}

/// `helm ARGS`, which must succeed; its output.
async fn helm(args: &[&str]) -> anyhow::Result<String> {
    let helm = std::env::var_os("FORKSCOPE_HELM")
        .context("FORKSCOPE_HELM: run through e2e/with-controlplane")?;
    let out = cluster::run_tool(&helm, args).await?;
    ensure!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The user's whole flow on the real node, as the README tells it: `helm install` of the chart
/// (the operator Ready in real pods), `kubectl apply -f examples/app.yaml` (pods Ready through
/// real probes; each sidecar sees its workers, exports their PSS, profiles, follows a killed
/// worker's replacement), `kubectl apply -f examples/profilerequest.yaml` (→ `Succeeded` with
/// the leak line as top site, events in `kubectl describe`), the dashboard the chart installed
/// showing every worker's memory as a real Prometheus scraped it, then `helm uninstall`, which
/// leaves only what the user created.
#[tokio::test]
async fn the_users_whole_flow_on_the_real_node() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    let ns = cluster::test_namespace(&client, "app").await?;
    node::require_images(&client, &[node::OPERATOR_IMAGE]).await?;
    // Prometheus watches the namespace from the start, as a cluster's would: it discovers the
    // app's pods when they come, and scrapes the restart and the sessions below as they happen.
    let scraping = Scraping::start(&client, &ns).await?;
    let (release_ns, _) = node::OPERATOR_ACCOUNT;
    let chart = cluster::repo_path("charts/forkscope").display().to_string();
    let (repository, tag) = node::OPERATOR_IMAGE
        .rsplit_once(':')
        .context("image with a tag")?;
    // Local images only, and this test's namespace only: other tests run their own operators.
    let install = helm(&[
        "install",
        "forkscope",
        &chart,
        "--namespace",
        release_ns,
        "--create-namespace",
        "--set",
        &format!("operator.image.repository={repository}"),
        "--set",
        &format!("operator.image.tag={tag}"),
        "--set",
        "operator.image.pullPolicy=Never",
        "--set",
        &format!("operator.watchNamespace={ns}"),
        "--wait",
        "--timeout",
        "5m",
    ])
    .await?;
    ensure!(
        install.contains("kubectl apply -f examples/profilerequest.yaml"),
        "{install}"
    );
    let token = node::operator_token(&client).await?;

    let pods = node::run_example_app(&client, &ns).await?;
    ensure!(pods.len() == 2, "two replicas: {pods:?}");
    let node_name = node::name()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;

    // Each pod: on the real node, at its own address; its sidecar lists the leader and both
    // workers with their memory, and /metrics has each worker's PSS.
    for pod in &pods {
        let spec = pod.spec.as_ref().context("spec")?;
        ensure!(
            spec.node_name.as_deref() == Some(node_name.as_str()),
            "{spec:?}"
        );
        let sidecar = node::sidecar(pod, &token)?;
        let list = wait_for_workers(&sidecar, ServerKind::Forkscope, 2).await?;
        let leader = only_leader(&list, ServerKind::Forkscope, 2)?;
        ensure!(leader.app == "leaky_app:app", "{leader:?}");
        metrics_have_worker_pss(&sidecar, "forkscope", 2).await?;
        // The server answers at the pod's address too (the readiness probe's port).
        let hello = http.get(node::pod_url(pod, "http")?).send().await?;
        ensure!(hello.status().is_success(), "{hello:?}");
    }

    // The restricted security context is real: server and sidecar, seen from the server's
    // container through the shared PID namespace, run as the pod's user with no capability,
    // no_new_privs and the runtime's seccomp filter.
    let status = node::exec(
        &ns,
        pod_name(&pods[0])?,
        "app",
        &["python3.11", "-c", PROCESS_STATUS],
    )
    .await?;
    let mut programs: Vec<&str> = Vec::new();
    for line in status.lines() {
        let (program, rest) = line.split_once(' ').context("program and fields")?;
        ensure!(
            rest == "uid=10001 caps=0000000000000000 no_new_privs=1 seccomp=2",
            "{line}"
        );
        programs.push(program);
    }
    programs.sort_unstable();
    programs.dedup();
    ensure!(
        programs == ["forkscope-server", "forkscope-sidecar"],
        "{status}"
    );

    // A heap diff through the first pod's sidecar names the leak line.
    let (pod, sidecar) = (&pods[0], node::sidecar(&pods[0], &token)?);
    let session = sidecar
        .start_profile(&forkscope_sidecar::api::ProfileRequest::heap_diff(None))
        .await?;
    wait::until("the session traces", node::POD_TIMEOUT, || async {
        let state = sidecar.profile(&session.id).await.map_err(tool)?.state;
        Ok((state != SessionState::Starting).then_some(()))
    })
    .await?;
    let leak = format!("{}leak?n=20", node::pod_url(pod, "http")?);
    for _ in 0..10 {
        let response = http.get(&leak).send().await?;
        ensure!(response.status().is_success(), "{response:?}");
    }
    sidecar.capture(&session.id).await?;
    let done = sidecar
        .wait(
            &session.id,
            Duration::from_secs(120),
            Duration::from_millis(200),
        )
        .await?;
    ensure!(done.state == SessionState::Completed, "{done:?}");
    let summary = done
        .summary
        .context("a completed heap diff has a summary")?;
    let top = summary.sites.first().context("sites")?;
    let frame = top.traceback.first().context("a traceback")?;
    ensure!(
        frame.filename.ends_with("leaky_app.py") && frame.lineno == leak_line()?,
        "the top site is the leak line {}: {summary:?}",
        leak_line()?
    );
    ensure!(
        top.size_diff >= 200 * 100_000,
        "200 leaked 100 kB objects: {top:?}"
    );

    // `kubectl logs` shows the server's log: its start and the requests.
    let logs = node::kubectl_ok(["logs", "-n", &ns, pod_name(pod)?, "-c", "app"]).await?;
    ensure!(logs.contains("Listening at: http://0.0.0.0:8000"), "{logs}");
    ensure!(logs.contains("GET /leak?n=20"), "{logs}");

    // Prometheus has scraped both sidecars by now, so it sees slot 1's restart count rise.
    let names = pods
        .iter()
        .map(pod_name)
        .collect::<anyhow::Result<Vec<_>>>()?;
    scraping.prom.await_targets(&names).await?;

    // A worker killed inside the other pod (by the server image's Python, as the pod's user)
    // is replaced in its slot, and the metrics follow the new process.
    let (pod, sidecar) = (&pods[1], node::sidecar(&pods[1], &token)?);
    let before = sidecar.processes().await?;
    let victim = only_leader(&before, ServerKind::Forkscope, 2)?
        .workers
        .iter()
        .find(|w| w.slot == Some(1))
        .context("slot 1")?
        .pid;
    let scraped = metrics_have_worker_pss(&sidecar, "forkscope", 2).await?;
    let victim_label = victim.to_string();
    ensure!(
        value(
            &scraped,
            "forkscope_process_info",
            &[("slot", "1"), ("pid", &victim_label)]
        ) == Some(1.0),
        "the info series names the worker of slot 1"
    );
    let kill = format!("import os, signal; os.kill({victim}, signal.SIGKILL)");
    node::exec(&ns, pod_name(pod)?, "app", &["python3.11", "-c", &kill]).await?;
    let replacement = wait::until("slot 1 replaced", node::POD_TIMEOUT, || async {
        let list = sidecar.processes().await.map_err(tool)?;
        let Ok(leader) = only_leader(&list, ServerKind::Forkscope, 2) else {
            return Ok(None);
        };
        let worker = leader.workers.iter().find(|w| w.slot == Some(1));
        Ok(worker.map(|w| w.pid).filter(|pid| *pid != victim))
    })
    .await?;
    let replacement_label = replacement.to_string();
    wait::until(
        "metrics follow the new worker of slot 1",
        node::POD_TIMEOUT,
        || async {
            let scraped = samples(&sidecar.metrics_text().await.map_err(tool)?);
            let info = value(
                &scraped,
                "forkscope_process_info",
                &[("slot", "1"), ("pid", &replacement_label)],
            );
            let restarts = value(
                &scraped,
                "forkscope_worker_restarts_total",
                &[("slot", "1")],
            );
            let pss = value(
                &scraped,
                "forkscope_process_pss_bytes",
                &[("role", "worker"), ("slot", "1")],
            );
            Ok((info == Some(1.0) && restarts >= Some(1.0) && pss > Some(0.0)).then_some(()))
        },
    )
    .await?;
    // The pod itself lived on: no container restarted.
    let pod_now = kube::Api::<Pod>::namespaced(client.clone(), &ns)
        .get(pod_name(pod)?)
        .await?;
    let restarts: i32 = pod_now
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    ensure!(restarts == 0, "no container restarted");

    // The README's ProfileRequest, reconciled by the chart's operator in its pod: heap diffs
    // of both pods' workers while traffic leaks, ranked across them.
    node::kubectl_ok([
        "apply",
        "-n",
        &ns,
        "-f",
        &cluster::repo_path("examples/profilerequest.yaml")
            .display()
            .to_string(),
    ])
    .await?;
    let requests = kube::Api::<ProfileRequest>::namespaced(client.clone(), &ns);
    let running = |pr: &ProfileRequest| {
        pr.status.as_ref().is_some_and(|s| {
            s.phase.is_some_and(|p| p.is_finished())
                || (!s.pods.is_empty() && s.pods.iter().all(|p| p.session_id.is_some()))
        })
    };
    let started = wait::until(
        "the operator starts the sessions",
        node::POD_TIMEOUT,
        || async { Ok(running(&requests.get("web-heap-diff").await?).then_some(())) },
    )
    .await;
    with_operator_log(started, release_ns).await?;
    for pod in &pods {
        let leak = format!("{}leak?n=5", node::pod_url(pod, "http")?);
        for _ in 0..20 {
            let response = http.get(&leak).send().await?;
            ensure!(response.status().is_success(), "{response:?}");
        }
    }
    let done = wait::until(
        "web-heap-diff finishes",
        Duration::from_secs(300),
        || async {
            let pr = requests.get("web-heap-diff").await?;
            Ok(pr
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .filter(|p| p.is_finished())
                .map(|_| pr))
        },
    )
    .await;
    let done = with_operator_log(done, release_ns).await?;
    let status = done.status.unwrap_or_default();
    ensure!(status.phase == Some(Phase::Succeeded), "{status:#?}");
    let site = ensure_leak_on_top(&status)?;
    let table = node::kubectl_ok(["get", "profilerequests", "-n", &ns]).await?;
    ensure!(
        table.contains("Succeeded") && table.contains(&site),
        "{table}"
    );
    let described =
        node::kubectl_ok(["describe", "profilerequest", "web-heap-diff", "-n", &ns]).await?;
    ensure!(
        described.contains("Started") && described.contains("Completed"),
        "{described}"
    );

    // The dashboard the chart installed shows both pods' workers with what their sidecars
    // report: the killed slot's restart, the sessions of the sidecar and of the operator.
    let dashboard = installed_dashboard(&client, release_ns).await?;
    let sidecars = pods
        .iter()
        .map(|pod| {
            Ok(PodSidecar {
                pod: pod_name(pod)?.to_owned(),
                client: node::sidecar(pod, &token)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    check::await_agreement(
        &scraping,
        &dashboard,
        &sidecars,
        &[(pod_name(&pods[1])?, 1)],
    )
    .await?;

    // helm uninstall takes the operator away and leaves what the user created.
    helm(&[
        "uninstall",
        "forkscope",
        "--namespace",
        release_ns,
        "--wait",
    ])
    .await?;
    let operators =
        kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), release_ns);
    ensure!(
        operators.get_opt("forkscope-operator").await?.is_none(),
        "the operator is gone"
    );
    ensure!(
        requests.get_opt("web-heap-diff").await?.is_some(),
        "the user's request stays"
    );
    let apps = kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), &ns);
    ensure!(apps.get_opt("web").await?.is_some(), "the user's app stays");
    Ok(())
}

/// The dashboard as the chart installed it: the ConfigMap labelled for Grafana's dashboard
/// sidecar, which loads it from there.
async fn installed_dashboard(client: &kube::Client, namespace: &str) -> anyhow::Result<Dashboard> {
    let map = kube::Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get("forkscope-dashboard")
        .await?;
    let labels = map.metadata.labels.unwrap_or_default();
    ensure!(
        labels.get("grafana_dashboard").map(String::as_str) == Some("1"),
        "labels of the dashboard's ConfigMap: {labels:?}"
    );
    let json = map.data.unwrap_or_default().remove("forkscope.json");
    Dashboard::parse(&json.context("forkscope.json in the dashboard's ConfigMap")?)
}

/// A wait that failed, with the chart's operator's log attached (what it did and why not).
async fn with_operator_log<T>(
    result: forkscope_e2e::Result<T>,
    namespace: &str,
) -> anyhow::Result<T> {
    match result {
        Ok(value) => Ok(value),
        Err(e) => {
            let log = node::kubectl_ok([
                "logs",
                "-n",
                namespace,
                "deployment/forkscope-operator",
                "--tail=100",
            ])
            .await
            .unwrap_or_else(|e| format!("(no operator log: {e})"));
            Err(anyhow::Error::from(e).context(format!("operator log:\n{log}")))
        }
    }
}

#[tokio::test]
async fn the_sidecar_sees_a_plain_gunicorn_pod() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    node::require_images(&client, &[node::GUNICORN_IMAGE, node::SIDECAR_IMAGE]).await?;
    let ns = cluster::test_namespace(&client, "gunicorn").await?;
    let app = cluster::repo_path("examples/leaky_app.py");
    let app = format!("--from-file={}", app.display());
    node::kubectl_ok(["create", "configmap", "web-app", "-n", &ns, &app]).await?;
    let token = "--from-literal=token=gunicorn-e2e-token";
    node::kubectl_ok([
        "create",
        "secret",
        "generic",
        "forkscope-sidecar-token",
        "-n",
        &ns,
        token,
    ])
    .await?;
    node::apply(&ns, &cluster::repo_path("e2e/manifests/gunicorn.yaml")).await?;
    let pods = node::wait_available(&client, &ns, "gunicorn", node::POD_TIMEOUT).await?;
    let sidecar = node::sidecar(&pods[0], "gunicorn-e2e-token")?;
    wait_for_workers(&sidecar, ServerKind::Gunicorn, 2).await?;
    metrics_have_worker_pss(&sidecar, "gunicorn", 2).await?;
    // The workers serve at the pod's address.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let leak = http
        .get(format!("{}leak?n=3", node::pod_url(&pods[0], "http")?))
        .send()
        .await?;
    ensure!(leak.status().is_success(), "{leak:?}");
    Ok(())
}

#[tokio::test]
async fn a_profile_request_finds_the_leak_in_a_gunicorn_pod_made_profilable_by_one_line()
-> anyhow::Result<()> {
    let admin = crate::client_with_crd().await?;
    node::require_images(&admin, &[node::GUNICORN_IMAGE, node::SIDECAR_IMAGE]).await?;
    let ns = cluster::test_namespace(&admin, "gunicorn-profiled").await?;
    let app = cluster::repo_path("examples/leaky_app.py");
    let app = format!("--from-file={}", app.display());
    // The one line of docs/GUNICORN.md.
    let conf = "--from-literal=gunicorn.conf.py=from forkscope.gunicorn import *\n";
    node::kubectl_ok(["create", "configmap", "web-app", "-n", &ns, &app, conf]).await?;
    let token = "gunicorn-profiled-token";
    let literal = format!("--from-literal=token={token}");
    node::kubectl_ok([
        "create",
        "secret",
        "generic",
        "forkscope-sidecar-token",
        "-n",
        &ns,
        &literal,
    ])
    .await?;
    node::apply(
        &ns,
        &cluster::repo_path("e2e/manifests/gunicorn-profiled.yaml"),
    )
    .await?;
    let pods = node::wait_available(&admin, &ns, "gunicorn-profiled", node::POD_TIMEOUT).await?;
    let sidecar = node::sidecar(&pods[0], token)?;
    wait_for_workers(&sidecar, ServerKind::Gunicorn, 2).await?;

    // The operator as a process of the test, with the sidecar's static token; leaking traffic
    // to the pod while the request runs.
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token)?;
    let op = forkscope_e2e::fleet::Operator::start(
        &ns,
        &cluster::kubeconfig_path()?,
        dir.path().join("operator.log"),
        &[
            "--auth",
            "static",
            "--sidecar-token-file",
            &token_file.display().to_string(),
        ],
    )
    .await?;
    let url = format!("{}leak?n=2", node::pod_url(&pods[0], "http")?);
    let traffic = tokio::spawn(async move {
        let http = reqwest::Client::new();
        loop {
            let _ = http.get(&url).send().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let requests: kube::Api<ProfileRequest> = kube::Api::namespaced(admin.clone(), &ns);
    let status = crate::operator::apply_and_finish(
        &requests,
        dir.path(),
        "gunicorn-heap-diff",
        "selector:\n  matchLabels:\n    app: gunicorn-profiled\nduration: 5s\nworkers:\n  all: true\ntop: 10\n",
        || op.log(),
    )
    .await;
    traffic.abort();
    let status = status?;
    ensure!(
        status.phase == Some(Phase::Succeeded),
        "{status:#?}\n{}",
        op.log()
    );
    ensure!(
        status.pods.iter().map(|p| p.workers.len()).sum::<usize>() == 2,
        "both gunicorn workers profiled: {status:#?}"
    );
    ensure_leak_on_top(&status)?;
    Ok(())
}

/// A sidecar client error as an e2e error, inside `wait::until` probes.
fn tool(e: forkscope_sidecar::ClientError) -> forkscope_e2e::Error {
    forkscope_e2e::Error::Tool(format!("sidecar: {e}"))
}

/// What an in-cluster client does: read `KUBERNETES_SERVICE_HOST`/`PORT`, verify the apiserver
/// against the mounted CA, send the mounted ServiceAccount token. Printed: the HTTP status of
/// `GET /api/v1/namespaces/NS/pods` (403: the `default` ServiceAccount may not list pods) and
/// of `GET /version` (200: any authenticated user), and the reported version.
const IN_CLUSTER_CLIENT: &str = r#"
import json, os, ssl, sys, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
base = "https://%s:%s" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
context = ssl.create_default_context(cafile=sa + "ca.crt")
token = open(sa + "token").read().strip()
def get(path):
    request = urllib.request.Request(base + path, headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
pods, _ = get("/api/v1/namespaces/%s/pods" % open(sa + "namespace").read())
version, body = get("/version")
print(base, pods, version, json.loads(body)["gitVersion"])
"#;

#[tokio::test]
async fn pods_reach_the_apiserver_through_the_kubernetes_service() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    let ns = cluster::test_namespace(&client, "incluster").await?;
    let pods = node::run_example_app(&client, &ns).await?;
    let out = node::exec(
        &ns,
        pod_name(&pods[0])?,
        "app",
        &["python3.11", "-c", IN_CLUSTER_CLIENT],
    )
    .await?;
    assert_eq!(out.trim(), "https://10.0.0.1:443 403 200 v1.33.13");
    Ok(())
}

#[tokio::test]
async fn an_image_that_is_not_on_the_node_is_never_pulled() -> anyhow::Result<()> {
    // No registry is reachable, and none may be tried: the node's containerd sends every pull
    // to a closed port on 127.0.0.1 (e2e/controlplane.sh), so the pull fails there.
    let client = cluster::client().await?;
    let ns = cluster::test_namespace(&client, "pull").await?;
    let image = "--image=docker.io/library/busybox:1.36";
    node::kubectl_ok([
        "run",
        "pull",
        "-n",
        &ns,
        image,
        "--image-pull-policy=Always",
        "--restart=Never",
    ])
    .await?;
    // The kubelet reports the failed pull as an event with the runtime's error.
    let events = kube::Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns);
    let fields = kube::api::ListParams::default().fields("involvedObject.name=pull");
    let message = wait::until("the failed pull's event", node::POD_TIMEOUT, || async {
        let failed = events
            .list(&fields)
            .await?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("Failed"))
            .filter_map(|e| e.message)
            .find(|m| m.contains("busybox:1.36"));
        Ok(failed)
    })
    .await?;
    ensure!(message.contains("127.0.0.1:9"), "{message}");
    Ok(())
}
