//! The control plane enforces authentication and RBAC as a real cluster does: a ServiceAccount
//! token (signed with the control plane's service-account key) authenticates, and it may do
//! only what a Role grants it.

use anyhow::ensure;
use forkscope_e2e::cluster;
use forkscope_e2e::wait::{DEFAULT_TIMEOUT, until};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

fn forbidden<T>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test]
async fn service_accounts_get_only_what_their_role_grants() -> anyhow::Result<()> {
    let admin = cluster::client().await?;
    let ns = cluster::test_namespace(&admin, "rbac").await?;
    let other = cluster::test_namespace(&admin, "rbac-other").await?;
    let reader = cluster::service_account_client(&admin, &ns, "pod-reader").await?;

    let pods = Api::<Pod>::namespaced(reader.clone(), &ns);
    let denied = pods.list(&ListParams::default()).await;
    ensure!(
        forbidden(denied),
        "a fresh service account must not list pods"
    );

    let role = Role {
        metadata: ObjectMeta {
            name: Some("pod-reader".into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["pods".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("pod-reader".into()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "pod-reader".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "pod-reader".into(),
            namespace: Some(ns.clone()),
            ..Subject::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &role)
        .await?;
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await?;

    // The authorizer learns about the binding through a watch: poll until it applies.
    until("the RoleBinding to take effect", DEFAULT_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            match pods.list(&ListParams::default()).await {
                Ok(list) => Ok(Some(list)),
                Err(kube::Error::Api(status)) if status.code == 403 => Ok(None),
                Err(other) => Err(other.into()),
            }
        }
    })
    .await?;

    // Still nothing beyond the role: no writes, no other namespace.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "nope"},
        "spec": {"containers": [{"name": "app", "image": "none"}]},
    }))?;
    ensure!(forbidden(pods.create(&PostParams::default(), &pod).await));
    let elsewhere = Api::<Pod>::namespaced(reader, &other);
    ensure!(forbidden(elsewhere.list(&ListParams::default()).await));
    Ok(())
}
