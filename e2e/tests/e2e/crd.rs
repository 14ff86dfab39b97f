//! The `ProfileRequest` CRD on the apiserver: it installs, the README's example applies and
//! lists with its columns, bad specs are rejected with the schema's messages, and status is
//! written only through the status subresource.

use anyhow::{Context, ensure};
use forkscope_e2e::{cluster, crds};
use forkscope_operator::crd::{
    CRD_NAME, Phase, ProfileKind, ProfileRequest, ProfileRequestStatus, WorkerSelection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, Resource};
use serde_json::{Value, json};

use crate::client_with_crd;

/// A ProfileRequest as raw JSON, so that tests can send what the Rust types cannot express.
fn raw_request(name: &str, spec: Value) -> DynamicObject {
    let resource = ApiResource::erase::<ProfileRequest>(&());
    let mut object = DynamicObject::new(name, &resource);
    object.data = json!({ "spec": spec });
    object
}

fn raw_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<ProfileRequest>(&()),
    )
}

/// The apiserver's message when it refused a request, or an error when it accepted it.
fn rejection<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> anyhow::Result<(u16, String)> {
    match result {
        Err(kube::Error::Api(status)) => Ok((status.code, status.message)),
        Err(other) => Err(other).context("expected the apiserver to refuse the request"),
        Ok(accepted) => anyhow::bail!("the apiserver accepted it: {accepted:?}"),
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ensure_success(what: &str, output: &std::process::Output) -> anyhow::Result<()> {
    ensure!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn committed_crd_installs_with_kubectl_and_becomes_established() -> anyhow::Result<()> {
    let client = cluster::client().await?;
    let yaml = cluster::repo_path("crds/profilerequests.forkscope.dev.yaml");
    // Server-side apply, as recommended for CRDs: create-or-update in one request, so it cannot
    // race with the other tests installing the same CRD (client-side apply does GET, then POST).
    let applied = cluster::kubectl([
        "apply".as_ref(),
        "--server-side".as_ref(),
        "--force-conflicts".as_ref(),
        "-f".as_ref(),
        yaml.as_os_str(),
    ])
    .await?;
    ensure_success("kubectl apply --server-side -f crds/", &applied)?;

    let crd = crds::await_established(&client, CRD_NAME).await?;
    ensure!(
        crd.spec
            .versions
            .iter()
            .any(|v| v.name == "v1alpha1" && v.served && v.storage)
    );

    let resources = cluster::kubectl(["api-resources", "--api-group", "forkscope.dev"]).await?;
    ensure_success("kubectl api-resources", &resources)?;
    let line = stdout(&resources);
    let row = line
        .lines()
        .find(|l| l.starts_with("profilerequests"))
        .context("profilerequests is not listed")?;
    let columns: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        columns
            == [
                "profilerequests",
                "profreq",
                "forkscope.dev/v1alpha1",
                "true",
                "ProfileRequest"
            ],
        "unexpected api-resources row: {row}"
    );
    Ok(())
}

#[tokio::test]
async fn example_manifest_applies_and_lists_with_its_columns() -> anyhow::Result<()> {
    let client = client_with_crd().await?;
    let ns = cluster::test_namespace(&client, "example").await?;
    let example = cluster::repo_path("examples/profilerequest.yaml");

    let applied = cluster::kubectl([
        "apply".as_ref(),
        "-n".as_ref(),
        ns.as_ref(),
        "-f".as_ref(),
        example.as_os_str(),
    ])
    .await?;
    ensure_success("kubectl apply -f examples/profilerequest.yaml", &applied)?;
    ensure!(stdout(&applied).contains("profilerequest.forkscope.dev/web-heap-diff created"));

    // The typed API reads back what the README promises.
    let requests = Api::<ProfileRequest>::namespaced(client.clone(), &ns);
    let request = requests.get("web-heap-diff").await?;
    assert_eq!(request.spec.kind, ProfileKind::HeapDiff);
    assert_eq!(request.spec.duration, "30s");
    assert_eq!(request.spec.workers.top_by_pss, Some(2));
    assert_eq!(
        request.spec.sidecar_port,
        IntOrString::String("forkscope".into())
    );
    assert_eq!(request.status, None);

    let listed = cluster::kubectl(["get", "profilerequests", "-n", &ns]).await?;
    ensure_success("kubectl get profilerequests", &listed)?;
    let text = stdout(&listed);
    let header: Vec<&str> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "PODS", "TOP", "SITE", "AGE"],
        "{text}"
    );

    // The columns show the status once the operator (here: the test) writes it.
    let status = json!({"status": {
        "phase": "Running",
        "selectedPods": 3,
        "topSite": "app/cache.py:42 +1.5MiB",
    }});
    requests
        .patch_status(
            "web-heap-diff",
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await?;
    let listed =
        cluster::kubectl(["get", "profreq", "web-heap-diff", "-n", &ns, "--no-headers"]).await?;
    ensure_success("kubectl get profreq", &listed)?;
    let row = stdout(&listed);
    let cells: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        cells.len() == 6
            && cells[..5]
                == [
                    "web-heap-diff",
                    "Running",
                    "3",
                    "app/cache.py:42",
                    "+1.5MiB"
                ],
        "unexpected row: {row}"
    );

    let wide = cluster::kubectl(["get", "profreq", "-n", &ns, "-o", "wide"]).await?;
    ensure_success("kubectl get -o wide", &wide)?;
    ensure!(stdout(&wide).lines().next().unwrap_or("").contains("KIND"));
    ensure!(stdout(&wide).contains("HeapDiff"));
    Ok(())
}

#[tokio::test]
async fn apiserver_applies_the_schema_defaults() -> anyhow::Result<()> {
    let client = client_with_crd().await?;
    let ns = cluster::test_namespace(&client, "defaults").await?;
    let created = raw_api(&client, &ns)
        .create(
            &PostParams::default(),
            &raw_request(
                "minimal",
                json!({"selector": {"matchLabels": {"app": "web"}}}),
            ),
        )
        .await?;
    let request: ProfileRequest = serde_json::from_value(serde_json::to_value(created)?)?;
    assert_eq!(
        request.spec.sidecar_port,
        IntOrString::String("forkscope".into())
    );
    assert_eq!(request.spec.kind, ProfileKind::HeapDiff);
    assert_eq!(request.spec.duration, "30s");
    assert_eq!(request.spec.workers, WorkerSelection::all());
    assert_eq!(
        (
            request.spec.frames,
            request.spec.top,
            request.spec.parallelism
        ),
        (1, 20, 5)
    );
    Ok(())
}

#[tokio::test]
async fn invalid_specs_are_rejected_with_the_schema_message() -> anyhow::Result<()> {
    let client = client_with_crd().await?;
    let ns = cluster::test_namespace(&client, "invalid").await?;
    let api = raw_api(&client, &ns);
    let web = json!({"matchLabels": {"app": "web"}});

    // (case, spec, what the apiserver's message must contain)
    let cases = [
        (
            "no selector",
            json!({"kind": "HeapDiff"}),
            "spec.selector: Required value",
        ),
        (
            "empty selector",
            json!({"selector": {}}),
            "selector must not be empty: set matchLabels or matchExpressions",
        ),
        (
            "empty matchLabels",
            json!({"selector": {"matchLabels": {}}}),
            "selector must not be empty",
        ),
        (
            "unknown kind",
            json!({"selector": web, "kind": "Memory"}),
            r#"spec.kind: Unsupported value: "Memory": supported values: "HeapDiff", "Stacks""#,
        ),
        (
            "duration without unit",
            json!({"selector": web, "duration": "30"}),
            "duration must be a duration between 1s and 1h",
        ),
        (
            "duration in words",
            json!({"selector": web, "duration": "2 minutes"}),
            "duration must be a duration between 1s and 1h",
        ),
        (
            "duration too long",
            json!({"selector": web, "duration": "2h"}),
            "duration must be a duration between 1s and 1h",
        ),
        (
            "duration too short",
            json!({"selector": web, "duration": "500ms"}),
            "duration must be a duration between 1s and 1h",
        ),
        (
            "zero frames",
            json!({"selector": web, "frames": 0}),
            "spec.frames in body should be greater than or equal to 1",
        ),
        (
            "too many frames",
            json!({"selector": web, "frames": 101}),
            "spec.frames in body should be less than or equal to 100",
        ),
        (
            "zero top",
            json!({"selector": web, "top": 0}),
            "spec.top in body should be greater than or equal to 1",
        ),
        (
            "too much parallelism",
            json!({"selector": web, "parallelism": 101}),
            "spec.parallelism in body should be less than or equal to 100",
        ),
        (
            "negative ttl",
            json!({"selector": web, "ttlSecondsAfterFinished": -1}),
            "spec.ttlSecondsAfterFinished in body should be greater than or equal to 0",
        ),
        (
            "two worker modes",
            json!({"selector": web, "workers": {"all": true, "topByPss": 2}}),
            "workers: set exactly one of all, topByPss or slots",
        ),
        (
            "no worker mode",
            json!({"selector": web, "workers": {}}),
            "workers: set exactly one of all, topByPss or slots",
        ),
        (
            "all: false",
            json!({"selector": web, "workers": {"all": false}}),
            "workers.all can only be true",
        ),
        (
            "zero topByPss",
            json!({"selector": web, "workers": {"topByPss": 0}}),
            "spec.workers.topByPss in body should be greater than or equal to 1",
        ),
        (
            "no slots",
            json!({"selector": web, "workers": {"slots": []}}),
            "spec.workers.slots in body should have at least 1 items",
        ),
        (
            "duplicate slots",
            json!({"selector": web, "workers": {"slots": [1, 1]}}),
            "spec.workers.slots[1]: Duplicate value: 1",
        ),
        (
            "negative slot",
            json!({"selector": web, "workers": {"slots": [-1]}}),
            "spec.workers.slots[0] in body should be greater than or equal to 0",
        ),
        (
            "port zero",
            json!({"selector": web, "sidecarPort": 0}),
            "sidecarPort must be a port number 1-65535 or a port name",
        ),
        (
            "port too high",
            json!({"selector": web, "sidecarPort": 65536}),
            "sidecarPort must be a port number 1-65535 or a port name",
        ),
        (
            "port name with capitals",
            json!({"selector": web, "sidecarPort": "Forkscope"}),
            "sidecarPort must be a port number 1-65535 or a port name",
        ),
        (
            "port name too long",
            json!({"selector": web, "sidecarPort": "forkscope-sidecar"}),
            "sidecarPort must be a port number 1-65535 or a port name",
        ),
    ];

    let mut failures = Vec::new();
    for (i, (case, spec, expected)) in cases.iter().enumerate() {
        let result = api
            .create(
                &PostParams::default(),
                &raw_request(&format!("bad-{i}"), spec.clone()),
            )
            .await;
        match rejection(result) {
            Ok((422, message)) if message.contains(expected) => {}
            Ok((code, message)) => failures.push(format!(
                "{case}: got {code} {message:?}, want 422 containing {expected:?}"
            )),
            Err(err) => failures.push(format!("{case}: {err:#}")),
        }
    }
    ensure!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn spec_is_immutable_after_creation() -> anyhow::Result<()> {
    let client = client_with_crd().await?;
    let ns = cluster::test_namespace(&client, "immutable").await?;
    let api = raw_api(&client, &ns);
    api.create(
        &PostParams::default(),
        &raw_request(
            "fixed",
            json!({"selector": {"matchLabels": {"app": "web"}}}),
        ),
    )
    .await?;
    let changed = api
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"duration": "5m"}})),
        )
        .await;
    let (code, message) = rejection(changed)?;
    assert_eq!(code, 422);
    assert!(
        message.contains("spec is immutable: create a new ProfileRequest instead"),
        "{message}"
    );

    // Metadata stays editable (labels, annotations, finalizers).
    api.patch(
        "fixed",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"team": "web"}}})),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn status_is_written_only_through_the_status_subresource() -> anyhow::Result<()> {
    let client = client_with_crd().await?;
    let ns = cluster::test_namespace(&client, "status").await?;
    let requests = Api::<ProfileRequest>::namespaced(client.clone(), &ns);

    let mut request = ProfileRequest::new(
        "status-demo",
        serde_json::from_value(json!({"selector": {"matchLabels": {"app": "web"}}}))?,
    );
    let forged = ProfileRequestStatus {
        phase: Some(Phase::Succeeded),
        selected_pods: Some(7),
        ..ProfileRequestStatus::default()
    };
    // A status sent with the object on create is dropped...
    request.status = Some(forged.clone());
    let created = requests.create(&PostParams::default(), &request).await?;
    assert_eq!(created.status, None, "create must ignore status");

    // ...and so is one sent through the main resource, by replace or by patch.
    let mut replaced = created.clone();
    replaced.status = Some(forged.clone());
    let replaced = requests
        .replace("status-demo", &PostParams::default(), &replaced)
        .await?;
    assert_eq!(replaced.status, None, "replace must ignore status");
    let patched = requests
        .patch(
            "status-demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await?;
    assert_eq!(
        patched.status, None,
        "patch of the main resource must ignore status"
    );

    // The status subresource writes status, and only status.
    let written = requests
        .patch_status(
            "status-demo",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "spec": {"duration": "9m"},
                "status": {"phase": "Running", "observedGeneration": created.meta().generation},
            })),
        )
        .await?;
    let status = written.status.context("status was written")?;
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(status.observed_generation, created.meta().generation);
    assert_eq!(
        written.spec.duration, "30s",
        "the status subresource must ignore spec"
    );

    // The status schema is enforced as well.
    let bad_phase = requests
        .patch_status(
            "status-demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Done"}})),
        )
        .await;
    let (code, message) = rejection(bad_phase)?;
    assert_eq!(code, 422);
    assert!(
        message.contains(r#"status.phase: Unsupported value: "Done""#),
        "{message}"
    );
    Ok(())
}
