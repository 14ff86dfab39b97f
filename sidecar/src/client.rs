//! A typed async client of the sidecar API (reqwest with rustls), used by the operator and by
//! the integration tests.

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    ErrorBody, LeaderActionResult, LeaderSelector, ProcessList, ProfileRequest, ScaleRequest,
    Session, SessionList,
};
use crate::paths;

/// A route of [`paths`] relative to the base URL, so a base with a path (a proxy prefix) keeps
/// it.
fn relative(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or reading failed, or the body was not the expected JSON.
    #[error("sidecar request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// The sidecar answered with an error status.
    #[error("sidecar answered {status}: {} ({})", body.reason, body.code)]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error body (or a synthesized one when the body was not JSON).
        body: ErrorBody,
    },
    /// The base URL does not parse.
    #[error("invalid sidecar URL: {0}")]
    Url(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A connection to one sidecar.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    token: String,
}

impl Client {
    /// A client for `base` (e.g. `http://10.0.0.7:9808/`) sending `token` as the bearer token.
    ///
    /// # Errors
    /// An unparsable URL.
    pub fn new(base: &str, token: impl Into<String>) -> Result<Self, ClientError> {
        Self::with_http(reqwest::Client::new(), base, token)
    }

    /// Like [`new`](Self::new) with a caller-configured reqwest client (timeouts, TLS roots).
    ///
    /// # Errors
    /// An unparsable URL.
    pub fn with_http(
        http: reqwest::Client,
        base: &str,
        token: impl Into<String>,
    ) -> Result<Self, ClientError> {
        let base = reqwest::Url::parse(base).map_err(|e| ClientError::Url(e.to_string()))?;
        Ok(Self {
            http,
            base,
            token: token.into(),
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = self
            .base
            .join(relative(path))
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let mut req = self.http.request(method, url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
            code: "http".into(),
            reason: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            holder: None,
        });
        Err(ClientError::Api { status, body })
    }

    /// `GET /v1/processes`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn processes(&self) -> Result<ProcessList, ClientError> {
        self.call::<(), _>(Method::GET, paths::PROCESSES, None)
            .await
    }

    /// `GET /v1/recycles`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn recycles(&self) -> Result<crate::api::RecycleList, ClientError> {
        self.call::<(), _>(Method::GET, paths::RECYCLES, None).await
    }

    /// `POST /v1/profiles`.
    ///
    /// # Errors
    /// Transport or API errors (409 when a worker is busy: see the body's `holder`).
    pub async fn start_profile(&self, req: &ProfileRequest) -> Result<Session, ClientError> {
        self.call(Method::POST, paths::PROFILES, Some(req)).await
    }

    /// `GET /v1/profiles`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn profiles(&self) -> Result<SessionList, ClientError> {
        self.call::<(), _>(Method::GET, paths::PROFILES, None).await
    }

    /// `GET /v1/profiles/{id}`.
    ///
    /// # Errors
    /// Transport or API errors (404 for an unknown or expired session).
    pub async fn profile(&self, id: &str) -> Result<Session, ClientError> {
        self.call::<(), _>(Method::GET, &paths::with_id(paths::PROFILE, id), None)
            .await
    }

    /// `POST /v1/profiles/{id}/capture`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn capture(&self, id: &str) -> Result<Session, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &paths::with_id(paths::PROFILE_CAPTURE, id),
            None,
        )
        .await
    }

    /// `DELETE /v1/profiles/{id}`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn cancel(&self, id: &str) -> Result<Session, ClientError> {
        self.call::<(), _>(Method::DELETE, &paths::with_id(paths::PROFILE, id), None)
            .await
    }

    /// Polls a session until it is final or `timeout` passes, every `interval`.
    ///
    /// # Errors
    /// Transport or API errors; on timeout the last state is returned, not an error.
    pub async fn wait(
        &self,
        id: &str,
        timeout: std::time::Duration,
        interval: std::time::Duration,
    ) -> Result<Session, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.profile(id).await?;
            if s.state.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(s);
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// `POST /v1/leader/reload`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn reload(&self, leader_pid: Option<u32>) -> Result<LeaderActionResult, ClientError> {
        let sel = LeaderSelector { leader_pid };
        self.call(Method::POST, paths::LEADER_RELOAD, Some(&sel))
            .await
    }

    /// `POST /v1/leader/reopen-logs`.
    ///
    /// # Errors
    /// Transport or API errors.
    pub async fn reopen_logs(
        &self,
        leader_pid: Option<u32>,
    ) -> Result<LeaderActionResult, ClientError> {
        let sel = LeaderSelector { leader_pid };
        self.call(Method::POST, paths::LEADER_REOPEN_LOGS, Some(&sel))
            .await
    }

    /// `PUT /v1/leader/workers`.
    ///
    /// # Errors
    /// Transport or API errors (504 when the count was not reached in time).
    pub async fn set_workers(&self, req: &ScaleRequest) -> Result<LeaderActionResult, ClientError> {
        self.call(Method::PUT, paths::LEADER_WORKERS, Some(req))
            .await
    }

    /// `GET /readyz`: the readiness report; `status` is `ok` when ready (a 503 is not an
    /// error here, its report says what is missing).
    ///
    /// # Errors
    /// Transport errors or a body that is not the report.
    pub async fn ready(&self) -> Result<crate::api::Health, ClientError> {
        let url = self
            .base
            .join(relative(paths::READYZ))
            .map_err(|e| ClientError::Url(e.to_string()))?;
        Ok(self.http.get(url).send().await?.json().await?)
    }

    /// `GET /metrics` (no token needed).
    ///
    /// # Errors
    /// Transport errors or a non-success status.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        let url = self
            .base
            .join(relative(paths::METRICS))
            .map_err(|e| ClientError::Url(e.to_string()))?;
        let resp = self.http.get(url).send().await?.error_for_status()?;
        Ok(resp.text().await?)
    }
}
