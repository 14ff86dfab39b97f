//! The sidecar as another user than the application, with no capabilities: what the docs say
//! happens when the pod's containers do not share a UID (SIDECAR.md, "Running it in a pod").

use std::time::Duration;

use forkscope_sidecar::ClientError;
use forkscope_sidecar::api::SessionState;
use forkscope_tests::ServerBuilder;
use reqwest::StatusCode;

use crate::util::{Sidecar, rollup, stacks};

/// Runs a program with every capability dropped (bounding, inheritable and ambient sets), so
/// even uid 0 holds none after exec: the same user as its peer and nothing more.
const NO_CAPS: [&str; 5] = [
    "setpriv",
    "--bounding-set=-all",
    "--inh-caps=-all",
    "--ambient-caps=-all",
    "--",
];

#[tokio::test]
async fn another_uid_sees_processes_but_no_memory_and_cannot_signal() {
    // The server runs as root (the test's user), the sidecar as nobody.
    let server = ServerBuilder::new("leaky:app").workers(1).start();
    let sidecar = Sidecar::start_as_nobody(&server.runtime);
    let client = sidecar.client();
    let list = client.processes().await.expect("processes");
    let leader = list
        .leaders
        .iter()
        .find(|l| l.leader.pid == server.pid() as u32)
        .expect("titles and stat are world-readable: the leader is found");
    assert_eq!(leader.workers.len(), 1);
    assert_eq!(
        leader.leader.memory, None,
        "smaps_rollup needs ptrace access"
    );
    assert_eq!(leader.workers[0].memory, None);
    match client.reload(Some(server.pid() as u32)).await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert!(body.reason.contains("refused"), "{}", body.reason);
        }
        other => panic!("expected the kernel to refuse: {other:?}"),
    }
    let s = client.start_profile(&stacks(&server)).await.expect("start");
    let done = client
        .wait(&s.id, Duration::from_secs(30), Duration::from_millis(20))
        .await
        .expect("session");
    assert_eq!(done.state, SessionState::Failed, "{done:#?}");
    // The server is untouched: same workers, still serving.
    assert_eq!(
        server.workers()[0].1 as u32,
        leader.workers[0].pid,
        "worker replaced"
    );
    let r = forkscope_tests::request(server.addr, "GET", "/", &[], b"");
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn the_same_uid_without_any_capability_reads_memory_and_profiles() {
    // Server and sidecar share a user and hold no capabilities (no CAP_KILL, no
    // CAP_SYS_PTRACE), as two containers of one pod with `capabilities: drop: [ALL]`.
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = dir.path().join("run");
    let log = dir.path().join("server.log");
    let server = std::process::Command::new(NO_CAPS[0])
        .args(&NO_CAPS[1..])
        .arg(forkscope_tests::server_bin())
        .args(["-b", "127.0.0.1:0", "-w", "2", "--chdir"])
        .arg(forkscope_tests::apps_dir())
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--error-logfile")
        .arg(&log)
        .arg("leaky:app")
        .env("VIRTUAL_ENV", forkscope_tests::venv())
        .env_remove("WEB_CONCURRENCY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the server");
    let server = Stopped(server);
    // setpriv execs the server: the child's PID is the leader's.
    let leader = server.0.id() as i32;
    let workers = forkscope_tests::wait_for("two workers", Duration::from_secs(60), || {
        let w = forkscope_tests::procs::workers(leader);
        (w.len() == 2).then_some(w)
    });
    let status = std::fs::read_to_string(format!("/proc/{leader}/status")).expect("status");
    assert!(
        status.contains("CapEff:\t0000000000000000"),
        "the server still holds capabilities:\n{status}"
    );
    let sidecar = Sidecar::start_wrapped(&runtime, &NO_CAPS);
    let sidecar_status =
        std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid())).expect("status");
    assert!(
        sidecar_status.contains("CapEff:\t0000000000000000"),
        "{sidecar_status}"
    );
    let client = sidecar.client();
    let first_worker = forkscope_tests::procs::workers(leader)[0].1 as u32;
    let kernel_before = rollup(first_worker).expect("rollup")["Pss"];
    let list = client.processes().await.expect("processes");
    let found = list
        .leaders
        .iter()
        .find(|l| l.leader.pid == leader as u32)
        .expect("leader");
    let worker = found
        .workers
        .iter()
        .find(|w| w.pid == first_worker)
        .expect("the worker read first");
    let pss = worker
        .memory
        .expect("memory is readable with the same uid")
        .pss_bytes;
    // The API's figure is the kernel's: read before and after, an idle worker's PSS stays
    // within a few percent (a sibling's fork or exit moves shared pages a little).
    let after = rollup(worker.pid).expect("rollup")["Pss"];
    let (low, high) = (after.min(kernel_before), after.max(kernel_before));
    assert!(
        pss >= low - low / 10 && pss <= high + high / 10,
        "API PSS {pss} vs kernel {kernel_before}..{after}"
    );
    // Issue 14: the app (same UID, no capabilities) could read the sidecar's token through
    // `/proc/<sidecar>/root` and its memory and environment: the sidecar is non-dumpable.
    let sidecar_pid = sidecar.pid();
    for path in [
        format!("/proc/{sidecar_pid}/root{}", sidecar.token_file().display()),
        format!("/proc/{sidecar_pid}/environ"),
    ] {
        let read = std::process::Command::new(NO_CAPS[0])
            .args(&NO_CAPS[1..])
            .args(["cat", &path])
            .stderr(std::process::Stdio::null())
            .output()
            .expect("run cat");
        assert!(
            !read.status.success(),
            "{path} is readable by the app's user: {}",
            String::from_utf8_lossy(&read.stdout)
        );
    }
    // The same read works on a dumpable process of that user (the check can fail).
    let read = std::process::Command::new(NO_CAPS[0])
        .args(&NO_CAPS[1..])
        .args(["cat", &format!("/proc/{leader}/environ")])
        .output()
        .expect("run cat");
    assert!(read.status.success(), "the leader's environ is unreadable");
    let s = client
        .start_profile(&forkscope_sidecar::api::ProfileRequest {
            leader_pid: Some(leader as u32),
            ..forkscope_sidecar::api::ProfileRequest::stacks()
        })
        .await
        .expect("start");
    let done = client
        .wait(&s.id, Duration::from_secs(30), Duration::from_millis(20))
        .await
        .expect("session");
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    let scaled = client
        .set_workers(&forkscope_sidecar::api::ScaleRequest {
            leader_pid: Some(leader as u32),
            workers: 3,
            timeout_seconds: Some(60.0),
        })
        .await
        .expect("signals to the same uid need no CAP_KILL");
    assert_eq!(scaled.workers, 3);
    // The leader really has a third worker, one that was not there before.
    let now = forkscope_tests::procs::workers(leader);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(
        now.iter().any(|w| !workers.contains(w)),
        "{now:?} vs {workers:?}"
    );
}

/// Stops the leader (TERM, then KILL) when the test ends, also when it fails.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..500 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
