//! The operator end to end: the real `forkscope-operator` binary reconciles ProfileRequests
//! applied with kubectl on the real apiserver, against real pods (forkscope-server serving the
//! leaky app with two workers, plus forkscope-sidecar, per pod, on the kubelet harness), and
//! writes the ranked diff into the status.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use forkscope_e2e::cluster;
use forkscope_e2e::fleet::{AppPod, Operator, SidecarAuth};
use forkscope_e2e::kubelet::Kubelet;
use forkscope_e2e::wait::until;
use forkscope_operator::crd::{Phase, PodPhase, ProfileRequest, ProfileRequestStatus};
use forkscope_sidecar::api::SessionState;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;

use crate::client_with_crd;

/// How long a request may take to finish here (the tracing window plus a busy machine).
const FINISH: Duration = Duration::from_secs(120);

/// `leaky.py:N`: the line the leaky app marks `# LEAK` (looked up, never hard-coded).
fn leak_site() -> String {
    let text =
        std::fs::read_to_string(forkscope_tests::apps_dir().join("leaky.py")).expect("leaky.py");
    let line = text
        .lines()
        .position(|l| l.trim_end().ends_with("# LEAK"))
        .expect("a line marked # LEAK")
        + 1;
    format!("leaky.py:{line}")
}

async fn kubectl_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = cluster::kubectl(args).await?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies a ProfileRequest given as YAML, the way a user does.
pub(crate) async fn apply(dir: &Path, ns: &str, name: &str, spec_yaml: &str) -> anyhow::Result<()> {
    let file = dir.join(format!("{name}.yaml"));
    let indented: String = spec_yaml.lines().map(|l| format!("  {l}\n")).collect();
    std::fs::write(
        &file,
        format!(
            "apiVersion: forkscope.dev/v1alpha1\nkind: ProfileRequest\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{indented}"
        ),
    )?;
    kubectl_ok(&["apply", "-f", &file.display().to_string()]).await?;
    Ok(())
}

async fn wait_phase(
    api: &Api<ProfileRequest>,
    name: &str,
    done: impl Fn(&ProfileRequest) -> bool,
) -> anyhow::Result<ProfileRequest> {
    Ok(until(&format!("ProfileRequest {name}"), FINISH, || async {
        let pr = api.get(name).await?;
        Ok(done(&pr).then_some(pr))
    })
    .await?)
}

/// Applies a request and waits until it finished; its status. `context` explains a timeout.
pub(crate) async fn apply_and_finish(
    api: &Api<ProfileRequest>,
    dir: &Path,
    name: &str,
    spec_yaml: &str,
    context: impl FnOnce() -> String,
) -> anyhow::Result<ProfileRequestStatus> {
    let ns = api.namespace().context("a namespaced Api")?.to_owned();
    apply(dir, &ns, name, spec_yaml).await?;
    let pr = wait_phase(api, name, finished)
        .await
        .with_context(context)?;
    Ok(pr.status.unwrap_or_default())
}

fn phase(pr: &ProfileRequest) -> Option<Phase> {
    pr.status.as_ref().and_then(|s| s.phase)
}

fn finished(pr: &ProfileRequest) -> bool {
    phase(pr).is_some_and(Phase::is_finished)
}

/// Every selected pod has a session (the tracing window is open).
fn all_running(pr: &ProfileRequest) -> bool {
    pr.status.as_ref().is_some_and(|s| {
        !s.pods.is_empty()
            && s.pods
                .iter()
                .all(|p| p.phase == PodPhase::Running && p.session_id.is_some())
    })
}

/// Waits until `n` pods of request `name` run a session; their names and session ids.
async fn running_sessions(
    api: &Api<ProfileRequest>,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let sessions = |pr: &ProfileRequest| -> Vec<(String, String)> {
        pr.status
            .iter()
            .flat_map(|s| s.pods.iter())
            .filter(|p| p.phase == PodPhase::Running)
            .filter_map(|p| Some((p.name.clone(), p.session_id.clone()?)))
            .collect()
    };
    let pr = wait_phase(api, name, |pr| sessions(pr).len() == n).await?;
    Ok(sessions(&pr))
}

async fn pods(
    kubelet: &Kubelet,
    names: &[&str],
    auth: &SidecarAuth,
) -> anyhow::Result<Vec<AppPod>> {
    let mut out = Vec::new();
    for name in names {
        out.push(
            AppPod::start(kubelet, name, &[("app", "web")], auth)
                .await
                .with_context(|| format!("starting pod {name}"))?,
        );
    }
    Ok(out)
}

fn context(pods: &[AppPod], op: &Operator) -> String {
    let mut text = format!("--- operator log\n{}\n", op.log());
    for p in pods {
        text.push_str(&format!("=== {}\n{}\n", p.name, p.logs()));
    }
    text
}

async fn token_for(
    admin: &kube::Client,
    ns: &str,
    account: &str,
    audience: &str,
) -> anyhow::Result<String> {
    cluster::service_account_token(admin, ns, account).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    Ok(accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?
        .status
        .context("a token")?
        .token)
}

/// The flow users run: the operator under its own ServiceAccount with only the repository's
/// RBAC, Kubernetes-native auth to the sidecars, `kubectl apply` of a HeapDiff over three pods
/// of two workers, `Succeeded` with the leak line as the top site in `kubectl get`, events in
/// `kubectl describe`, and tokens the sidecars must refuse.
#[tokio::test]
async fn kubectl_apply_profiles_a_fleet_under_the_operators_own_rbac() -> anyhow::Result<()> {
    let admin = client_with_crd().await?;
    let ns = cluster::test_namespace(&admin, "operator-flow").await?;
    let dir = tempfile::tempdir()?;

    // The operator's ServiceAccount and RBAC exactly as the Helm chart renders them for a
    // release in this namespace.
    let helm = std::env::var_os("FORKSCOPE_HELM")
        .context("FORKSCOPE_HELM: run through e2e/with-controlplane")?;
    let chart = cluster::repo_path("charts/forkscope");
    let rendered = cluster::run_tool(
        &helm,
        [
            "template".as_ref(),
            "forkscope".as_ref(),
            chart.as_os_str(),
            "--namespace".as_ref(),
            ns.as_ref(),
            "--show-only".as_ref(),
            "templates/serviceaccount.yaml".as_ref(),
            "--show-only".as_ref(),
            "templates/rbac.yaml".as_ref(),
        ] as [&std::ffi::OsStr; 9],
    )
    .await?;
    ensure!(
        rendered.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let rbac = String::from_utf8(rendered.stdout)?;
    let rbac_file = dir.path().join("rbac.yaml");
    std::fs::write(&rbac_file, rbac)?;
    kubectl_ok(&["apply", "-f", &rbac_file.display().to_string()]).await?;
    let kubeconfig = dir.path().join("operator.kubeconfig");
    cluster::service_account_kubeconfig(&admin, &ns, "forkscope-operator", &kubeconfig).await?;

    let operator_sa = format!("system:serviceaccount:{ns}:forkscope-operator");
    let auth = SidecarAuth::Kubernetes {
        allowed: vec![operator_sa.clone()],
        kubeconfig: cluster::kubeconfig_path()?,
    };
    let kubelet = Kubelet::new(admin.clone(), &ns);
    let pods = pods(&kubelet, &["web-a", "web-b", "web-c"], &auth).await?;
    let op = Operator::start(
        &ns,
        &kubeconfig,
        dir.path().join("operator.log"),
        &["--auth", "kubernetes"],
    )
    .await?;

    apply(
        dir.path(),
        &ns,
        "web-heap-diff",
        "selector:\n  matchLabels:\n    app: web\nkind: HeapDiff\nduration: 6s\nworkers:\n  all: true\ntop: 10\nparallelism: 3\n",
    )
    .await?;
    let api: Api<ProfileRequest> = Api::namespaced(admin.clone(), &ns);
    wait_phase(&api, "web-heap-diff", |pr| all_running(pr) || finished(pr))
        .await
        .with_context(|| context(&pods, &op))?;
    for pod in &pods {
        pod.leak(40).await;
    }
    let pr = wait_phase(&api, "web-heap-diff", finished)
        .await
        .with_context(|| context(&pods, &op))?;
    let status = pr.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(Phase::Succeeded),
        "{status:#?}\n{}",
        context(&pods, &op)
    );
    let site = leak_site();
    ensure!(
        status
            .top_site
            .as_deref()
            .is_some_and(|s| s.ends_with(&site)),
        "top site {:?}, want {site}",
        status.top_site
    );
    let top = &status.top_sites[0];
    ensure!(top.pods == 3 && top.size_diff_bytes > 0, "{top:?}");
    ensure!(
        status.selected_pods == Some(3) && status.succeeded_pods == Some(3),
        "{status:?}"
    );
    for pod in &status.pods {
        ensure!(
            pod.session_id.is_some() && pod.workers.len() == 2,
            "{pod:?}"
        );
        ensure!(
            pod.workers
                .iter()
                .all(|w| w.pss_after_bytes.is_some() && w.error.is_none()),
            "{pod:?}"
        );
    }

    let table = kubectl_ok(&["get", "profilerequests", "-n", &ns]).await?;
    ensure!(
        table.contains("Succeeded") && table.contains(&site),
        "kubectl get:\n{table}"
    );
    let described = kubectl_ok(&["describe", "profilerequest", "web-heap-diff", "-n", &ns]).await?;
    ensure!(
        described.contains("Started") && described.contains("Completed"),
        "kubectl describe:\n{described}"
    );

    let metrics = op.metrics().await?;
    ensure!(
        metrics.contains(r#"forkscope_operator_sidecar_calls_total{call="start",result="ok"} 3"#),
        "{metrics}"
    );
    ensure!(
        metrics.contains(r#"forkscope_operator_requests{phase="Succeeded"} 1"#),
        "{metrics}"
    );

    // What the sidecars refuse: a token for another audience (401), a valid token of a caller
    // that is not allowed (403), and no valid token at all (401).
    let wrong_audience = token_for(
        &admin,
        &ns,
        "forkscope-operator",
        "https://kubernetes.default.svc",
    )
    .await?;
    let intruder = token_for(&admin, &ns, "intruder", "forkscope-sidecar").await?;
    let good = token_for(&admin, &ns, "forkscope-operator", "forkscope-sidecar").await?;
    for (token, want) in [
        (wrong_audience.as_str(), 401),
        (intruder.as_str(), 403),
        ("s3cret", 401),
    ] {
        let err = pods[0]
            .client(token)
            .processes()
            .await
            .expect_err("refused");
        ensure!(
            err.status().map(|s| s.as_u16()) == Some(want),
            "want {want}: {err}"
        );
    }
    pods[0]
        .client(&good)
        .processes()
        .await
        .context("the operator's own token")?;
    Ok(())
}

/// Stacks of one chosen slot, then a heap diff of the top worker by PSS, with a static token.
#[tokio::test]
async fn stacks_and_worker_selection() -> anyhow::Result<()> {
    let admin = client_with_crd().await?;
    let ns = cluster::test_namespace(&admin, "operator-select").await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "e2e-static-token")?;
    let auth = SidecarAuth::Static("e2e-static-token".into());
    let kubelet = Kubelet::new(admin.clone(), &ns);
    let pods = pods(&kubelet, &["web-a", "web-b"], &auth).await?;
    let op = Operator::start(
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
    let api: Api<ProfileRequest> = Api::namespaced(admin.clone(), &ns);

    let status = apply_and_finish(
        &api,
        dir.path(),
        "stacks",
        "selector:\n  matchLabels:\n    app: web\nkind: Stacks\nworkers:\n  slots: [1]\n",
        || context(&pods, &op),
    )
    .await?;
    ensure!(
        status.phase == Some(Phase::Succeeded),
        "{status:#?}\n{}",
        context(&pods, &op)
    );
    for pod in &status.pods {
        let slots: Vec<i32> = pod.workers.iter().map(|w| w.slot).collect();
        ensure!(slots == [1], "{pod:?}");
    }
    // An idle worker's main thread has no Python frame: what matters is one thread per
    // profiled worker, counted across both pods.
    let threads: i32 = status.top_stacks.iter().map(|s| s.threads).sum();
    ensure!(threads >= 2, "{:?}", status.top_stacks);
    ensure!(
        status
            .top_stacks
            .iter()
            .all(|s| s.workers <= 2 && s.pods <= 2),
        "{:?}",
        status.top_stacks
    );

    let status = apply_and_finish(
        &api,
        dir.path(),
        "top-worker",
        "selector:\n  matchLabels:\n    app: web\nduration: 2s\nworkers:\n  topByPss: 1\nttlSecondsAfterFinished: 2\n",
        || context(&pods, &op),
    )
    .await?;
    ensure!(status.phase == Some(Phase::Succeeded), "{status:#?}");
    ensure!(
        status.pods.iter().all(|p| p.workers.len() == 1),
        "{:?}",
        status.pods
    );
    // ttlSecondsAfterFinished: the operator deletes the finished request.
    until("top-worker deleted after its TTL", FINISH, || async {
        Ok(api.get_opt("top-worker").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| context(&pods, &op))?;
    ensure!(
        api.get_opt("stacks").await?.is_some(),
        "a request without a TTL stays"
    );
    Ok(())
}

/// Failure drills on one fleet: a dead sidecar fails its pod alone; a second request on busy
/// workers is reported busy; a killed and restarted operator finishes a running request with
/// the same sessions; a request deleted mid-run stops the tracing it started.
#[tokio::test]
async fn failure_drills() -> anyhow::Result<()> {
    let admin = client_with_crd().await?;
    let ns = cluster::test_namespace(&admin, "operator-drills").await?;
    let dir = tempfile::tempdir()?;
    let token = "e2e-drill-token";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token)?;
    let auth = SidecarAuth::Static(token.into());
    let kubelet = Kubelet::new(admin.clone(), &ns);
    let mut pods = pods(&kubelet, &["web-a", "web-b", "web-c"], &auth).await?;
    let kubeconfig = cluster::kubeconfig_path()?;
    let log = dir.path().join("operator.log");
    let token_arg = token_file.display().to_string();
    let op_args = |identity: &'static str| {
        vec![
            "--auth",
            "static",
            "--sidecar-token-file",
            token_arg.as_str(),
            "--identity",
            identity,
            "--lease-seconds",
            "6",
            "--busy-wait",
            "3",
        ]
    };
    // Two replicas, as the chart runs them: one leads through the Lease, one stands by.
    let op = Operator::start(&ns, &kubeconfig, log.clone(), &op_args("op-1")).await?;
    let api: Api<ProfileRequest> = Api::namespaced(admin.clone(), &ns);
    let standby = Operator::start(
        &ns,
        &kubeconfig,
        dir.path().join("standby.log"),
        &op_args("op-2"),
    )
    .await?;

    // A sidecar that is down fails its pod, and only its pod.
    pods[2].kill().await;
    let status = apply_and_finish(
        &api,
        dir.path(),
        "partial",
        "selector:\n  matchLabels:\n    app: web\nduration: 1s\n",
        || context(&pods, &op),
    )
    .await?;
    ensure!(
        status.phase == Some(Phase::PartiallySucceeded),
        "{status:#?}"
    );
    let dead = status
        .pods
        .iter()
        .find(|p| p.name == "web-c")
        .context("web-c")?;
    ensure!(
        dead.phase == PodPhase::Failed && dead.reason.as_deref() == Some("SidecarUnreachable"),
        "{dead:?}"
    );
    let message = &status.conditions[0].message;
    ensure!(
        message.contains("web-c"),
        "the condition names the failed pod: {message}"
    );

    // A long request holds the workers of web-a and web-b.
    apply(
        dir.path(),
        &ns,
        "long",
        "selector:\n  matchLabels:\n    app: web\nduration: 25s\n",
    )
    .await?;
    let sessions = running_sessions(&api, "long", 2)
        .await
        .with_context(|| context(&pods, &op))?;

    // An overlapping request on the same workers is told they are busy.
    let status = apply_and_finish(
        &api,
        dir.path(),
        "second",
        "selector:\n  matchLabels:\n    app: web\nduration: 1s\n",
        || context(&pods, &op),
    )
    .await?;
    let busy: Vec<_> = status
        .pods
        .iter()
        .filter(|p| p.reason.as_deref() == Some("WorkerBusy"))
        .collect();
    ensure!(busy.len() == 2, "both live pods are busy: {status:#?}");

    // The standby never reconciled while the leader lived.
    let standby_metrics = standby.metrics().await?;
    ensure!(
        !standby_metrics.contains("forkscope_operator_reconciles_total{"),
        "the standby reconciled:\n{standby_metrics}\n{}",
        standby.log()
    );
    // The leader dies mid-run; the standby takes the Lease over and finishes "long" with the
    // same sessions.
    op.kill().await;
    let op = standby;
    let pr = wait_phase(&api, "long", finished)
        .await
        .with_context(|| context(&pods, &op))?;
    let status = pr.status.clone().unwrap_or_default();
    ensure!(
        status.phase == Some(Phase::PartiallySucceeded),
        "web-c is down: {status:#?}"
    );
    for (name, id) in &sessions {
        let pod = status
            .pods
            .iter()
            .find(|p| &p.name == name)
            .context("pod")?;
        ensure!(
            pod.phase == PodPhase::Succeeded && pod.session_id.as_ref() == Some(id),
            "{pod:?} vs {id:?}"
        );
    }
    for pod in &pods[..2] {
        let list = pod.client(token).profiles().await?;
        let owned = list
            .sessions
            .iter()
            .filter(|s| {
                s.request
                    .owner
                    .as_deref()
                    .is_some_and(|o| o.contains("/long/"))
            })
            .count();
        ensure!(
            owned == 1,
            "exactly one session of 'long' on {}: {list:?}",
            pod.name
        );
    }

    // Deleted mid-run: the sidecars' sessions are cancelled, so no worker keeps tracing.
    apply(
        dir.path(),
        &ns,
        "doomed",
        "selector:\n  matchLabels:\n    app: web\nduration: 10m\n",
    )
    .await?;
    let doomed = running_sessions(&api, "doomed", 2)
        .await
        .with_context(|| context(&pods, &op))?;
    kubectl_ok(&[
        "delete",
        "profilerequest",
        "doomed",
        "-n",
        &ns,
        "--wait=true",
    ])
    .await?;
    for (name, id) in &doomed {
        let pod = pods.iter().find(|p| &p.name == name).context("pod")?;
        let session = pod.client(token).profile(id).await?;
        ensure!(
            session.state == SessionState::Cancelled,
            "{name} still {:?}",
            session.state
        );
    }
    drop(op);
    Ok(())
}
