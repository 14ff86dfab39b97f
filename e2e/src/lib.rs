//! Helpers for forkscope's end-to-end tests on a real single-node Kubernetes cluster (etcd,
//! kube-apiserver, controller manager, scheduler, kubelet, containerd, kube-proxy, built and
//! started by `e2e/controlplane.sh`).
//!
//! Run the tests through the wrapper, which starts a private control plane and exports
//! `FORKSCOPE_E2E_KUBECONFIG`:
//!
//! ```text
//! e2e/with-controlplane cargo test -p forkscope-e2e
//! ```
//!
//! Without that variable every test fails with a message saying so; none passes silently.
//!
//! # Layout
//! - [`cluster`]: the control plane's kubeconfig, a kube-rs client, `kubectl`, unique test
//!   namespaces.
//! - [`crds`]: install the `ProfileRequest` CRD and wait until it is Established.
//! - [`kubelet`]: the kubelet harness: test pods that "run" on 127.0.0.N where real processes
//!   listen, for tests that need pods in the API but no containers.
//! - [`node`]: pods that really run on the node, from the images `scripts/images` builds.
//! - [`fleet`]: real application pods (forkscope-server + sidecar in their own PID namespace)
//!   on the harness, and the real operator binary.
//! - [`wait`]: polling with a deadline (never a fixed sleep).

pub mod cluster;
pub mod crds;
pub mod fleet;
pub mod kubelet;
pub mod node;
pub mod wait;

/// Why an end-to-end helper failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tests were started without a control plane.
    #[error(
        "FORKSCOPE_E2E_KUBECONFIG is not set: these tests need a real control plane; run them \
         through e2e/with-controlplane, e.g. `e2e/with-controlplane cargo test -p forkscope-e2e`"
    )]
    NoControlPlane,
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Where the kubeconfig was read from.
        path: std::path::PathBuf,
        /// What went wrong.
        source: kube::config::KubeconfigError,
    },
    /// The apiserver answered with an error or could not be reached.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// A condition was not met before its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: std::time::Duration,
    },
    /// A tool (kubectl) ran and failed, or a client could not be made.
    #[error("{0}")]
    Tool(String),
    /// Something the test needs is not there (an image on the node, a pod IP, a port).
    #[error("missing: {0}")]
    Missing(String),
    /// `kubectl` could not be run.
    #[error("running {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Result with this crate's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
