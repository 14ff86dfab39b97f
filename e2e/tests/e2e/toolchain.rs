//! The tools the control-plane script provides work against it: the apiserver reports its
//! stamped release (not v0.0.0), and kubectl, helm and prometheus run.

use anyhow::{Context, ensure};
use forkscope_e2e::cluster;
use serde_json::Value;

/// The path a tool's variable (exported by `e2e/with-controlplane`) names.
fn tool(var: &str) -> anyhow::Result<std::ffi::OsString> {
    std::env::var_os(var)
        .with_context(|| format!("{var} is not set: run the tests through e2e/with-controlplane"))
}

#[tokio::test]
async fn apiserver_reports_its_stamped_release_to_kubectl() -> anyhow::Result<()> {
    let output = cluster::kubectl(["version", "-o", "json"]).await?;
    ensure!(output.status.success(), "kubectl version: {output:?}");
    let version: Value = serde_json::from_slice(&output.stdout)?;
    let server = &version["serverVersion"];
    assert_eq!(server["gitVersion"], "v1.33.13", "{version}");
    assert_eq!(
        (server["major"].as_str(), server["minor"].as_str()),
        (Some("1"), Some("33"))
    );
    let client_minor: i64 = version["clientVersion"]["minor"]
        .as_str()
        .and_then(|m| m.trim_end_matches('+').parse().ok())
        .context("kubectl's minor version")?;
    ensure!(
        (32..=34).contains(&client_minor),
        "kubectl 1.{client_minor} is outside the ±1 skew"
    );
    Ok(())
}

#[tokio::test]
async fn helm_talks_to_the_control_plane() -> anyhow::Result<()> {
    let helm = tool("FORKSCOPE_HELM")?;
    let version = cluster::run_tool(&helm, ["version", "--short"]).await?;
    ensure!(version.status.success(), "helm version: {version:?}");
    ensure!(
        String::from_utf8_lossy(&version.stdout).starts_with("v3.22.0"),
        "{version:?}"
    );

    let ns = cluster::test_namespace(&cluster::client().await?, "helm").await?;
    let list = cluster::run_tool(&helm, ["list", "-n", &ns, "-o", "json"]).await?;
    ensure!(list.status.success(), "helm list: {list:?}");
    let releases: Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(releases, serde_json::json!([]));
    Ok(())
}

#[tokio::test]
async fn prometheus_is_installed() -> anyhow::Result<()> {
    let prometheus = tool("FORKSCOPE_PROMETHEUS")?;
    let version = cluster::run_tool(&prometheus, ["--version"]).await?;
    ensure!(
        version.status.success(),
        "prometheus --version: {version:?}"
    );
    let text = String::from_utf8_lossy(&version.stdout);
    ensure!(text.starts_with("prometheus, version 3."), "{text}");
    Ok(())
}
