//! The API's error type: every failure becomes a JSON [`ErrorBody`] with a status code.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::ErrorBody;

/// An error answered to an API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong bearer token (401).
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// A valid token of a caller that is not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such session, leader or route (404).
    #[error("{0}")]
    NotFound(String),
    /// A worker is held by another session, or the session is in the wrong state (409).
    #[error("{reason}")]
    Conflict {
        /// What conflicts.
        reason: String,
        /// The session that holds the worker, if that is the conflict.
        holder: Option<String>,
    },
    /// The body is not valid JSON for the route, or a field is out of range (400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is larger than the limit (413).
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The request is well-formed but cannot be carried out as asked (422): an unknown slot, a
    /// gunicorn leader for profiling, several leaders and none named.
    #[error("{0}")]
    Unprocessable(String),
    /// The named process is not a leader/worker the sidecar discovered (422 with its own code).
    #[error("{0}")]
    NotAWorker(String),
    /// An action did not finish in time (504).
    #[error("{0}")]
    Timeout(String),
    /// Anything else (500); the reason is logged and answered.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) | ApiError::NotAWorker(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `code` of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::NotAWorker(_) => "not_a_worker",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code().to_owned(),
            reason: self.to_string(),
            holder: match self {
                ApiError::Conflict { holder, .. } => holder.clone(),
                _ => None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(reason) = &self {
            tracing::error!(%reason, "internal error");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
