//! A real gunicorn (from the tests' virtualenv) for side-by-side comparisons.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{apps_dir, venv, wait_for};

/// A running gunicorn, stopped when dropped.
pub struct Gunicorn {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Gunicorn {
    /// Starts `gunicorn -b 127.0.0.1:0 --chdir tests/apps <args> app` and waits until it serves.
    ///
    /// # Panics
    /// When it does not become ready within 60 s.
    pub fn start(app: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("gunicorn.log");
        let child = Command::new(venv().join("bin/gunicorn"))
            .args(["-b", "127.0.0.1:0", "--chdir"])
            .arg(apps_dir())
            .arg("--error-logfile")
            .arg(&log)
            .args(args)
            .arg(app)
            .env_remove("WEB_CONCURRENCY")
            .env_remove("GUNICORN_CMD_ARGS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gunicorn");
        let addr = wait_for("gunicorn's Listening line", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&log).ok()?;
            let rest = text.split("Listening at: http://").nth(1)?;
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        });
        wait_for("gunicorn to accept", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.contains("Booting worker") && TcpStream::connect(addr).is_ok()).then_some(())
        });
        Self {
            child,
            addr,
            _dir: dir,
            log,
        }
    }

    /// The error log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        for _ in 0..500 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
