//! Who may call the `/v1/` API: a bearer token checked in one of two modes (docs/SIDECAR.md).
//! - [`static_token`]: a shared token in a file (a mounted Secret);
//! - [`kubernetes`]: a short-lived ServiceAccount token with audience `forkscope-sidecar`,
//!   verified offline against the cluster's service-account issuer keys, from an allowed caller.
//!
//! A missing or invalid token is a 401; a valid token of a caller that is not allowed is a 403.
//! Tokens are never logged.

pub mod kubernetes;
pub mod static_token;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use kubernetes::{KeySource, KubernetesAuth};
pub use static_token::{TokenCheck, TokenError};

use crate::error::ApiError;

/// How the sidecar is configured to authenticate callers (plain data, from the CLI).
#[derive(Clone)]
pub enum AuthConfig {
    /// The token in this file.
    Static(PathBuf),
    /// ServiceAccount tokens verified against `keys`.
    Kubernetes {
        /// The audience a token must carry.
        audience: String,
        /// The callers accepted, as token subjects (`system:serviceaccount:NS:NAME`).
        allowed: Vec<String>,
        /// Where the issuer's keys come from.
        keys: Arc<dyn KeySource>,
    },
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthConfig::Static(path) => f.debug_tuple("Static").field(path).finish(),
            AuthConfig::Kubernetes {
                audience, allowed, ..
            } => f
                .debug_struct("Kubernetes")
                .field("audience", audience)
                .field("allowed", allowed)
                .finish_non_exhaustive(),
        }
    }
}

/// The check in force.
pub enum Auth {
    /// Static mode.
    Static(TokenCheck),
    /// Kubernetes mode.
    Kubernetes(KubernetesAuth),
}

/// Why a caller is turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No token, or not a valid one (401).
    Unauthenticated,
    /// A valid token of a caller that is not allowed (403); carries the subject.
    Forbidden(String),
}

impl Auth {
    /// Builds the check.
    ///
    /// # Errors
    /// In static mode, when the token file is unreadable or empty.
    pub fn new(config: &AuthConfig) -> Result<Self, TokenError> {
        Ok(match config {
            AuthConfig::Static(path) => Auth::Static(TokenCheck::from_file(path)?),
            AuthConfig::Kubernetes {
                audience,
                allowed,
                keys,
            } => Auth::Kubernetes(KubernetesAuth::new(
                audience.clone(),
                allowed.clone(),
                keys.clone(),
            )),
        })
    }

    /// Checks a presented bearer token.
    pub async fn check(&self, token: &[u8]) -> Result<(), Denied> {
        match self {
            Auth::Static(check) if check.matches(token) => Ok(()),
            Auth::Static(_) => Err(Denied::Unauthenticated),
            Auth::Kubernetes(k) => k.verify(token).await.map(drop),
        }
    }
}

/// Middleware: lets a request through only with `Authorization: Bearer <token>` of an allowed
/// caller.
pub async fn require_token(
    State(auth): State<Arc<Auth>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    let Some(token) = presented else {
        return ApiError::Unauthorized.into_response();
    };
    match auth.check(token).await {
        Ok(()) => next.run(request).await,
        Err(Denied::Unauthenticated) => ApiError::Unauthorized.into_response(),
        Err(Denied::Forbidden(subject)) => ApiError::Forbidden(format!(
            "{subject} is not an allowed caller of this sidecar"
        ))
        .into_response(),
    }
}
