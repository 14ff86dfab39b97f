//! The Helm chart on the real apiserver with the real helm: lint, a server-side dry run of
//! everything it renders, values refused by its schema, then install, upgrade and uninstall.
//! (Whether the operator it deploys runs and profiles is the whole-flow test's job on the real
//! node.)

use std::ffi::OsStr;

use anyhow::{Context, ensure};
use forkscope_e2e::cluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;

use crate::client_with_crd;

async fn helm<I, S>(args: I) -> anyhow::Result<std::process::Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let helm = std::env::var_os("FORKSCOPE_HELM")
        .context("FORKSCOPE_HELM: run through e2e/with-controlplane")?;
    Ok(cluster::run_tool(&helm, args).await?)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_chart_lints_dry_runs_installs_upgrades_and_uninstalls() -> anyhow::Result<()> {
    let admin = client_with_crd().await?;
    let ns = cluster::test_namespace(&admin, "chart").await?;
    let chart = cluster::repo_path("charts/forkscope").display().to_string();

    let lint = helm(["lint", &chart, "--strict"]).await?;
    ensure!(lint.status.success(), "helm lint: {}", text(&lint));

    // Everything the chart renders is accepted by the apiserver (schemas, RBAC rules).
    let rendered = helm(["template", "forkscope", &chart, "--namespace", &ns]).await?;
    ensure!(
        rendered.status.success(),
        "helm template: {}",
        text(&rendered)
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered.stdout)?;
    let dry = cluster::kubectl([
        "apply",
        "--dry-run=server",
        "-n",
        &ns,
        "-f",
        &file.display().to_string(),
    ])
    .await?;
    ensure!(
        dry.status.success(),
        "kubectl apply --dry-run=server: {}",
        text(&dry)
    );
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    ensure!(
        rendered.contains("grafana_dashboard"),
        "the dashboard ConfigMap is rendered"
    );
    ensure!(
        rendered.contains("prometheus.io/scrape"),
        "without the Prometheus operator's API, plain annotations: {rendered}"
    );
    ensure!(
        !rendered.contains("kind: ServiceMonitor"),
        "no ServiceMonitor without its API"
    );

    // Wrong values fail at install time, with the schema's words.
    for bad in [
        "operator.replicas=0",
        "sidecarAuth.mode=token",
        "metrics.port=70000",
        "operator.unknown=1",
    ] {
        let out = helm([
            "install",
            "bad",
            &chart,
            "--namespace",
            &ns,
            "--set",
            bad,
            "--dry-run",
        ])
        .await?;
        ensure!(!out.status.success(), "{bad} was accepted");
        ensure!(text(&out).contains("schema"), "{bad}: {}", text(&out));
    }
    let static_without_secret = helm([
        "install",
        "bad",
        &chart,
        "--namespace",
        &ns,
        "--set",
        "sidecarAuth.mode=static",
        "--dry-run",
    ])
    .await?;
    ensure!(
        !static_without_secret.status.success(),
        "static mode needs its Secret"
    );

    let install = helm(["install", "forkscope", &chart, "--namespace", &ns]).await?;
    ensure!(install.status.success(), "helm install: {}", text(&install));
    ensure!(
        text(&install).contains("kubectl apply -f examples/profilerequest.yaml"),
        "NOTES say what to do next: {}",
        text(&install)
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    let operator = deployments.get("forkscope-operator").await?;
    ensure!(
        operator.spec.and_then(|s| s.replicas) == Some(2),
        "two replicas by default"
    );
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let role_name = format!("forkscope-operator-{ns}");
    ensure!(
        roles.get_opt(&role_name).await?.is_some(),
        "the ClusterRole exists"
    );

    let upgrade = helm([
        "upgrade",
        "forkscope",
        &chart,
        "--namespace",
        &ns,
        "--set",
        "operator.replicas=1",
    ])
    .await?;
    ensure!(upgrade.status.success(), "helm upgrade: {}", text(&upgrade));
    let operator = deployments.get("forkscope-operator").await?;
    ensure!(
        operator.spec.and_then(|s| s.replicas) == Some(1),
        "upgraded to one replica"
    );

    let uninstall = helm(["uninstall", "forkscope", "--namespace", &ns, "--wait"]).await?;
    ensure!(
        uninstall.status.success(),
        "helm uninstall: {}",
        text(&uninstall)
    );
    ensure!(
        deployments.get_opt("forkscope-operator").await?.is_none(),
        "the Deployment is gone"
    );
    ensure!(
        roles.get_opt(&role_name).await?.is_none(),
        "the ClusterRole is gone"
    );
    Ok(())
}
