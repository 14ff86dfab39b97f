//! A real gunicorn from PyPI: discovery by setproctitle titles and by command line, memory equal
//! to the kernel's smaps_rollup, and leader management (TTIN/TTOU/HUP) through the API.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use forkscope_protocol::{RUNTIME_DIR_ENV, RuntimeDir};
use forkscope_sidecar::api::{Memory, ProfileRequest, ScaleRequest, ServerKind};
use forkscope_sidecar::{Client, ClientError};
use forkscope_tests::{apps_dir, procs, request, venv, wait_for, wheel};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::profiles::{
    one_worker_killed_mid_session, one_worker_stopped_mid_session, timed_heap_diff_finds_the_leak,
};
use crate::util::{Sidecar, rollup};

/// A gunicorn master started by the test (the spawned process is the master).
struct Gunicorn {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// The line that makes a gunicorn deployment profilable (docs/GUNICORN.md).
const HOOK: &str = "from forkscope.gunicorn import *\n";

impl Gunicorn {
    /// `gunicorn -w N -b 127.0.0.1:0 app:app`; `titles: false` hides setproctitle from it.
    fn start(workers: u32, titles: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Self::command(&venv(), dir.path(), workers);
        cmd.arg("app:app");
        if !titles {
            // A module that shadows setproctitle and refuses to import: gunicorn then keeps
            // the interpreter's command line, as in images without setproctitle.
            let shadow = dir.path().join("shadow");
            std::fs::create_dir_all(&shadow).expect("mkdir");
            std::fs::write(
                shadow.join("setproctitle.py"),
                "raise ImportError('hidden by the test')\n",
            )
            .expect("write");
            cmd.env("PYTHONPATH", &shadow);
        }
        Self::ready(cmd, dir, workers)
    }

    /// gunicorn from the venv the forkscope wheel is installed in, serving tests/apps/leaky.py
    /// with 2 workers, `conf` as its gunicorn.conf.py, `args`, and the runtime directory in its
    /// folder. With the hook in `conf`, ready once every worker announced itself there.
    fn leaky(conf: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // As the pod's shared emptyDir, it exists before anything is written there.
        std::fs::create_dir(dir.path().join("run")).expect("mkdir run");
        let config = dir.path().join("gunicorn.conf.py");
        std::fs::write(&config, conf).expect("write gunicorn.conf.py");
        let mut cmd = Self::command(wheel::venv(), dir.path(), 2);
        cmd.arg("-c")
            .arg(&config)
            .args(args)
            .arg("leaky:app")
            .env(RUNTIME_DIR_ENV, dir.path().join("run"))
            .envs(env.iter().copied())
            .env_remove("VIRTUAL_ENV");
        let g = Self::ready(cmd, dir, 2);
        if conf.contains(HOOK) {
            g.wait_announced();
        }
        g
    }

    /// `{venv}/bin/gunicorn -b 127.0.0.1:0 -w N` in tests/apps, logging to `{dir}/gunicorn.log`,
    /// without the environment's gunicorn settings; the caller adds the rest and the app.
    fn command(venv: &Path, dir: &Path, workers: u32) -> Command {
        let mut cmd = Command::new(venv.join("bin/gunicorn"));
        cmd.args(["-b", "127.0.0.1:0", "-w", &workers.to_string(), "--chdir"])
            .arg(apps_dir())
            .arg("--error-logfile")
            .arg(dir.join("gunicorn.log"))
            .env_remove("WEB_CONCURRENCY")
            .env_remove("GUNICORN_CMD_ARGS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Spawns `cmd` (which logs to `{dir}/gunicorn.log`) and waits until it listens, has its
    /// `workers` and accepts.
    fn ready(mut cmd: Command, dir: tempfile::TempDir, workers: u32) -> Self {
        let log = dir.path().join("gunicorn.log");
        let child = cmd.spawn().expect("spawn gunicorn");
        let mut g = Gunicorn {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        let addr = wait_for("gunicorn's Listening line", Duration::from_secs(60), || {
            let text = std::fs::read_to_string(&log).ok()?;
            let rest = text.split("Listening at: http://").nth(1)?;
            rest.split_whitespace()
                .next()?
                .parse::<std::net::SocketAddr>()
                .ok()
        });
        wait_for("every gunicorn worker", Duration::from_secs(60), || {
            (procs::children(g.pid() as i32).len() == workers as usize).then_some(())
        });
        wait_for("gunicorn to accept", Duration::from_secs(30), || {
            TcpStream::connect(addr).ok()
        });
        g.addr = addr;
        g
    }

    /// Waits until every worker wrote its `process.json` (the hook's last step).
    fn wait_announced(&self) {
        wait_for(
            "every gunicorn worker's process.json",
            Duration::from_secs(60),
            || {
                let workers = procs::children(self.pid() as i32);
                (workers.len() == 2
                    && workers
                        .iter()
                        .all(|w| self.runtime().process_info(*w as u32).is_file()))
                .then_some(())
            },
        );
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn runtime(&self) -> RuntimeDir {
        RuntimeDir::new(self.dir.path().join("run"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gunicorn.log")).unwrap_or_default()
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

/// Asserts the API's memory for `pid` equals the kernel's. Shared pages make PSS move whenever
/// another process maps or drops them, so a comparison counts only when the file read just
/// before and just after the API call agree and the API matches both; a wrong reading can never
/// pass, a moving one is retried (bounded).
async fn memory_matches_kernel(sidecar: &Sidecar, pid: u32) {
    let client = sidecar.client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let before = rollup(pid).expect("smaps_rollup of a live process");
        let list = client.processes().await.expect("processes");
        let after = rollup(pid).expect("smaps_rollup of a live process");
        let view = list
            .leaders
            .iter()
            .flat_map(|l| std::iter::once(&l.leader).chain(&l.workers))
            .find(|p| p.pid == pid)
            .expect("the process is listed");
        let m = view.memory.expect("memory of a live process");
        let get = |k: &str| before.get(k).copied().unwrap_or(0);
        let kernel = Memory {
            pss_bytes: get("Pss"),
            rss_bytes: get("Rss"),
            uss_bytes: get("Private_Clean") + get("Private_Dirty"),
            shared_bytes: get("Shared_Clean") + get("Shared_Dirty"),
            swap_bytes: get("Swap"),
        };
        if before == after && m == kernel {
            return;
        }
        let last = format!("api {m:?}, kernel {kernel:?} (stable: {})", before == after);
        assert!(
            tokio::time::Instant::now() < deadline,
            "memory of {pid} never matched the kernel's: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn discovers(titles: bool) {
    let g = Gunicorn::start(2, titles);
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let list = sidecar.client().processes().await.expect("processes");
    let leader = list
        .leaders
        .iter()
        .find(|l| l.leader.pid == g.pid())
        .unwrap_or_else(|| panic!("gunicorn {} not found in {list:#?}", g.pid()));
    assert_eq!(leader.server, ServerKind::Gunicorn);
    assert_eq!(leader.app, "app:app");
    if titles {
        assert_eq!(leader.leader.title, "gunicorn: master [app:app]");
    } else {
        assert!(leader.leader.title.contains("bin/gunicorn"), "{leader:?}");
    }
    let mut want: Vec<u32> = procs::children(g.pid() as i32)
        .into_iter()
        .map(|p| p as u32)
        .collect();
    want.sort_unstable();
    let mut got: Vec<u32> = leader.workers.iter().map(|w| w.pid).collect();
    got.sort_unstable();
    assert_eq!(got, want);
    // Age ranks 0 and 1, oldest first.
    let slots: Vec<Option<u32>> = leader.workers.iter().map(|w| w.slot).collect();
    assert_eq!(slots, vec![Some(0), Some(1)]);
    assert!(leader.workers[0].start_ticks <= leader.workers[1].start_ticks);
    assert!(leader.leader.cpu_seconds > 0.0, "python start-up costs CPU");
    let now = forkscope_sidecar::sessions::unix_now();
    assert!(leader.leader.started_at > now - 600.0 && leader.leader.started_at <= now + 1.0);
    let metrics = sidecar.client().metrics_text().await.expect("metrics");
    for series in [
        r#"forkscope_process_pss_bytes{app="app:app",role="leader",server="gunicorn",slot=""}"#,
        r#"forkscope_process_pss_bytes{app="app:app",role="worker",server="gunicorn",slot="1"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    assert!(metrics.contains(&format!(
        r#"forkscope_process_info{{app="app:app",pid="{}",role="leader",server="gunicorn",slot=""}} 1"#,
        g.pid()
    )));
    memory_matches_kernel(&sidecar, g.pid()).await;
    for w in &leader.workers {
        memory_matches_kernel(&sidecar, w.pid).await;
    }
}

#[tokio::test]
async fn gunicorn_with_setproctitle_is_discovered_with_kernel_memory() {
    discovers(true).await;
}

#[tokio::test]
async fn gunicorn_without_setproctitle_is_discovered_by_command_line() {
    discovers(false).await;
}

#[tokio::test]
async fn gunicorn_is_scaled_and_reloaded_through_the_api() {
    let g = Gunicorn::start(1, true);
    let runtime = tempfile::tempdir().expect("runtime");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let client = sidecar.client();
    let leader = Some(g.pid());
    // Without forkscope.gunicorn's hook its workers have no doorbell: a session is refused,
    // nothing is rung.
    match client
        .start_profile(&forkscope_sidecar::api::ProfileRequest {
            leader_pid: leader,
            ..forkscope_sidecar::api::ProfileRequest::stacks()
        })
        .await
    {
        Err(forkscope_sidecar::ClientError::Api { status, body }) => {
            assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
            assert!(body.reason.contains("gunicorn"), "{}", body.reason);
        }
        other => panic!("expected a 422: {other:?}"),
    }
    let up = client
        .set_workers(&ScaleRequest {
            leader_pid: leader,
            workers: 3,
            timeout_seconds: Some(60.0),
        })
        .await
        .expect("scale up");
    assert_eq!(up.workers, 3);
    assert_eq!(up.signal, "SIGTTIN");
    assert_eq!(up.signals_sent, 2);
    assert_eq!(procs::children(g.pid() as i32).len(), 3);
    let down = client
        .set_workers(&ScaleRequest {
            leader_pid: leader,
            workers: 1,
            timeout_seconds: Some(60.0),
        })
        .await
        .expect("scale down");
    assert_eq!((down.workers, down.signal.as_str()), (1, "SIGTTOU"));
    wait_for(
        "gunicorn to have one worker",
        Duration::from_secs(30),
        || (procs::children(g.pid() as i32).len() == 1).then_some(()),
    );
    let before = procs::children(g.pid() as i32);
    let reload = client.reload(leader).await.expect("reload");
    assert_eq!(reload.signal, "SIGHUP");
    // HUP replaces every worker.
    wait_for("a new worker after HUP", Duration::from_secs(60), || {
        let now = procs::children(g.pid() as i32);
        (now.len() == 1 && now != before).then_some(())
    });
}

/// A heap diff of `g`'s workers through the sidecar, as for forkscope-server's.
fn heap_diff(g: &Gunicorn, duration: Option<f64>) -> ProfileRequest {
    ProfileRequest {
        leader_pid: Some(g.pid()),
        ..ProfileRequest::heap_diff(duration)
    }
}

/// gunicorn with the one-line hook: a heap diff through the sidecar finds leaky.py's leak line
/// in every worker.
async fn profiled_like_forkscope_workers(args: &[&str]) {
    let g = Gunicorn::leaky(HOOK, args, &[]);
    let sidecar = Sidecar::start(g.dir.path().join("run").as_path(), &[]);
    let done =
        timed_heap_diff_finds_the_leak(&sidecar.client(), &heap_diff(&g, Some(6.0)), g.addr).await;
    let mut pids: Vec<u32> = done.workers.iter().map(|w| w.pid).collect();
    pids.sort_unstable();
    let mut children: Vec<u32> = procs::children(g.pid() as i32)
        .into_iter()
        .map(|p| p as u32)
        .collect();
    children.sort_unstable();
    assert_eq!(pids, children, "every gunicorn worker is profiled");
    // when_ready froze the preloaded objects before the fork; nothing to freeze otherwise.
    let frozen: u64 = request(g.addr, "GET", "/gc-frozen", &[], b"")
        .text()
        .parse()
        .expect("a count");
    assert_eq!(frozen > 0, args.contains(&"--preload"), "{frozen} frozen");
    // The hook's line, then the profiler's own lines, in gunicorn's error log.
    let log = g.log_text();
    for line in [
        "forkscope: profiler doorbell installed",
        "profiler: tracing started",
        "profiler: heap diff captured",
    ] {
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }
}

#[tokio::test]
async fn gunicorn_sync_workers_with_the_hook_are_profiled() {
    profiled_like_forkscope_workers(&["-k", "sync"]).await;
}

#[tokio::test]
async fn gunicorn_sync_workers_with_the_hook_are_profiled_preloaded() {
    profiled_like_forkscope_workers(&["-k", "sync", "--preload"]).await;
}

#[tokio::test]
async fn gunicorn_gthread_workers_with_the_hook_are_profiled() {
    profiled_like_forkscope_workers(&["-k", "gthread", "--threads", "4"]).await;
}

#[tokio::test]
async fn gunicorn_gthread_workers_with_the_hook_are_profiled_preloaded() {
    profiled_like_forkscope_workers(&["-k", "gthread", "--threads", "4", "--preload"]).await;
}

/// Without the hook, discovery and memory still work, and a profile request is refused with
/// the line to add.
#[tokio::test]
async fn gunicorn_without_the_hook_is_told_the_line_to_add() {
    let g = Gunicorn::leaky("", &[], &[]);
    let sidecar = Sidecar::start(g.dir.path().join("run").as_path(), &[]);
    let client = sidecar.client();
    let list = client.processes().await.expect("processes");
    let leader = list
        .leaders
        .iter()
        .find(|l| l.leader.pid == g.pid())
        .expect("the gunicorn leader is discovered");
    assert_eq!(leader.workers.len(), 2);
    assert!(leader.workers.iter().all(|w| w.memory.is_some()));
    assert_refused_with_the_line(&client, &g).await;
}

async fn assert_refused_with_the_line(client: &Client, g: &Gunicorn) {
    match client.start_profile(&heap_diff(g, Some(1.0))).await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, reqwest::StatusCode::UNPROCESSABLE_ENTITY);
            assert!(
                body.reason.contains("`from forkscope.gunicorn import *`")
                    && body.reason.contains("gunicorn.conf.py"),
                "{}",
                body.reason
            );
        }
        other => panic!("expected a 422: {other:?}"),
    }
}

/// A worker SIGKILLed mid-session is reported as exited; the other delivers its diff, and the
/// master's `child_exit` hook removes the dead worker's folder (it held no results).
#[tokio::test]
async fn gunicorn_worker_killed_mid_session_is_reported() {
    // gthread keeps connections alive, which aiming the leaks at one worker needs.
    let g = Gunicorn::leaky(HOOK, &["-k", "gthread", "--threads", "2"], &[]);
    let sidecar = Sidecar::start(g.dir.path().join("run").as_path(), &[]);
    let victim =
        one_worker_killed_mid_session(&sidecar.client(), &heap_diff(&g, None), g.addr).await;
    wait_for(
        "the killed worker's folder to go",
        Duration::from_secs(30),
        || (!g.runtime().process_dir(victim).exists()).then_some(()),
    );
}

/// A worker stopped gracefully mid-session hands in its exit result (the `worker_exit` hook).
#[tokio::test]
async fn gunicorn_worker_stopped_mid_session_hands_in_its_exit_result() {
    let g = Gunicorn::leaky(HOOK, &[], &[]);
    let sidecar = Sidecar::start(g.dir.path().join("run").as_path(), &[]);
    one_worker_stopped_mid_session(&sidecar.client(), &heap_diff(&g, None)).await;
}

/// An app that installs its own SIGUSR2 handler at import is told, in gunicorn's log, that the
/// doorbell replaces it in workers; profiling finds the leak.
#[tokio::test]
async fn gunicorn_app_with_its_own_usr2_handler_is_told() {
    let g = Gunicorn::leaky(HOOK, &[], &[("LEAKY_OWN_USR2", "1")]);
    wait_for(
        "the warning in gunicorn's log",
        Duration::from_secs(30),
        || {
            let log = g.log_text();
            (log.matches("forkscope: the application's SIGUSR2 handler")
                .count()
                == 2)
                .then_some(())
        },
    );
    let sidecar = Sidecar::start(g.dir.path().join("run").as_path(), &[]);
    timed_heap_diff_finds_the_leak(&sidecar.client(), &heap_diff(&g, Some(6.0)), g.addr).await;
}
