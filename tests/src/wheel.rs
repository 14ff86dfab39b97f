//! The `forkscope` wheel installed with pip into a fresh virtualenv, with the frameworks the test
//! apps use (Flask, Django, gunicorn, setproctitle; versions from tests/requirements.txt).
//!
//! `FORKSCOPE_TEST_WHEEL` names a wheel built already (scripts/test builds it first); otherwise
//! `scripts/wheel` builds one. Both use `FORKSCOPE_PYTHON` (default `python3`). The venv lives in
//! `{target}/wheel/test-venv` and is made anew for every new wheel file; the test binaries of one
//! run share it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::{repo_root, target_dir};

/// The venv (made on first use).
///
/// # Panics
/// When the wheel cannot be built or installed.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(install)
}

/// The `forkscope-server` command the wheel installed.
pub fn command() -> PathBuf {
    venv().join("bin/forkscope-server")
}

/// The venv's Python.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// Runs `cmd`, panics with its output unless it succeeds.
///
/// # Panics
/// When it cannot start or fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn base_python() -> String {
    std::env::var("FORKSCOPE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The requirement line tests/requirements.txt has for `package` (`package==version`).
fn pinned(requirements: &str, package: &str) -> String {
    let prefix = format!("{package}==");
    requirements
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("tests/requirements.txt pins {package}"))
        .to_owned()
}

fn install() -> PathBuf {
    let wheel = match std::env::var_os("FORKSCOPE_TEST_WHEEL") {
        Some(w) => PathBuf::from(w),
        None => {
            let out = run(Command::new(repo_root().join("scripts/wheel")).arg(base_python()));
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let meta = std::fs::metadata(&wheel)
        .unwrap_or_else(|e| panic!("no wheel at {}: {e}", wheel.display()));
    let requirements = std::fs::read_to_string(repo_root().join("tests/requirements.txt"))
        .expect("read tests/requirements.txt");
    let packages =
        ["flask", "django", "gunicorn", "setproctitle"].map(|p| pinned(&requirements, p));
    let stamp = format!(
        "{} {} {:?} {packages:?}",
        wheel.display(),
        meta.len(),
        meta.modified().ok()
    );
    let venv = target_dir().join("wheel/test-venv");
    let stamp_file = venv.join(".forkscope-test-stamp");
    if std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return venv;
    }
    if venv.exists() {
        std::fs::remove_dir_all(&venv).expect("remove the previous test venv");
    }
    run(Command::new(base_python()).args(["-m", "venv"]).arg(&venv));
    // Plain pip, as users install it: a binary wheel, no Rust toolchain involved.
    run(Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(&wheel)
        .args(&packages));
    std::fs::write(&stamp_file, stamp).expect("write the venv's stamp");
    venv
}
