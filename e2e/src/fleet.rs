//! Real application "pods" and a real operator for the operator's end-to-end tests, on the
//! kubelet harness: each [`AppPod`] is a real `forkscope-server` (serving the leaky test app
//! with two workers) plus a real `forkscope-sidecar`, started together in their own PID
//! namespace (`unshare --pid --mount-proc`, as `shareProcessNamespace` gives a pod: the sidecar
//! sees exactly its pod's processes), listening on the pod's own loopback address 127.0.0.N,
//! which the harness reports as the Pod's IP. [`Operator`] is the real `forkscope-operator`
//! binary watching one namespace.
//!
//! Everything started here is ended when its handle drops: the PID namespace's init is
//! killed, and the kernel ends every process in it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use forkscope_sidecar::Client as SidecarClient;
use tokio::process::{Child, Command};

use crate::kubelet::{Kubelet, TestPod, loopback_ip};
use crate::wait::{DEFAULT_TIMEOUT, until};
use crate::{Error, Result};

/// A workspace binary next to the built `forkscope-server` (scripts/test builds them all).
pub fn binary(name: &str) -> PathBuf {
    forkscope_tests::server_bin().with_file_name(name)
}

/// How a sidecar authenticates its callers.
#[derive(Clone, Debug)]
pub enum SidecarAuth {
    /// `--token-file` holding this token.
    Static(String),
    /// `--auth kubernetes`, accepting these subjects, reading the issuer's keys with this
    /// kubeconfig.
    Kubernetes {
        /// `system:serviceaccount:NS:NAME` of the allowed callers.
        allowed: Vec<String>,
        /// The kubeconfig the sidecar reads the JWKS with.
        kubeconfig: PathBuf,
    },
}

fn free_port(ip: Ipv4Addr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0)).map_err(|e| Error::Spawn {
        program: format!("bind {ip}:0"),
        source: e,
    })?;
    Ok(listener
        .local_addr()
        .map_err(|e| Error::Spawn {
            program: "local_addr".into(),
            source: e,
        })?
        .port())
}

fn spawn_error(program: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Spawn {
        program: program.to_owned(),
        source,
    }
}

/// One application pod: server + sidecar in a PID namespace, registered through the harness.
pub struct AppPod {
    /// The Pod's name.
    pub name: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The server's port.
    pub http_port: u16,
    /// The sidecar's port (the container port named `forkscope`).
    pub sidecar_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl AppPod {
    /// Starts server and sidecar, waits until the sidecar sees the leader with both workers,
    /// then creates the Pod `name` with `labels` and marks it running at the pod's address.
    ///
    /// # Errors
    /// Spawn failures, a pod that never becomes ready, or the apiserver's error.
    pub async fn start(
        kubelet: &Kubelet,
        name: &str,
        labels: &[(&str, &str)],
        auth: &SidecarAuth,
    ) -> Result<Self> {
        let ip = loopback_ip();
        let http_port = free_port(ip)?;
        let sidecar_port = free_port(ip)?;
        let dir = tempfile::tempdir().map_err(spawn_error("tempdir"))?;
        let runtime = dir.path().join("run");
        std::fs::create_dir(&runtime).map_err(spawn_error("mkdir run"))?;
        let mut sidecar_args = vec![
            binary("forkscope-sidecar").display().to_string(),
            "--listen".into(),
            format!("{ip}:{sidecar_port}"),
        ];
        let mut env = vec![(
            "FORKSCOPE_RUNTIME_DIR".to_owned(),
            runtime.display().to_string(),
        )];
        match auth {
            SidecarAuth::Static(token) => {
                let file = dir.path().join("token");
                std::fs::write(&file, token).map_err(spawn_error("write token"))?;
                sidecar_args.extend(["--token-file".into(), file.display().to_string()]);
            }
            SidecarAuth::Kubernetes {
                allowed,
                kubeconfig,
            } => {
                sidecar_args.extend(["--auth".into(), "kubernetes".into()]);
                sidecar_args.extend(["--allowed-caller".into(), allowed.join(",")]);
                env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
            }
        }
        let server_args = [
            forkscope_tests::server_bin().display().to_string(),
            "--chdir".into(),
            forkscope_tests::apps_dir().display().to_string(),
            "-b".into(),
            format!("{ip}:{http_port}"),
            "-w".into(),
            "2".into(),
            "--error-logfile".into(),
            dir.path().join("server.log").display().to_string(),
            "leaky:app".into(),
        ];
        let quote = |args: &[String]| {
            args.iter()
                .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
                .collect::<Vec<_>>()
                .join(" ")
        };
        // The shell is the namespace's init (like a pod's pause container): it waits for both.
        let script = format!(
            "{} & {} 2>'{}' & wait",
            quote(&server_args),
            quote(&sidecar_args),
            dir.path().join("sidecar.log").display()
        );
        let child = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "--",
                "sh",
                "-c",
            ])
            .arg(script)
            .envs(env)
            .env("VIRTUAL_ENV", forkscope_tests::venv())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error("unshare"))?;
        let pod = AppPod {
            name: name.to_owned(),
            ip,
            http_port,
            sidecar_port,
            dir,
            child: Some(child),
        };
        pod.await_workers(2).await?;
        let mut test_pod = TestPod::new(name)
            .port("forkscope", i32::from(sidecar_port))
            .port("http", i32::from(http_port));
        for (k, v) in labels {
            test_pod = test_pod.label(k, v);
        }
        kubelet.run(&test_pod, ip).await?;
        Ok(pod)
    }

    /// The sidecar's base URL.
    pub fn sidecar_url(&self) -> String {
        format!("http://{}:{}/", self.ip, self.sidecar_port)
    }

    /// A sidecar client sending `token`.
    ///
    /// # Panics
    /// Never: the URL is well-formed.
    pub fn client(&self, token: &str) -> SidecarClient {
        SidecarClient::new(&self.sidecar_url(), token).expect("valid URL")
    }

    /// The server's address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.http_port))
    }

    /// Sends `n` requests that each leak one object in whichever worker serves them.
    pub async fn leak(&self, n: usize) {
        let addr = self.http_addr();
        tokio::task::spawn_blocking(move || {
            for _ in 0..n {
                let r = forkscope_tests::request(addr, "GET", "/leak?n=20", &[], b"");
                assert_eq!(r.status, 200, "leak request");
            }
        })
        .await
        .expect("leak task");
    }

    /// The server's and sidecar's logs, for failure messages.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!(
            "--- server.log\n{}\n--- sidecar.log\n{}",
            read("server.log"),
            read("sidecar.log")
        )
    }

    /// The pod's temporary directory (logs, token, runtime directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn await_workers(&self, n: usize) -> Result<()> {
        let health = reqwest::Client::new();
        let url = format!("{}readyz", self.sidecar_url());
        let processes = format!("{}metrics", self.sidecar_url());
        until(&format!("pod {} ready", self.name), DEFAULT_TIMEOUT, || {
            let (health, url, processes) = (&health, &url, &processes);
            async move {
                let ready =
                    matches!(health.get(url).send().await, Ok(r) if r.status().is_success());
                if !ready {
                    return Ok(None);
                }
                // /metrics needs no token: count the workers the sidecar sees.
                let text = match health.get(processes).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => return Ok(None),
                };
                let workers = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("forkscope_process_pss_bytes{")
                            && l.contains(r#"role="worker""#)
                    })
                    .count();
                Ok((workers >= n).then_some(()))
            }
        })
        .await
    }

    /// Kills the pod's processes (its sidecar becomes unreachable); the Pod object stays.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// The real operator, watching one namespace.
pub struct Operator {
    child: Child,
    log: PathBuf,
    /// The address of its /metrics, /healthz and /readyz.
    pub listen: SocketAddr,
}

impl Operator {
    /// Starts `forkscope-operator run --namespace NS` with `args` added, using `kubeconfig`.
    ///
    /// # Errors
    /// Spawn failures or an operator that never becomes ready.
    pub async fn start(
        namespace: &str,
        kubeconfig: &Path,
        log: PathBuf,
        args: &[&str],
    ) -> Result<Self> {
        let port = free_port(Ipv4Addr::LOCALHOST)?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(spawn_error("operator log"))?;
        let child = Command::new(binary("forkscope-operator"))
            .args([
                "run",
                "--namespace",
                namespace,
                "--operator-namespace",
                namespace,
            ])
            .arg("--listen")
            .arg(listen.to_string())
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("FORKSCOPE_LOG", "info,forkscope_operator=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(spawn_error("operator log"))?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error("forkscope-operator"))?;
        let op = Operator { child, log, listen };
        let http = reqwest::Client::new();
        let url = format!("http://{listen}/readyz");
        until("operator ready", DEFAULT_TIMEOUT, || {
            let (http, url) = (&http, &url);
            async move {
                Ok(
                    matches!(http.get(url).send().await, Ok(r) if r.status().is_success())
                        .then_some(()),
                )
            }
        })
        .await?;
        Ok(op)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its `/metrics` text.
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn metrics(&self) -> Result<String> {
        reqwest::get(format!("http://{}/metrics", self.listen))
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| Error::Spawn {
                program: "GET operator /metrics".into(),
                source: std::io::Error::other(e),
            })?
            .text()
            .await
            .map_err(|e| Error::Spawn {
                program: "GET operator /metrics".into(),
                source: std::io::Error::other(e),
            })
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
