//! Static mode: the token comes from a file (a mounted Kubernetes Secret), is re-read when the
//! file changes (Secret rotation), is compared in constant time through SHA-256 digests (so
//! neither content nor length leaks through timing), and is never logged. A file that becomes
//! empty or disappears revokes the token: nothing is accepted until it is back.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
    /// `None` once the file became unusable: every token is refused.
    digest: Option<[u8; 32]>,
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
        digest: Some(digest(token)),
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

    /// Re-reads the file when it changed or vanished. A Secret update swaps the file atomically
    /// (a symlink flip), so an empty or missing file is a revocation, not a transient state.
    fn refresh(&self) {
        let modified = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        let stale = self
            .loaded
            .read()
            .map(|l| l.modified != modified || modified.is_none())
            .unwrap_or(true);
        if !stale {
            return;
        }
        let new = load(&self.path).unwrap_or(Loaded {
            modified,
            digest: None,
        });
        match self.loaded.write() {
            Ok(mut l) => *l = new,
            Err(e) => *e.into_inner() = new,
        }
    }

    /// True when `presented` is the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.refresh();
        let want = match self.loaded.read() {
            Ok(l) => l.digest,
            Err(e) => e.into_inner().digest,
        };
        want.is_some_and(|want| bool::from(digest(presented).ct_eq(&want)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves the file's modification time ahead, as a Secret update would change it.
    fn touch_later(path: &Path) {
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
    }

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
        touch_later(&path);
        assert!(check.matches(b"rotated"));
        assert!(!check.matches(b"s3cret"));
    }

    #[test]
    fn emptying_or_deleting_the_file_revokes_the_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret").expect("write");
        let check = TokenCheck::from_file(&path).expect("load");
        assert!(check.matches(b"s3cret"));
        std::fs::write(&path, "").expect("empty it");
        touch_later(&path);
        assert!(
            !check.matches(b"s3cret"),
            "an emptied file revokes the token"
        );
        assert!(!check.matches(b""));
        std::fs::write(&path, "s3cret").expect("restore");
        assert!(check.matches(b"s3cret"), "a restored file is used again");
        std::fs::remove_file(&path).expect("delete");
        assert!(
            !check.matches(b"s3cret"),
            "a deleted file revokes the token"
        );
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
