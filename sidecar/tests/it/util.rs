//! The sidecar binary for one test: its own token file and log, a free loopback port found by
//! the binary itself (`--listen 127.0.0.1:0`, address read from its log), stopped on drop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkscope_sidecar::Client;
use forkscope_tests::wait_for;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running sidecar.
pub struct Sidecar {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its bearer token.
    pub token: String,
    /// Its log (stderr).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts the sidecar over `runtime` with extra flags and waits until `/readyz` is 200.
    pub fn start(runtime: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let token = format!("tok-{}-{nanos:x}", std::process::id());
        Self::start_with(dir, runtime, &token, args, &[])
    }

    /// Starts the sidecar through `prefix` (a program and its arguments that then runs the
    /// sidecar binary, such as `setpriv ... --`).
    pub fn start_wrapped(runtime: &Path, prefix: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = format!("tok-wrapped-{}", std::process::id());
        let mut wrapper = prefix.to_vec();
        wrapper.push(env!("CARGO_BIN_EXE_forkscope-sidecar"));
        Self::start_with(dir, runtime, &token, &[], &wrapper)
    }

    /// Starts a copy of the sidecar binary as user and group 65534 (`nobody`) through
    /// `setpriv`, as a container with another UID than the app's would run it. Needs root.
    pub fn start_as_nobody(runtime: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            nix::unistd::geteuid().is_root(),
            "switching to another user needs root (the test machines run as root)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // Everything nobody must reach: the folder, a copy of the binary, the token.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = dir.path().join("forkscope-sidecar");
        std::fs::copy(env!("CARGO_BIN_EXE_forkscope-sidecar"), &bin).expect("copy binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = bin.to_string_lossy().into_owned();
        let token = format!("tok-nobody-{}", std::process::id());
        let wrapper = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            bin.as_str(),
        ];
        Self::start_with(dir, runtime, &token, &[], &wrapper)
    }

    /// Starts a second sidecar over the same runtime directory and token (a restart).
    pub fn restart(&mut self, runtime: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_with(dir, runtime, &self.token.clone(), &[], &[])
    }

    /// `wrapper` (a program and its arguments, ending with the sidecar binary to run) replaces
    /// the test binary's own sidecar when not empty.
    fn start_with(
        dir: tempfile::TempDir,
        runtime: &Path,
        token: &str,
        args: &[&str],
        wrapper: &[&str],
    ) -> Self {
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token");
        let log = dir.path().join("sidecar.log");
        let mut cmd = match wrapper {
            [] => Command::new(env!("CARGO_BIN_EXE_forkscope-sidecar")),
            [program, rest @ ..] => {
                let mut c = Command::new(program);
                c.args(rest);
                c
            }
        };
        let child = cmd
            .args(["--listen", "127.0.0.1:0", "--runtime-dir"])
            .arg(runtime)
            .arg("--token-file")
            .arg(&token_file)
            .args(args)
            .env("FORKSCOPE_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn forkscope-sidecar");
        let mut sidecar = Sidecar {
            child: Some(child),
            addr: "127.0.0.1:0".parse().expect("addr"),
            token: token.to_owned(),
            log,
            _dir: dir,
        };
        sidecar.addr = wait_for(
            "the sidecar's listening line",
            Duration::from_secs(30),
            || {
                sidecar.assert_running();
                let text = std::fs::read_to_string(&sidecar.log).ok()?;
                let rest = text.split("listening on ").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            },
        );
        let addr = sidecar.addr;
        wait_for("/readyz", Duration::from_secs(30), || {
            (status_of(addr, "/readyz")? == 200).then_some(())
        });
        sidecar
    }

    /// The file holding its token.
    pub fn token_file(&self) -> PathBuf {
        self._dir.path().join("token")
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A typed client with the right token.
    pub fn client(&self) -> Client {
        Client::new(&self.url("/"), self.token.clone()).expect("client")
    }

    /// The sidecar's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sidecar's PID.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// SIGKILL, as a crash or an OOM kill would end it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as Kubernetes stops a container, and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("term");
        wait_for("the sidecar to exit", Duration::from_secs(30), || {
            child.try_wait().ok().flatten()
        })
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("sidecar exited with {status}: {}", self.log_text());
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        for _ in 0..300 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The status code of `GET path`, or `None` when the connection fails (a readiness probe;
/// plain std I/O so it can run inside or outside an async runtime).
fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `/proc/PID/smaps_rollup` parsed directly: field name → bytes.
pub fn rollup(pid: u32) -> Option<HashMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let mut out = HashMap::new();
    for line in text.lines().skip(1) {
        let (key, rest) = line.split_once(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        out.insert(key.to_owned(), kb * 1024);
    }
    Some(out)
}

/// The line of `file` that ends with `marker` (1-based); tests look lines up, never hard-code.
pub fn line_of(file: &Path, marker: &str) -> u32 {
    let text = std::fs::read_to_string(file).expect("read app");
    let idx = text
        .lines()
        .position(|l| l.trim_end().ends_with(marker))
        .unwrap_or_else(|| panic!("{marker} not in {}", file.display()));
    u32::try_from(idx + 1).expect("small file")
}

/// Polls an async condition until it holds or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A heap-diff request for the workers of `server` (tests name the leader: other servers run
/// on the same machine, where a pod would have only its own).
pub fn heap_diff(
    server: &forkscope_tests::Server,
    duration: Option<f64>,
) -> forkscope_sidecar::api::ProfileRequest {
    forkscope_sidecar::api::ProfileRequest {
        leader_pid: Some(server.pid() as u32),
        ..forkscope_sidecar::api::ProfileRequest::heap_diff(duration)
    }
}

/// A stacks request for the workers of `server`.
pub fn stacks(server: &forkscope_tests::Server) -> forkscope_sidecar::api::ProfileRequest {
    forkscope_sidecar::api::ProfileRequest {
        leader_pid: Some(server.pid() as u32),
        ..forkscope_sidecar::api::ProfileRequest::stacks()
    }
}

/// Serves a copy of tests/apps/`module`.py under a unique module name, so this server's
/// metric labels (`app`) cannot collide with other servers running on the machine.
pub fn unique_app(
    module: &str,
    workers: u32,
) -> (forkscope_tests::Server, String, tempfile::TempDir) {
    unique_app_with(module, workers, &[])
}

/// [`unique_app`] with extra server flags.
pub fn unique_app_with(
    module: &str,
    workers: u32,
    args: &[&str],
) -> (forkscope_tests::Server, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let name = format!("{module}_{}_{nanos}", std::process::id());
    std::fs::copy(
        forkscope_tests::apps_dir().join(format!("{module}.py")),
        dir.path().join(format!("{name}.py")),
    )
    .expect("copy app");
    let app = format!("{name}:app");
    let server = forkscope_tests::ServerBuilder::new(&app)
        .workers(workers)
        .args(args)
        .chdir(dir.path())
        .start();
    (server, app, dir)
}

/// Parses the text exposition into `series → value` (series = name plus sorted labels).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}
