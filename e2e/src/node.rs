//! The real node: pods that really run (containerd, runc, the CNI bridge) on the node that
//! `e2e/controlplane.sh start` brings up, with the images `scripts/images` built and the node
//! imported as `docker.io/local/NAME:dev`.
//!
//! The helpers apply manifests with the real kubectl, wait for Deployments to become available
//! through real readiness probes, and reach a pod's sidecar from the host at `podIP:port`
//! (the host routes the pod range through the node's bridge).
//!
//! ```no_run
//! # async fn demo() -> forkscope_e2e::Result<()> {
//! use forkscope_e2e::{cluster, node};
//! let client = cluster::client().await?;
//! let ns = cluster::test_namespace(&client, "demo").await?;
//! let pods = node::run_example_app(&client, &ns).await?; // examples/app.yaml, Ready
//! let sidecar = node::sidecar(&pods[0], &node::operator_token(&client).await?)?;
//! # Ok(()) }
//! ```

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::{Api, Client};

use crate::kubelet::{is_running_and_ready, named_port};
use crate::{Error, Result, cluster, wait};

/// Environment variable that names the real node (exported by `e2e/with-controlplane`).
pub const NODE_ENV: &str = "FORKSCOPE_E2E_NODE";

/// The forkscope-server image, as the node knows it.
pub const SERVER_IMAGE: &str = "docker.io/local/forkscope-server:dev";
/// The forkscope-sidecar image.
pub const SIDECAR_IMAGE: &str = "docker.io/local/forkscope-sidecar:dev";
/// The forkscope-operator image.
pub const OPERATOR_IMAGE: &str = "docker.io/local/forkscope-operator:dev";
/// Plain gunicorn on Python 3.11 (`e2e/images/gunicorn.Dockerfile`), for the tests only.
pub const GUNICORN_IMAGE: &str = "docker.io/local/gunicorn-e2e:dev";

/// The namespace and ServiceAccount the sidecars of `examples/app.yaml` accept tokens of: the
/// operator as `helm install forkscope charts/forkscope -n forkscope` runs it.
pub const OPERATOR_ACCOUNT: (&str, &str) = ("forkscope", "forkscope-operator");

/// A token the sidecars of `examples/app.yaml` accept: the operator's ServiceAccount's, for the
/// audience `forkscope-sidecar`, from the TokenRequest API (what the operator itself sends).
///
/// # Errors
/// The apiserver's error (e.g. the chart is not installed, so the account does not exist).
pub async fn operator_token(client: &Client) -> Result<String> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let (namespace, name) = OPERATOR_ACCOUNT;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["forkscope-sidecar".to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    Ok(Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(name, &kube::api::PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .unwrap_or_default())
}

/// How long pods may take to become Ready: image unpacking and probes on two busy cores.
pub const POD_TIMEOUT: Duration = Duration::from_secs(240);

/// The pod network of the node (`e2e/controlplane.sh`: the bridge `forkscope0`).
pub const POD_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 244, 0, 0), 24);

/// The real node's name.
///
/// # Errors
/// [`Error::NoControlPlane`] when the tests were not started through `e2e/with-controlplane`.
pub fn name() -> Result<String> {
    std::env::var(NODE_ENV)
        .ok()
        .filter(|n| !n.is_empty())
        .ok_or(Error::NoControlPlane)
}

/// Whether `ip` is in the node's pod network.
pub fn is_pod_ip(ip: Ipv4Addr) -> bool {
    let (network, bits) = POD_NETWORK;
    let mask = u32::MAX << (32 - u32::from(bits));
    u32::from(ip) & mask == u32::from(network)
}

/// Fails with a message that says how to build them when one of `images` is not on the node
/// (the kubelet reports the node's images in its status).
///
/// # Errors
/// [`Error::Missing`] naming the images that are not there; the apiserver's error.
pub async fn require_images(client: &Client, images: &[&str]) -> Result<()> {
    let node = Api::<Node>::all(client.clone()).get(&name()?).await?;
    let present: Vec<String> = node
        .status
        .and_then(|s| s.images)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|i| i.names.unwrap_or_default())
        .collect();
    let missing: Vec<&str> = images
        .iter()
        .copied()
        .filter(|image| !present.iter().any(|p| p == image))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Missing(format!(
        "images {missing:?} are not on the node: build them with scripts/images before \
         e2e/with-controlplane starts the node (scripts/test does)"
    )))
}

/// `kubectl apply -n NAMESPACE -f PATH`.
///
/// # Errors
/// [`Error::Tool`] with kubectl's output when it fails.
pub async fn apply(namespace: &str, path: &Path) -> Result<()> {
    let path = path.to_string_lossy();
    kubectl_ok(["apply", "-n", namespace, "-f", &path]).await?;
    Ok(())
}

/// Runs `kubectl ARGS` and returns its standard output.
///
/// # Errors
/// [`Error::Tool`] with kubectl's output when it exits non-zero.
pub async fn kubectl_ok<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let output = cluster::kubectl(&args).await?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    Err(Error::Tool(format!(
        "kubectl {}: {}; {}{}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )))
}

/// Waits until the Deployment `name` has all its replicas updated and available (their
/// readiness probes pass), then returns its pods that are running and ready, sorted by name.
///
/// # Errors
/// [`Error::Timeout`] (with the pods' states in the message) when `timeout` passes first; the
/// apiserver's error.
pub async fn wait_available(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Vec<Pod>> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let waited = wait::until(
        &format!("Deployment {namespace}/{name} available"),
        timeout,
        || async {
            let deployment = deployments.get(name).await?;
            let want = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1);
            let status = deployment.status.clone().unwrap_or_default();
            let done = status.observed_generation == deployment.metadata.generation
                && status.updated_replicas == Some(want)
                && status.available_replicas == Some(want)
                && status.replicas == Some(want);
            if !done {
                return Ok(None);
            }
            let selector = selector_of(&deployment);
            let mut ready: Vec<Pod> = pods
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .into_iter()
                .filter(|p| is_running_and_ready(p) && p.metadata.deletion_timestamp.is_none())
                .collect();
            ready.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            let want = usize::try_from(want).unwrap_or_default();
            Ok((ready.len() == want).then_some(ready))
        },
    )
    .await;
    match waited {
        Err(Error::Timeout { what, after }) => Err(Error::Timeout {
            what: format!(
                "{what}; pods now:\n{}",
                describe_pods(namespace).await.unwrap_or_default()
            ),
            after,
        }),
        other => other,
    }
}

fn selector_of(deployment: &Deployment) -> String {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `kubectl get pods -o wide` and the namespace's events, for failure messages.
async fn describe_pods(namespace: &str) -> Result<String> {
    let pods = kubectl_ok(["get", "pods", "-o", "wide", "-n", namespace]).await?;
    let events = kubectl_ok(["get", "events", "-n", namespace]).await?;
    Ok(format!("{pods}{events}"))
}

/// The pod's IP, checked to be on the node's pod network.
///
/// # Errors
/// [`Error::Missing`] when the pod has no IP in that network.
pub fn pod_ip(pod: &Pod) -> Result<Ipv4Addr> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .filter(|ip| is_pod_ip(*ip))
        .ok_or_else(|| {
            Error::Missing(format!(
                "pod IP in {POD_NETWORK:?} of {:?}",
                pod.metadata.name
            ))
        })
}

/// `http://podIP:PORT/` for the container port named `port`.
///
/// # Errors
/// [`Error::Missing`] when the pod has no IP or no such port.
pub fn pod_url(pod: &Pod, port: &str) -> Result<String> {
    let number = named_port(pod, port)
        .ok_or_else(|| Error::Missing(format!("port {port} of {:?}", pod.metadata.name)))?;
    Ok(format!("http://{}:{number}/", pod_ip(pod)?))
}

/// A client for the pod's sidecar (its port named `forkscope`), reached from the host.
///
/// # Errors
/// [`Error::Missing`] when the pod has no IP or no `forkscope` port.
pub fn sidecar(pod: &Pod, token: &str) -> Result<forkscope_sidecar::Client> {
    forkscope_sidecar::Client::new(&pod_url(pod, "forkscope")?, token)
        .map_err(|e| Error::Tool(format!("sidecar client: {e}")))
}

/// `kubectl exec -n NAMESPACE POD -c CONTAINER -- COMMAND...`: runs COMMAND in the container
/// (the images have no shell, so COMMAND is a program such as the server image's python3).
///
/// # Errors
/// [`Error::Tool`] when it exits non-zero.
pub async fn exec(namespace: &str, pod: &str, container: &str, command: &[&str]) -> Result<String> {
    let mut args = vec!["exec", "-n", namespace, pod, "-c", container, "--"];
    args.extend_from_slice(command);
    kubectl_ok(args).await
}

/// Runs the example application (`examples/app.yaml`: Deployment `web`, two replicas of
/// forkscope-server + sidecar, label `app: web`, sidecar port `forkscope`,
/// Kubernetes-native auth accepting [`OPERATOR_ACCOUNT`]) in `namespace` and returns its two
/// pods once they are Ready.
///
/// # Errors
/// [`Error::Missing`] when the images are not on the node; kubectl's or the apiserver's error;
/// [`Error::Timeout`] when the pods do not become Ready within [`POD_TIMEOUT`].
pub async fn run_example_app(client: &Client, namespace: &str) -> Result<Vec<Pod>> {
    require_images(client, &[SERVER_IMAGE, SIDECAR_IMAGE]).await?;
    apply(namespace, &cluster::repo_path("examples/app.yaml")).await?;
    wait_available(client, namespace, "web", POD_TIMEOUT).await
}
