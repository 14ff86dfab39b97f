//! Shared helpers of the integration tests: start the real server binary on a free loopback
//! port with a real Python app, wait for readiness (never a fixed sleep), talk raw HTTP, find
//! workers through `/proc`, and stop everything the test started.

pub mod client;
pub mod gunicorn;
pub mod keepalive;
pub mod procs;
pub mod server;
pub mod wheel;

pub use client::{Response, request, send_raw};
pub use server::{Held, Server, ServerBuilder};

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The folder of the test WSGI apps.
pub fn apps_dir() -> PathBuf {
    repo_root().join("tests/apps")
}

/// Cargo's target folder (`CARGO_TARGET_DIR`, else `target/` in the repository).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The built `forkscope-server` (debug) binary.
///
/// # Panics
/// When it was not built: run `cargo build -p forkscope-server` (scripts/test does).
pub fn server_bin() -> PathBuf {
    let bin = target_dir().join("debug/forkscope-server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p forkscope-server` first",
        bin.display()
    );
    bin
}

/// The virtualenv with Flask, Django and gunicorn (`scripts/python-env` creates it).
///
/// # Panics
/// When the script fails.
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("FORKSCOPE_TEST_VENV") {
        return PathBuf::from(v);
    }
    let out = std::process::Command::new(repo_root().join("scripts/python-env"))
        .output()
        .expect("run scripts/python-env");
    assert!(
        out.status.success(),
        "scripts/python-env failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Polls `check` until it returns `Some` or `timeout` passes.
///
/// # Panics
/// On timeout, with `what` in the message.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
