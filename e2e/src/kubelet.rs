//! The kubelet harness: tests that need pods but not containers (CRD, RBAC, the operator's
//! pod selection) play kubelet for their pods, which is faster than running images on the real
//! node. A test pod is a real Pod object whose status the harness patches to what a kubelet
//! would report: phase Running, the Ready conditions, and a pod IP on the test's own loopback
//! address 127.0.0.N. A real process (forkscope-server + sidecar, or any listener) binds that
//! address and the pod's container port, so whatever reads the Pod from the API (the operator)
//! reaches a real process at `podIP:port`.
//!
//! The cluster also has a real scheduler and kubelet (`e2e/controlplane.sh`). A harness pod
//! names a scheduler that does not exist ([`SCHEDULER_NAME`]), so it is never bound to the node
//! and the real kubelet never touches it (nor does the pod garbage collector, which only
//! collects pods bound to a node that is gone).
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> forkscope_e2e::Result<()> {
//! use forkscope_e2e::kubelet::{Kubelet, TestPod, loopback_ip};
//! let ip = loopback_ip();
//! let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
//! let port = i32::from(listener.local_addr().expect("bound").port());
//! let kubelet = Kubelet::new(client, "my-namespace");
//! kubelet.run(&TestPod::new("web-0").label("app", "web").port("forkscope", port), ip).await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::Result;

/// Name of the single container of a test pod.
pub const CONTAINER: &str = "app";

/// The scheduler a harness pod asks for. No such scheduler runs, so the pod stays unbound and
/// only the harness reports its status.
pub const SCHEDULER_NAME: &str = "forkscope-e2e-kubelet-harness";

/// A loopback address 127.0.0.N (N in 2..=254, never 127.0.0.1 where the apiserver listens),
/// different for each call until the range wraps around. Linux routes all of 127.0.0.0/8 to
/// the loopback interface, so a process can bind it without any setup.
pub fn loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 253;
    Ipv4Addr::new(127, 0, 0, n + 2)
}

/// The Pod a test wants to exist: a name, labels, and named container ports.
#[derive(Clone, Debug, Default)]
pub struct TestPod {
    name: String,
    labels: BTreeMap<String, String>,
    ports: Vec<(String, i32)>,
}

impl TestPod {
    /// A pod called `name` with one container and no labels or ports yet.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Adds the label `key=value`.
    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Adds a container port called `name` (e.g. the sidecar's `forkscope` port). The number is
    /// the port a real process listens on at the pod's 127.0.0.N address.
    #[must_use]
    pub fn port(mut self, name: &str, number: i32) -> Self {
        self.ports.push((name.to_owned(), number));
        self
    }

    /// The Pod object: no `nodeName`, and a scheduler that does not exist, so no scheduler or
    /// kubelet acts on it.
    pub fn to_pod(&self) -> Pod {
        let ports = self
            .ports
            .iter()
            .map(|(name, number)| ContainerPort {
                name: Some(name.clone()),
                container_port: *number,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            })
            .collect::<Vec<_>>();
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: CONTAINER.to_owned(),
                    image: Some("forkscope-e2e/no-image:never-pulled".to_owned()),
                    ports: (!ports.is_empty()).then_some(ports),
                    ..Container::default()
                }],
                scheduler_name: Some(SCHEDULER_NAME.to_owned()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }
}

/// Plays kubelet for the test pods of one namespace.
#[derive(Clone)]
pub struct Kubelet {
    pods: Api<Pod>,
}

impl Kubelet {
    /// A harness for the pods of `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
        }
    }

    /// Creates the Pod object; it stays `Pending` until [`Kubelet::mark_running`].
    ///
    /// # Errors
    /// The apiserver's error.
    pub async fn create(&self, pod: &TestPod) -> Result<Pod> {
        Ok(self
            .pods
            .create(&PostParams::default(), &pod.to_pod())
            .await?)
    }

    /// Reports the pod as a kubelet would once its containers run and pass readiness: phase
    /// Running, conditions PodScheduled/Initialized/ContainersReady/Ready True, `podIP` (and
    /// `hostIP`) = `ip`, the container running and ready.
    ///
    /// # Errors
    /// The apiserver's error (e.g. no such pod).
    pub async fn mark_running(&self, name: &str, ip: Ipv4Addr) -> Result<Pod> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let condition =
            |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now});
        let status = json!({
            "status": {
                "phase": "Running",
                "conditions": [
                    condition("PodScheduled"),
                    condition("Initialized"),
                    condition("ContainersReady"),
                    condition("Ready"),
                ],
                "hostIP": ip.to_string(),
                "hostIPs": [{"ip": ip.to_string()}],
                "podIP": ip.to_string(),
                "podIPs": [{"ip": ip.to_string()}],
                "startTime": now,
                "containerStatuses": [{
                    "name": CONTAINER,
                    "image": "forkscope-e2e/no-image:never-pulled",
                    "imageID": "",
                    "ready": true,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }],
            }
        });
        self.patch_status(name, status).await
    }

    /// Reports the pod as running but failing readiness (Ready and ContainersReady False).
    ///
    /// # Errors
    /// The apiserver's error.
    pub async fn mark_not_ready(&self, name: &str) -> Result<Pod> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let mut pod = self.pods.get_status(name).await?;
        let status = pod.status.get_or_insert_with(Default::default);
        for condition in status.conditions.iter_mut().flatten() {
            if condition.type_ == "Ready" || condition.type_ == "ContainersReady" {
                condition.status = "False".to_owned();
                condition.last_transition_time = Some(now.clone());
            }
        }
        for container in status.container_statuses.iter_mut().flatten() {
            container.ready = false;
        }
        let status = json!({"status": {
            "conditions": status.conditions,
            "containerStatuses": status.container_statuses,
        }});
        self.patch_status(name, status).await
    }

    /// Creates the pod and marks it running and ready at `ip` (see [`Kubelet::mark_running`]).
    ///
    /// # Errors
    /// The apiserver's error.
    pub async fn run(&self, pod: &TestPod, ip: Ipv4Addr) -> Result<Pod> {
        self.create(pod).await?;
        self.mark_running(&pod.name, ip).await
    }

    async fn patch_status(&self, name: &str, status: serde_json::Value) -> Result<Pod> {
        Ok(self
            .pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await?)
    }
}

/// Whether a pod is what controllers call ready to serve: phase Running and condition
/// `Ready=True`.
pub fn is_running_and_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The number of the container port called `name`, as a client resolving a named port
/// (e.g. `sidecarPort: forkscope`) would find it.
pub fn named_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_skip_the_apiserver_address_and_stay_in_range() {
        for _ in 0..600 {
            let ip = loopback_ip();
            assert!(ip.is_loopback());
            assert_ne!(ip, Ipv4Addr::new(127, 0, 0, 1));
            assert_ne!(ip.octets()[3], 255);
        }
    }

    #[test]
    fn test_pods_have_no_node_and_carry_their_named_ports() {
        let pod = TestPod::new("web-0")
            .label("app", "web")
            .port("forkscope", 9123)
            .to_pod();
        let spec = pod.spec.as_ref().expect("has a spec");
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.scheduler_name.as_deref(), Some(SCHEDULER_NAME));
        assert_eq!(named_port(&pod, "forkscope"), Some(9123));
        assert_eq!(named_port(&pod, "http"), None);
        assert!(!is_running_and_ready(&pod));
    }
}
