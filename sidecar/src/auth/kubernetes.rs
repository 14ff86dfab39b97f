//! Kubernetes mode: the caller sends a ServiceAccount token it requested with audience
//! `forkscope-sidecar` (TokenRequest API). The sidecar verifies it offline against the public
//! keys of the cluster's service-account issuer (OIDC discovery + JWKS, which every
//! ServiceAccount may read by default), checks issuer, audience and expiry, and accepts only the
//! allowed subjects (by default the operator's ServiceAccount).
//!
//! Offline verification needs no RBAC binding per app namespace (TokenReview would need
//! `system:auth-delegator` for every sidecar's ServiceAccount), costs no apiserver call per
//! request, and keeps working for cached keys while the apiserver is briefly away. The keys are
//! cached and refetched every [`KEYS_MAX_AGE`], or sooner when a token names an unknown key id
//! (at most once per [`UNKNOWN_KID_REFETCH`], so garbage tokens cannot hammer the apiserver).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::Denied;

/// Keys older than this are refetched.
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(600);

/// An unknown key id refetches the keys at most this often.
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(30);

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 30;

/// Only asymmetric algorithms: an issuer's public key can never be used as an HMAC secret.
const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::PS256,
];

/// The issuer and its public keys.
pub struct IssuerKeys {
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// The issuer's keys.
    pub keys: JwkSet,
}

/// A future of the key source (boxed so the trait is object safe).
pub type KeysFuture<'a> = Pin<Box<dyn Future<Output = Result<IssuerKeys, String>> + Send + 'a>>;

/// Where the issuer's keys come from: the apiserver ([`ApiServerKeys`]) or a test's fixture.
pub trait KeySource: Send + Sync {
    /// Fetches the issuer and its current keys.
    fn fetch(&self) -> KeysFuture<'_>;
}

struct Cached {
    issuer: String,
    keys: HashMap<String, DecodingKey>,
    fetched: Instant,
}

/// Verifies ServiceAccount tokens.
pub struct KubernetesAuth {
    audience: String,
    allowed: Vec<String>,
    source: Arc<dyn KeySource>,
    cached: Mutex<Option<Cached>>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

impl KubernetesAuth {
    /// Accepts tokens for `audience` whose subject is in `allowed`.
    pub fn new(audience: String, allowed: Vec<String>, source: Arc<dyn KeySource>) -> Self {
        Self {
            audience,
            allowed,
            source,
            cached: Mutex::new(None),
        }
    }

    /// The issuer and the key for `kid`, refetching when stale or unknown.
    async fn key(&self, kid: &str) -> Option<(String, DecodingKey)> {
        let mut cached = self.cached.lock().await;
        let lookup = |c: &Cached| c.keys.get(kid).map(|k| (c.issuer.clone(), k.clone()));
        let refetch = match cached.as_ref() {
            None => true,
            Some(c) if c.fetched.elapsed() > KEYS_MAX_AGE => true,
            Some(c) => lookup(c).is_none() && c.fetched.elapsed() > UNKNOWN_KID_REFETCH,
        };
        if refetch {
            match self.source.fetch().await {
                Ok(fresh) => {
                    let keys = fresh
                        .keys
                        .keys
                        .iter()
                        .filter_map(|jwk| {
                            let kid = jwk.common.key_id.clone()?;
                            DecodingKey::from_jwk(jwk).ok().map(|k| (kid, k))
                        })
                        .collect();
                    *cached = Some(Cached {
                        issuer: fresh.issuer,
                        keys,
                        fetched: Instant::now(),
                    });
                }
                // Keep verifying with the keys we have; try again on a later request.
                Err(e) => tracing::warn!("fetching the service-account issuer keys: {e}"),
            }
        }
        cached.as_ref().and_then(lookup)
    }

    /// The token's subject when it is valid and allowed.
    pub async fn verify(&self, token: &[u8]) -> Result<String, Denied> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::Unauthenticated)?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(Denied::Unauthenticated);
        }
        let kid = header.kid.ok_or(Denied::Unauthenticated)?;
        let (issuer, key) = self.key(&kid).await.ok_or(Denied::Unauthenticated)?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.set_issuer(&[&issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|_| Denied::Unauthenticated)?;
        let subject = data.claims.sub;
        if self.allowed.iter().any(|a| a == &subject) {
            Ok(subject)
        } else {
            Err(Denied::Forbidden(subject))
        }
    }
}

/// The apiserver's service-account issuer: `/.well-known/openid-configuration` for the issuer,
/// `/openid/v1/jwks` for the keys, read with the sidecar's own in-cluster identity (or
/// `KUBECONFIG` outside a cluster).
pub struct ApiServerKeys {
    client: kube::Client,
}

impl ApiServerKeys {
    /// Keys read through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    async fn get(&self, path: &str, accept: &str) -> Result<String, String> {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, accept)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        self.client
            .request_text(request)
            .await
            .map_err(|e| format!("GET {path}: {e}"))
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
}

impl KeySource for ApiServerKeys {
    fn fetch(&self) -> KeysFuture<'_> {
        Box::pin(async move {
            let discovery: Discovery = serde_json::from_str(
                &self
                    .get("/.well-known/openid-configuration", "application/json")
                    .await?,
            )
            .map_err(|e| format!("OIDC discovery document: {e}"))?;
            // The JWKS endpoint refuses `application/json` (406).
            let keys: JwkSet = serde_json::from_str(
                &self
                    .get("/openid/v1/jwks", "application/jwk-set+json, */*")
                    .await?,
            )
            .map_err(|e| format!("JWKS: {e}"))?;
            Ok(IssuerKeys {
                issuer: discovery.issuer,
                keys,
            })
        })
    }
}

#[cfg(test)]
mod tests;
