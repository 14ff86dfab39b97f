//! How the operator talks to sidecars: the [`Sidecars`] trait the request state machine is
//! written against (a fake implements it in the unit tests), and [`HttpSidecars`], the real one
//! over the sidecar crate's typed client with timeouts, the caller's token and call metrics.

use std::future::Future;
use std::time::{Duration, Instant};

use forkscope_sidecar::api::{ProfileRequest, Session, SessionList};
use forkscope_sidecar::{Client, ClientError};

use crate::metrics::Metrics;
use crate::token::TokenSource;

/// Why one sidecar call failed, classified by what the operator does about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A worker is held by another session (HTTP 409): retry later.
    #[error("a worker is busy with session {holder}")]
    Busy {
        /// The session holding the worker (empty when the sidecar did not say).
        holder: String,
    },
    /// The session does not exist (HTTP 404), e.g. the sidecar restarted.
    #[error("the sidecar does not know the session")]
    NotFound,
    /// No answer: connect error, timeout, or a broken connection.
    #[error("sidecar unreachable: {0}")]
    Unreachable(String),
    /// The sidecar refused the call as invalid for this pod (4xx other than 404/409).
    #[error("sidecar refused the request ({status}): {reason}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The sidecar's reason.
        reason: String,
    },
    /// The sidecar failed (5xx) or answered something that is not the API's JSON.
    #[error("sidecar error: {0}")]
    Failed(String),
}

impl CallError {
    /// A short label for metrics: `busy`, `not_found`, `unreachable`, `rejected`, `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Busy { .. } => "busy",
            CallError::NotFound => "not_found",
            CallError::Unreachable(_) => "unreachable",
            CallError::Rejected { .. } => "rejected",
            CallError::Failed(_) => "failed",
        }
    }
}

impl From<ClientError> for CallError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api { status, body } => match status.as_u16() {
                409 => CallError::Busy {
                    holder: body.holder.unwrap_or_default(),
                },
                404 => CallError::NotFound,
                s @ 400..=499 => CallError::Rejected {
                    status: s,
                    reason: body.reason,
                },
                s => CallError::Failed(format!("HTTP {s}: {}", body.reason)),
            },
            ClientError::Transport(t) if t.is_decode() => {
                CallError::Failed(format!("malformed answer: {t}"))
            }
            ClientError::Transport(t) => CallError::Unreachable(error_chain(&t)),
            ClientError::Url(u) => CallError::Failed(format!("bad sidecar address: {u}")),
        }
    }
}

/// The error with its sources, which is where reqwest puts "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The sidecar calls a profile request needs. `addr` is `IP:PORT`.
pub trait Sidecars: Send + Sync {
    /// `POST /v1/profiles`.
    fn start(
        &self,
        addr: &str,
        req: &ProfileRequest,
    ) -> impl Future<Output = Result<Session, CallError>> + Send;
    /// `GET /v1/profiles/{id}`.
    fn get(&self, addr: &str, id: &str) -> impl Future<Output = Result<Session, CallError>> + Send;
    /// `GET /v1/profiles`.
    fn list(&self, addr: &str) -> impl Future<Output = Result<SessionList, CallError>> + Send;
    /// `DELETE /v1/profiles/{id}`.
    fn cancel(&self, addr: &str, id: &str) -> impl Future<Output = Result<(), CallError>> + Send;
}

/// The real sidecars, over HTTP.
pub struct HttpSidecars {
    http: reqwest::Client,
    token: TokenSource,
    metrics: Metrics,
}

impl HttpSidecars {
    /// Calls time out after `connect` to connect and `request` in all.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend initialisation).
    pub fn new(
        token: TokenSource,
        metrics: Metrics,
        connect: Duration,
        request: Duration,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect)
            .timeout(request)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            token,
            metrics,
        })
    }

    async fn client(&self, addr: &str) -> Result<Client, CallError> {
        let token = self
            .token
            .token()
            .await
            .map_err(|e| CallError::Failed(format!("no token for the sidecar: {e:#}")))?;
        Client::with_http(self.http.clone(), &format!("http://{addr}/"), token)
            .map_err(CallError::from)
    }

    async fn timed<T>(
        &self,
        call: &'static str,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, CallError> {
        let started = Instant::now();
        let out = f.await.map_err(CallError::from);
        self.metrics.sidecar_call(
            call,
            out.as_ref().err().map_or("ok", CallError::kind),
            started.elapsed(),
        );
        out
    }
}

impl Sidecars for HttpSidecars {
    async fn start(&self, addr: &str, req: &ProfileRequest) -> Result<Session, CallError> {
        let c = self.client(addr).await?;
        self.timed("start", c.start_profile(req)).await
    }

    async fn get(&self, addr: &str, id: &str) -> Result<Session, CallError> {
        let c = self.client(addr).await?;
        self.timed("get", c.profile(id)).await
    }

    async fn list(&self, addr: &str) -> Result<SessionList, CallError> {
        let c = self.client(addr).await?;
        self.timed("list", c.profiles()).await
    }

    async fn cancel(&self, addr: &str, id: &str) -> Result<(), CallError> {
        let c = self.client(addr).await?;
        self.timed("cancel", c.cancel(id)).await.map(drop)
    }
}
