//! Installing the `ProfileRequest` CRD on the control plane, the way the operator's tests need
//! it: server-side apply of the CRD generated from the Rust types, then wait for Established.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, CustomResourceExt};

use forkscope_operator::crd::{CRD_NAME, ProfileRequest};

use crate::Result;
use crate::wait::{DEFAULT_TIMEOUT, until};

/// Field manager the e2e helpers apply with.
pub const FIELD_MANAGER: &str = "forkscope-e2e";

/// Applies the `ProfileRequest` CRD (idempotent; safe from tests running in parallel) and
/// returns once the apiserver serves it.
///
/// # Errors
/// The apiserver's error, or a timeout when the CRD never becomes Established.
pub async fn install_profile_request_crd(client: &Client) -> Result<CustomResourceDefinition> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(ProfileRequest::crd()),
    )
    .await?;
    await_established(client, CRD_NAME).await
}

/// Waits until the CRD NAME has condition `Established=True`.
///
/// # Errors
/// The apiserver's error, or a timeout.
pub async fn await_established(client: &Client, name: &str) -> Result<CustomResourceDefinition> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    until(
        &format!("CRD {name} to be Established"),
        DEFAULT_TIMEOUT,
        || {
            let crds = crds.clone();
            async move {
                let crd = crds.get_opt(name).await?;
                Ok(crd.filter(is_established))
            }
        },
    )
    .await
}

/// Whether the CRD has condition `Established=True`.
pub fn is_established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}
