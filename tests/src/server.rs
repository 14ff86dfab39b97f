//! A real `forkscope-server` process for one test: its own temporary directory (error log,
//! runtime dir), a free loopback port, readiness by log line and connect, and a stop on drop.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{apps_dir, procs, server_bin, venv, wait_for};

/// How to start a server.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    app: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    workers: u32,
    chdir: PathBuf,
    wait_workers: bool,
    program: Option<PathBuf>,
}

impl ServerBuilder {
    /// Serves `app` (`module:callable`, from tests/apps unless `chdir` changes it) with 1 worker.
    pub fn new(app: &str) -> Self {
        Self {
            app: app.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            workers: 1,
            chdir: apps_dir(),
            wait_workers: true,
            program: None,
        }
    }

    /// Number of workers (`-w`).
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Extra command-line arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| (*s).to_owned()));
        self
    }

    /// An extra environment variable.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// The working directory (`--chdir`).
    pub fn chdir(mut self, dir: &Path) -> Self {
        self.chdir = dir.to_owned();
        self
    }

    /// Runs `program` (say the `forkscope-server` command a wheel installed into a venv)
    /// instead of the built binary, without `VIRTUAL_ENV`: that command brings its interpreter.
    pub fn program(mut self, program: &Path) -> Self {
        self.program = Some(program.to_owned());
        self
    }

    /// Do not wait for the workers to boot (for apps that fail to import).
    pub fn no_wait(mut self) -> Self {
        self.wait_workers = false;
        self
    }

    /// Starts the server and waits until it accepts connections and every worker is up.
    ///
    /// # Panics
    /// When it does not become ready within 60 s.
    pub fn start(self) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("error.log");
        let runtime = dir.path().join("run");
        let mut cmd = Command::new(self.program.clone().unwrap_or_else(server_bin));
        cmd.arg("-b")
            .arg("127.0.0.1:0")
            .arg("-w")
            .arg(self.workers.to_string())
            .arg("--chdir")
            .arg(&self.chdir)
            .arg("--error-logfile")
            .arg(&log)
            .arg("--runtime-dir")
            .arg(&runtime)
            .arg("--log-level")
            .arg("debug")
            .args(&self.args)
            .arg(&self.app)
            .env_remove("WEB_CONCURRENCY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match self.program {
            Some(_) => cmd.env_remove("VIRTUAL_ENV"),
            None => cmd.env("VIRTUAL_ENV", venv()),
        };
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn forkscope-server");
        let mut server = Server {
            child: Some(child),
            addr: "127.0.0.1:0".parse().expect("addr"),
            log,
            runtime,
            dir,
        };
        if !self.wait_workers {
            return server;
        }
        server.addr = wait_for(
            "the Listening line in the error log",
            Duration::from_secs(60),
            || {
                server.assert_running();
                let text = std::fs::read_to_string(&server.log).ok()?;
                let line = text.lines().find(|l| l.contains("Listening at: http://"))?;
                let rest = line.split("Listening at: http://").nth(1)?;
                rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
            },
        );
        let n = self.workers as usize;
        wait_for("every worker to boot", Duration::from_secs(60), || {
            server.assert_running();
            (procs::workers(server.pid()).len() >= n).then_some(())
        });
        wait_for("a connection", Duration::from_secs(30), || {
            TcpStream::connect(server.addr).ok()
        });
        server
    }
}

/// A running server; stopped (TERM, then KILL) when dropped.
pub struct Server {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its error log.
    pub log: PathBuf,
    /// Its runtime directory.
    pub runtime: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    /// The leader's PID.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The error log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Workers as (slot, pid).
    pub fn workers(&self) -> Vec<(u32, i32)> {
        procs::workers(self.pid())
    }

    /// Waits until the error log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("{needle:?} in the error log"), timeout, || {
            self.log_text().contains(needle).then_some(())
        });
    }

    /// Sends `sig` to the leader.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("signal the leader");
    }

    /// Panics with the log if the leader has exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "forkscope-server exited with {status}; log:\n{}",
                self.log_text()
            );
        }
    }

    /// Waits for the leader to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("running");
        let status = wait_for("the leader to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        self.child = None;
        status.code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let workers: Vec<i32> = procs::workers(pid.as_raw())
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..500 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
        for w in workers {
            let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
        }
        let _ = child.wait();
    }
}

/// A request to tests/apps/app.py's `/hold` that stays inside the app until released.
pub struct Held {
    release: PathBuf,
    answer: std::thread::JoinHandle<crate::Response>,
    _dir: tempfile::TempDir,
}

impl Held {
    /// Sends the request on a new connection and waits until it is inside the app.
    ///
    /// # Panics
    /// When it does not get there within 30 s.
    pub fn start(addr: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("in-app");
        let release = dir.path().join("release");
        let path = format!(
            "/hold?marker={}&release={}",
            marker.display(),
            release.display()
        );
        let answer = std::thread::spawn(move || crate::request(addr, "GET", &path, &[], b""));
        wait_for(
            "the held request inside the app",
            Duration::from_secs(30),
            || marker.exists().then_some(()),
        );
        Self {
            release,
            answer,
            _dir: dir,
        }
    }

    /// Lets the request finish and returns its response (once the server closed the
    /// connection, so the thread that ran it is free again).
    ///
    /// # Panics
    /// When the request failed.
    pub fn release(self) -> crate::Response {
        std::fs::write(&self.release, b"").expect("release");
        self.answer.join().expect("the held request")
    }
}
