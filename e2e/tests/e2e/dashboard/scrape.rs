//! A real Prometheus scraping the sidecars of one test namespace as docs/DASHBOARD.md tells
//! users to: Kubernetes pod discovery on the test apiserver, with its own ServiceAccount that
//! may only list and watch pods there. Discovery cannot tell harness pods from pods on the real
//! node (both are Pods with a container port named `forkscope` at the pod's IP), so the
//! dashboard test and the whole flow share it.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::Engine as _;
use forkscope_e2e::{cluster, node};
use kube::Client;
use kube::config::Kubeconfig;

use super::prometheus::Prometheus;

/// Prometheus's scrape interval in these tests, seconds: short, so a test waits little.
pub const SCRAPE_SECONDS: f64 = 1.0;

/// Now, in unix seconds (Prometheus's time).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// A Prometheus scraping the sidecars of the pods of `ns`; killed on drop.
pub struct Scraping {
    /// The running server (declared first: it is killed before its directory goes).
    pub prom: Prometheus,
    /// The namespace whose pods it discovers.
    pub ns: String,
    /// When it started (unix seconds), where the dashboard's time range begins.
    pub since: f64,
    _dir: tempfile::TempDir,
}

impl Scraping {
    /// Gives Prometheus its ServiceAccount and Role in `ns`, starts it, and returns once it
    /// is ready (its targets may not be discovered yet: see [`Prometheus::await_targets`]).
    ///
    /// # Errors
    /// The apiserver's or kubectl's error; a Prometheus that does not start.
    pub async fn start(admin: &Client, ns: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let rbac = dir.path().join("prometheus-rbac.yaml");
        std::fs::write(&rbac, prometheus_rbac(ns))?;
        node::apply(ns, &rbac).await?;
        let token = cluster::service_account_token(admin, ns, "prometheus").await?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token)?;
        let (api_server, ca) = api_server_and_ca(dir.path())?;
        let since = now();
        let config = scrape_config(ns, &api_server, &ca, &token_file);
        let prom = Prometheus::start(dir.path(), &config).await?;
        Ok(Self {
            prom,
            ns: ns.to_owned(),
            since,
            _dir: dir,
        })
    }
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
