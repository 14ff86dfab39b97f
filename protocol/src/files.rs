//! Atomic writes and size-limited reads of the runtime directory's JSON files.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is larger than the reader allows.
    #[error("{path}: larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The content is not the expected JSON.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
}

impl FileError {
    /// True when the file does not exist (yet).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `value` as JSON to `path` so that readers see either the old file or the whole new one:
/// a temporary file in the same folder is written, flushed and renamed over `path`.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let bytes = serde_json::to_vec(value).map_err(|source| FileError::Json {
        path: path.to_owned(),
        source,
    })?;
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_data().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads JSON from `path`, refusing files larger than `limit` bytes without reading them whole.
///
/// # Errors
/// Missing or unreadable file, a file over the limit, or content that does not parse.
pub fn read_json_limited<T: DeserializeOwned>(path: &Path, limit: u64) -> Result<T, FileError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    serde_json::from_slice(&bytes).map_err(|source| FileError::Json {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, Command};

    #[test]
    fn round_trip_and_no_leftover_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("command.json");
        let cmd = Command::new("abc", Action::Stacks);
        write_json_atomic(&path, &cmd).expect("write");
        let back: Command = read_json_limited(&path, 1024).expect("read");
        assert_eq!(back, cmd);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("command.json")]);
    }

    #[test]
    fn oversized_and_garbage_files_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.json");
        fs::write(&path, vec![b' '; 2048]).expect("write");
        assert!(matches!(
            read_json_limited::<Command>(&path, 1024),
            Err(FileError::TooLarge { .. })
        ));
        fs::write(&path, b"\x00\xffnot json").expect("write");
        assert!(matches!(
            read_json_limited::<Command>(&path, 1024),
            Err(FileError::Json { .. })
        ));
        assert!(
            read_json_limited::<Command>(&dir.path().join("missing"), 10)
                .expect_err("missing")
                .is_not_found()
        );
    }
}
