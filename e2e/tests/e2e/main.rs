//! forkscope on a real Kubernetes control plane (etcd + kube-apiserver v1.33, TLS, client
//! certificates, RBAC). Run through the wrapper, which starts and stops the control plane:
//!
//! ```text
//! e2e/with-controlplane cargo test -p forkscope-e2e
//! ```
//!
//! Without it every test here fails with a message saying so.

mod chart;
mod crd;
mod dashboard;
mod kubelet_harness;
mod node_app;
mod operator;
mod rbac;
mod toolchain;

use forkscope_e2e::{cluster, crds};
use kube::Client;

/// A client for the control plane, with the `ProfileRequest` CRD installed and served.
async fn client_with_crd() -> anyhow::Result<Client> {
    let client = cluster::client().await?;
    crds::install_profile_request_crd(&client).await?;
    Ok(client)
}
