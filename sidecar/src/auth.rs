//! The bearer-token check of every `/v1/` call. The token comes from a file (a mounted
//! Kubernetes Secret), is re-read when the file changes (Secret rotation), is compared in
//! constant time through SHA-256 digests (so neither content nor length leaks through timing),
//! and is never logged.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Why the token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// It could not be read.
    #[error("token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is empty (after trimming whitespace).
    #[error("token file {0} is empty")]
    Empty(PathBuf),
}

struct Loaded {
    modified: Option<SystemTime>,
    digest: [u8; 32],
}

/// The expected token, as a digest, kept fresh from its file.
pub struct TokenCheck {
    path: PathBuf,
    loaded: RwLock<Loaded>,
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn load(path: &Path) -> Result<Loaded, TokenError> {
    let read = |source| TokenError::Read {
        path: path.to_owned(),
        source,
    };
    let modified = std::fs::metadata(path).map_err(read)?.modified().ok();
    let raw = std::fs::read(path).map_err(read)?;
    let token = raw.trim_ascii();
    if token.is_empty() {
        return Err(TokenError::Empty(path.to_owned()));
    }
    Ok(Loaded {
        modified,
        digest: digest(token),
    })
}

impl TokenCheck {
    /// Reads the token file once.
    ///
    /// # Errors
    /// When the file is unreadable or empty: the sidecar refuses to start without a token.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, TokenError> {
        let path = path.into();
        let loaded = load(&path)?;
        Ok(Self {
            path,
            loaded: RwLock::new(loaded),
        })
    }

    /// Re-reads the file when its modification time changed; keeps the old token when the new
    /// file is unreadable or empty (a Secret update in progress).
    fn refresh(&self) {
        let modified = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        let stale = self
            .loaded
            .read()
            .map(|l| l.modified != modified)
            .unwrap_or(true);
        if stale
            && let Ok(new) = load(&self.path)
            && let Ok(mut l) = self.loaded.write()
        {
            *l = new;
        }
    }

    /// True when `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.refresh();
        let want = match self.loaded.read() {
            Ok(l) => l.digest,
            Err(e) => e.into_inner().digest,
        };
        bool::from(digest(presented).ct_eq(&want))
    }
}

/// Middleware: lets a request through only with `Authorization: Bearer <token>`.
pub async fn require_token(
    State(check): State<std::sync::Arc<TokenCheck>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .map(<[u8]>::trim_ascii);
    match presented {
        Some(token) if !token.is_empty() && check.matches(token) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_token_and_follows_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").expect("write");
        let check = TokenCheck::from_file(&path).expect("load");
        assert!(check.matches(b"s3cret"));
        assert!(!check.matches(b"s3cre"));
        assert!(!check.matches(b"s3cret2"));
        assert!(!check.matches(b""));
        // A rotated Secret: new content and a new modification time.
        std::fs::write(&path, "rotated").expect("write");
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        assert!(check.matches(b"rotated"));
        assert!(!check.matches(b"s3cret"));
    }

    #[test]
    fn empty_or_missing_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, " \n").expect("write");
        assert!(matches!(
            TokenCheck::from_file(&path),
            Err(TokenError::Empty(_))
        ));
        assert!(matches!(
            TokenCheck::from_file(dir.path().join("missing")),
            Err(TokenError::Read { .. })
        ));
    }
}
