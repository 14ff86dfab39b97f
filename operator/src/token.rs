//! The bearer token the operator shows sidecars, in one of two modes (docs/OPERATOR.md):
//! - static: a file (a mounted Secret), re-read on every use so a rotated Secret takes effect;
//! - kubernetes: a short-lived token of the operator's own ServiceAccount with audience
//!   `forkscope-sidecar`, requested through the TokenRequest API and renewed before it expires.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::Mutex;

/// The audience sidecars accept in kubernetes mode; a token for it is useless to the apiserver
/// and to anything else that checks audiences.
pub const SIDECAR_AUDIENCE: &str = "forkscope-sidecar";

/// Lifetime asked for a ServiceAccount token (the apiserver's minimum is 10 minutes).
pub const TOKEN_SECONDS: i64 = 600;

/// Where the operator's sidecar token comes from.
pub enum TokenSource {
    /// A token file.
    Static(PathBuf),
    /// TokenRequests for a ServiceAccount.
    Kubernetes(Box<ServiceAccountTokens>),
}

impl TokenSource {
    /// The token to send now.
    ///
    /// # Errors
    /// An unreadable or empty token file, or a refused TokenRequest.
    pub async fn token(&self) -> anyhow::Result<String> {
        match self {
            TokenSource::Static(path) => {
                let raw = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| anyhow::anyhow!("token file {}: {e}", path.display()))?;
                let token = raw.trim();
                anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
                Ok(token.to_owned())
            }
            TokenSource::Kubernetes(sa) => sa.token().await,
        }
    }
}

/// Tokens of one ServiceAccount for the sidecar audience, cached until 80% of their life.
pub struct ServiceAccountTokens {
    api: Api<ServiceAccount>,
    name: String,
    cached: Mutex<Option<(String, Instant)>>,
}

impl ServiceAccountTokens {
    /// Tokens of ServiceAccount `name` of the namespace `api` is scoped to.
    pub fn new(api: Api<ServiceAccount>, name: impl Into<String>) -> Self {
        Self {
            api,
            name: name.into(),
            cached: Mutex::new(None),
        }
    }

    async fn token(&self) -> anyhow::Result<String> {
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![SIDECAR_AUDIENCE.to_owned()],
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let answer = self
            .api
            .create_token_request(&self.name, &PostParams::default(), &request)
            .await
            .map_err(|e| anyhow::anyhow!("TokenRequest for ServiceAccount {}: {e}", self.name))?;
        let status = answer
            .status
            .ok_or_else(|| anyhow::anyhow!("TokenRequest answered without a token"))?;
        // Renew at 80% of the lifetime the apiserver granted (it may shorten or extend it).
        let granted = status
            .expiration_timestamp
            .0
            .duration_since(k8s_openapi::jiff::Timestamp::now())
            .as_secs()
            .max(0);
        let renew_in = Duration::from_secs(u64::try_from(granted * 4 / 5).unwrap_or(0));
        *cached = Some((status.token.clone(), Instant::now() + renew_in));
        Ok(status.token)
    }
}
