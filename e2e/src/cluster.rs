//! The control plane the tests run against: its kubeconfig (from `FORKSCOPE_E2E_KUBECONFIG`,
//! exported by `e2e/with-controlplane`), a kube-rs client for it, `kubectl` pointed at it, and
//! unique namespaces so tests running in parallel never see each other's objects.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{Error, Result};

/// Environment variable that names the control plane's kubeconfig.
pub const KUBECONFIG_ENV: &str = "FORKSCOPE_E2E_KUBECONFIG";

/// The kubeconfig path given the value of [`KUBECONFIG_ENV`] (pure, for testing).
///
/// # Errors
/// [`Error::NoControlPlane`] when the variable is unset or empty.
pub fn kubeconfig_path_from(value: Option<OsString>) -> Result<PathBuf> {
    match value {
        Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => Err(Error::NoControlPlane),
    }
}

/// The control plane's kubeconfig path.
///
/// # Errors
/// [`Error::NoControlPlane`] when the tests were not started through `e2e/with-controlplane`.
pub fn kubeconfig_path() -> Result<PathBuf> {
    kubeconfig_path_from(std::env::var_os(KUBECONFIG_ENV))
}

/// The kube-rs configuration of the control plane's admin user (client certificate in group
/// `system:masters`).
///
/// # Errors
/// [`Error::NoControlPlane`] without a control plane; [`Error::Kubeconfig`] when its
/// kubeconfig is unusable.
pub async fn admin_config() -> Result<Config> {
    let path = kubeconfig_path()?;
    let kubeconfig_error = |source| Error::Kubeconfig {
        path: path.clone(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(&path).map_err(kubeconfig_error)?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)
}

/// A kube-rs client for the control plane, authenticated as its admin user.
///
/// # Errors
/// As [`admin_config`].
pub async fn client() -> Result<Client> {
    Ok(Client::try_from(admin_config().await?)?)
}

/// A short-lived token (1 h) of the ServiceAccount `NAMESPACE/NAME`, created when missing, from
/// the TokenRequest API, for the apiserver's audience.
///
/// # Errors
/// The apiserver's error.
pub async fn service_account_token(admin: &Client, namespace: &str, name: &str) -> Result<String> {
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), namespace);
    if accounts.get_opt(name).await?.is_none() {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        accounts.create(&PostParams::default(), &account).await?;
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    Ok(accounts
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .map(|status| status.token)
        .unwrap_or_default())
}

/// A client authenticated as the ServiceAccount `NAMESPACE/NAME` (see
/// [`service_account_token`]), so tests can prove what an RBAC Role allows (e.g. the
/// operator's) instead of running everything as cluster-admin.
///
/// # Errors
/// The apiserver's error.
pub async fn service_account_client(admin: &Client, namespace: &str, name: &str) -> Result<Client> {
    let token = service_account_token(admin, namespace, name).await?;
    let mut config = admin_config().await?;
    config.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
        .expect("an AuthInfo holding only a token deserializes");
    Ok(Client::try_from(config)?)
}

/// Writes a kubeconfig for the ServiceAccount `NAMESPACE/NAME` (the control plane's server and
/// CA, the account's token) to `path`, for a program under test that should run with exactly
/// that account's rights.
///
/// # Errors
/// The apiserver's error, or an unreadable admin kubeconfig.
pub async fn service_account_kubeconfig(
    admin: &Client,
    namespace: &str,
    name: &str,
    path: &std::path::Path,
) -> Result<()> {
    let token = service_account_token(admin, namespace, name).await?;
    let admin_path = kubeconfig_path()?;
    let mut kubeconfig =
        Kubeconfig::read_from(&admin_path).map_err(|source| Error::Kubeconfig {
            path: admin_path.clone(),
            source,
        })?;
    for user in &mut kubeconfig.auth_infos {
        user.auth_info = serde_json::from_value(serde_json::json!({ "token": token }))
            .expect("an AuthInfo holding only a token deserializes");
    }
    let text = serde_yaml::to_string(&kubeconfig).expect("a kubeconfig serializes");
    std::fs::write(path, text).map_err(|source| Error::Spawn {
        program: format!("write {}", path.display()),
        source,
    })?;
    Ok(())
}

/// The `kubectl` the control-plane script chose (`FORKSCOPE_KUBECTL`), else the one on `PATH`.
pub fn kubectl_program() -> OsString {
    std::env::var_os("FORKSCOPE_KUBECTL").unwrap_or_else(|| "kubectl".into())
}

/// Runs PROGRAM ARGS with `KUBECONFIG` pointing at the control plane (for helm and the like)
/// and returns its output, whatever its exit status.
///
/// # Errors
/// [`Error::NoControlPlane`] without a control plane; [`Error::Spawn`] when it cannot run.
pub async fn run_tool<I, S>(program: &std::ffi::OsStr, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    tokio::process::Command::new(program)
        .args(args)
        .env("KUBECONFIG", kubeconfig_path()?)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::Spawn {
            program: program.to_string_lossy().into_owned(),
            source,
        })
}

/// Runs `kubectl ARGS` against the control plane and returns its output (whatever its exit
/// status; callers assert on it).
///
/// # Errors
/// [`Error::NoControlPlane`] without a control plane; [`Error::Spawn`] when kubectl cannot run.
pub async fn kubectl<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_tool(&kubectl_program(), args).await
}

/// Path of a file in the repository (the workspace root), e.g. `examples/profilerequest.yaml`.
pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the repository root")
        .join(relative)
}

/// Creates a namespace named `e2e-PREFIX-PID-N`, unique within this control plane, and returns
/// once its `default` ServiceAccount exists (ServiceAccount admission refuses pods before the
/// controller manager has made it).
///
/// Namespaces are left behind: the whole cluster is thrown away after the run.
///
/// # Errors
/// The apiserver's error when the namespace cannot be created; [`Error::Timeout`] when the
/// ServiceAccount does not appear.
pub async fn test_namespace(client: &Client, prefix: &str) -> Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("e2e-{prefix}");
    name.truncate(40);
    let name = format!("{}-{}-{n}", name.trim_end_matches('-'), std::process::id());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("forkscope.dev/e2e".to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), &name);
    crate::wait::until(
        &format!("ServiceAccount {name}/default"),
        crate::wait::DEFAULT_TIMEOUT,
        || async { Ok(accounts.get_opt("default").await?.map(|_| ())) },
    )
    .await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_variable_the_error_says_how_to_run_the_tests() {
        for value in [None, Some(OsString::new())] {
            let err = kubeconfig_path_from(value).expect_err("no control plane");
            assert!(matches!(err, Error::NoControlPlane));
            assert!(err.to_string().contains("e2e/with-controlplane"), "{err}");
        }
    }

    #[test]
    fn the_variable_names_the_kubeconfig() {
        let path = kubeconfig_path_from(Some("/tmp/cp/kubeconfig".into())).expect("set");
        assert_eq!(path, PathBuf::from("/tmp/cp/kubeconfig"));
    }

    #[test]
    fn repo_paths_resolve_from_the_workspace_root() {
        assert!(repo_path("examples/profilerequest.yaml").is_file());
    }
}
