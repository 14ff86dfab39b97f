//! The kubelet harness on the real apiserver: a test pod it marks running is listed as Running
//! and Ready by kube-rs, and a client that resolves the pod's IP and named port from the API
//! reaches the real process listening there.

use anyhow::{Context, ensure};
use forkscope_e2e::cluster;
use forkscope_e2e::kubelet::{Kubelet, TestPod, is_running_and_ready, loopback_ip, named_port};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::wait::{await_condition, conditions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use forkscope_e2e::wait::DEFAULT_TIMEOUT;

#[tokio::test]
async fn harness_pods_are_listed_running_and_ready_and_reachable() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    let ns = cluster::test_namespace(&client, "kubelet").await?;
    let kubelet = Kubelet::new(client.clone(), &ns);

    // A real process listening on the pod's own loopback address.
    let ip = loopback_ip();
    let listener = TcpListener::bind((ip, 0)).await.context("bind 127.0.0.N")?;
    let port = i32::from(listener.local_addr()?.port());

    let running = TestPod::new("web-0")
        .label("app", "web")
        .port("forkscope", port);
    let pending = TestPod::new("web-1")
        .label("app", "web")
        .port("forkscope", port);
    let other = TestPod::new("db-0").label("app", "db");
    let marked = kubelet.run(&running, ip).await?;
    ensure!(
        is_running_and_ready(&marked),
        "the patch response is running: {marked:?}"
    );
    kubelet.create(&pending).await?;
    kubelet.run(&other, loopback_ip()).await?;

    // kube-rs, as the operator will: list by label selector, keep the running and ready ones.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let listed = pods.list(&ListParams::default().labels("app=web")).await?;
    let mut names: Vec<String> = listed
        .items
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["web-0", "web-1"]);
    let ready: Vec<&Pod> = listed
        .items
        .iter()
        .filter(|p| is_running_and_ready(p))
        .collect();
    assert_eq!(ready.len(), 1, "only web-0 runs");
    let pod = ready[0];
    assert_eq!(pod.metadata.name.as_deref(), Some("web-0"));
    let status = pod.status.as_ref().context("status")?;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some(ip.to_string().as_str()));
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.clone()), None);

    // kube-rs's own runtime condition agrees.
    let awaited = tokio::time::timeout(
        DEFAULT_TIMEOUT,
        await_condition(pods.clone(), "web-0", conditions::is_pod_running()),
    )
    .await
    .context("is_pod_running timed out")??;
    ensure!(awaited.is_some());

    // Resolve podIP + the named port from the API object and talk to the real process there.
    let pod_ip: std::net::IpAddr = status.pod_ip.as_deref().context("podIP")?.parse()?;
    let port = named_port(pod, "forkscope").context("named port forkscope")?;
    let port = u16::try_from(port)?;
    let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect((pod_ip, port)));
    let (mut server_side, peer) = accepted?;
    let mut client_side = connected?;
    ensure!(peer.ip().is_loopback());
    client_side.write_all(b"ping").await?;
    let mut got = [0u8; 4];
    server_side.read_exact(&mut got).await?;
    assert_eq!(&got, b"ping");

    // Readiness can be taken away again, as a failing readiness probe would.
    let unready = kubelet.mark_not_ready("web-0").await?;
    ensure!(!is_running_and_ready(&unready));
    let listed = pods.list(&ListParams::default().labels("app=web")).await?;
    ensure!(listed.items.iter().all(|p| !is_running_and_ready(p)));
    Ok(())
}
