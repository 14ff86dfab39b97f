//! Atomic writes and size-limited reads of the runtime directory's JSON files.
//!
//! The runtime directory is shared with the application, which may plant anything there: every
//! file is opened without following a symlink and without blocking (a FIFO would otherwise hang
//! the reader), and must turn out to be a regular file; temporary files are created
//! exclusively under a fresh name, so a planted entry can neither block nor redirect a write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// The path names something other than a regular file (a FIFO, a device, a folder).
    #[error("{path}: not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
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

/// Flags of every open: no symlink is followed (`ELOOP`), nothing blocks, nothing leaks
/// across `exec`.
const SAFE_FLAGS: libc::c_int = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;

/// Opens `path` for reading if it is a regular file (not a symlink, FIFO, socket or device).
///
/// # Errors
/// [`FileError::Io`] (`NotFound`, or `ELOOP` for a symlink), [`FileError::NotRegular`].
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(SAFE_FLAGS)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Reads the regular file at `path`, refusing one larger than `limit` bytes without reading it
/// whole.
///
/// # Errors
/// See [`open_regular`]; [`FileError::TooLarge`].
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path)?;
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
    Ok(bytes)
}

/// True when `path` is a directory itself, not a symlink to one (or anything else).
pub fn is_real_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_dir())
}

/// Makes `path` a real directory: creates it (its parent must exist) unless it already is one;
/// refuses a symlink or any other file planted there, so nothing written below it can be
/// redirected.
///
/// # Errors
/// [`FileError::NotRegular`] for something else at `path`; [`FileError::Io`] when it cannot be
/// created.
pub fn ensure_real_dir(path: &Path) -> Result<(), FileError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && is_real_dir(path) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(FileError::NotRegular {
            path: path.to_owned(),
        }),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Creates a new temporary file next to `path`, under a name no one else has used: an entry
/// already there (planted, or left by a crash) is skipped, never opened.
fn create_temp(path: &Path) -> Result<(PathBuf, File), FileError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(SAFE_FLAGS)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    }
    let (tmp, e) = last.expect("the loop ran and only AlreadyExists continues it");
    Err(io_err(&tmp)(e))
}

/// Writes `value` as JSON to `path` so that readers see either the old file or the whole new one:
/// a temporary file in the same folder is written, flushed and renamed over `path`.
///
/// # Errors
/// Any I/O error; the temporary file is removed on failure.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), FileError> {
    let bytes = serde_json::to_vec(value).map_err(|source| FileError::Json {
        path: path.to_owned(),
        source,
    })?;
    let (tmp, mut file) = create_temp(path)?;
    let result = (|| {
        file.write_all(&bytes).map_err(io_err(&tmp))?;
        file.sync_data().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads JSON from the regular file at `path` (see [`open_regular`]), refusing files larger than `limit` bytes without reading them whole.
///
/// # Errors
/// Missing or unreadable file, a file over the limit, or content that does not parse.
pub fn read_json_limited<T: DeserializeOwned>(path: &Path, limit: u64) -> Result<T, FileError> {
    let bytes = read_limited(path, limit)?;
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

    /// Issue 14: a FIFO planted at a result path blocked the reader forever, and a symlink at
    /// the predictable temporary name redirected the write.
    #[test]
    fn planted_fifos_and_symlinks_neither_block_nor_redirect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("result.json");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_json_limited::<Command>(&reader, 1024).map(|_| ()));
        });
        // A hang guard, not a timing goal: the read answers at once or never.
        let read = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("reading a FIFO must not block");
        assert!(
            matches!(read, Err(FileError::NotRegular { .. })),
            "{read:?}"
        );

        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        assert!(read_json_limited::<Command>(&link, 1024).is_err());
        // Symlinks at the temporary names the writer used to pick, and at the first new ones.
        let target = dir.path().join("command.json");
        let pid = std::process::id();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".command.json.{pid}.tmp")))
            .expect("symlink");
        for n in 0..4 {
            std::os::unix::fs::symlink(
                &victim,
                dir.path().join(format!(".command.json.{pid}.{n}.tmp")),
            )
            .expect("symlink");
        }
        write_json_atomic(&target, &Command::new("abc", Action::Stop)).expect("write");
        assert_eq!(fs::read(&victim).expect("victim"), b"precious");
        let back: Command = read_json_limited(&target, 1024).expect("read");
        assert_eq!(back.action, Action::Stop);
    }

    #[test]
    fn a_planted_symlink_is_not_taken_for_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = dir.path().join("elsewhere");
        fs::create_dir(&elsewhere).expect("mkdir");
        let link = dir.path().join("sidecar");
        std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
        assert!(!is_real_dir(&link));
        assert!(matches!(
            ensure_real_dir(&link),
            Err(FileError::NotRegular { .. })
        ));
        let real = dir.path().join("real");
        ensure_real_dir(&real).expect("created");
        ensure_real_dir(&real).expect("already there");
        assert!(is_real_dir(&real));
    }
}
