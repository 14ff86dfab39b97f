//! A sidecar that dies mid-session: its successor reports the session as orphaned and stops
//! the tracing it left in the workers.

use std::time::Duration;

use forkscope_sidecar::api::{SessionState, WorkerState};
use forkscope_tests::ServerBuilder;

use crate::util::{Sidecar, eventually, heap_diff};

#[tokio::test]
async fn a_restarted_sidecar_stops_and_reports_the_orphaned_session() {
    let server = ServerBuilder::new("leaky:app").workers(2).start();
    let mut first = Sidecar::start(&server.runtime, &[]);
    let client = first.client();
    let s = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start");
    eventually("tracing", Duration::from_secs(30), || {
        let client = client.clone();
        let id = s.id.clone();
        async move {
            let now = client.profile(&id).await.ok()?;
            (now.state == SessionState::Tracing).then_some(())
        }
    })
    .await;
    first.kill();
    let second = first.restart(&server.runtime);
    let client = second.client();
    // /readyz (waited for by start) turns ready only after recovery, so the session is there.
    let list = client.profiles().await.expect("list");
    let orphan = list
        .sessions
        .iter()
        .find(|x| x.id == s.id)
        .unwrap_or_else(|| panic!("session {} not reported: {list:#?}", s.id));
    assert_eq!(orphan.state, SessionState::Orphaned, "{orphan:#?}");
    assert!(
        orphan
            .error
            .as_deref()
            .unwrap_or("")
            .contains("earlier sidecar")
    );
    assert!(
        orphan
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Stopped),
        "{orphan:#?}"
    );
    // The workers are free again and no longer tracing: a new session can start in both.
    let next = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start after recovery");
    let tracing = eventually("tracing again", Duration::from_secs(30), || {
        let client = client.clone();
        let id = next.id.clone();
        async move {
            let now = client.profile(&id).await.ok()?;
            assert!(!now.state.is_final(), "{now:#?}");
            (now.state == SessionState::Tracing).then_some(now)
        }
    })
    .await;
    assert!(
        tracing
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Tracing)
    );
    client.cancel(&next.id).await.expect("cancel");
    let metrics = client.metrics_text().await.expect("metrics");
    assert!(
        metrics.contains("forkscope_profile_sessions_total{outcome=\"orphaned\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_sidecar_stopped_with_sigterm_stops_its_sessions_first() {
    let server = ServerBuilder::new("leaky:app").workers(2).start();
    let mut first = Sidecar::start(&server.runtime, &[]);
    let client = first.client();
    let s = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start");
    eventually("tracing", Duration::from_secs(30), || {
        let client = client.clone();
        let id = s.id.clone();
        async move {
            let now = client.profile(&id).await.ok()?;
            (now.state == SessionState::Tracing).then_some(())
        }
    })
    .await;
    // Issue 14: clients that hold connections (idle after a request, or in the middle of their
    // headers) held the graceful stop, so the sessions were never cancelled.
    let idle = held_connection(first.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let half = held_connection(first.addr, b"GET /healthz HTTP/1.1\r\n");
    assert!(first.terminate().success());
    drop((idle, half));
    // Nothing is left to recover: the session was cancelled before the exit...
    let second = first.restart(&server.runtime);
    let client = second.client();
    let list = client.profiles().await.expect("list");
    assert!(list.sessions.is_empty(), "{list:#?}");
    // ...and the workers stopped tracing: a new session starts in both.
    let next = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start");
    let tracing = eventually("tracing again", Duration::from_secs(30), || {
        let client = client.clone();
        let id = next.id.clone();
        async move {
            let now = client.profile(&id).await.ok()?;
            assert!(!now.state.is_final(), "{now:#?}");
            (now.state == SessionState::Tracing).then_some(now)
        }
    })
    .await;
    assert!(
        tracing
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Tracing)
    );
    client.cancel(&next.id).await.expect("cancel");
}

#[tokio::test]
async fn a_journal_naming_a_process_that_is_no_worker_never_gets_it_signalled() {
    let runtime = tempfile::tempdir().expect("runtime");
    // SIGUSR2's default action ends a process: `sleep` would die if it were rung.
    let mut bystander = std::process::Command::new("sleep")
        .arg("120")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("sleep");
    let pid = bystander.id();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let ticks: u64 = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("number");
    // Its runtime folder exists too, as if it were a worker.
    std::fs::create_dir_all(runtime.path().join(pid.to_string()).join("results")).expect("mkdir");
    let journal = runtime.path().join("sidecar/sessions");
    std::fs::create_dir_all(&journal).expect("mkdir");
    let entry = serde_json::json!({
        "id": "fs-planted",
        "leader_pid": 1,
        "created_at": 0.0,
        "request": forkscope_sidecar::api::ProfileRequest::heap_diff(None),
        "workers": [[pid, ticks, 0]],
    });
    std::fs::write(journal.join("fs-planted.json"), entry.to_string()).expect("write");
    let sidecar = Sidecar::start(runtime.path(), &[]);
    let session = sidecar
        .client()
        .profile("fs-planted")
        .await
        .expect("reported");
    assert_eq!(session.state, SessionState::Orphaned);
    assert_eq!(
        session.workers[0].state,
        WorkerState::Failed,
        "{session:#?}"
    );
    assert!(
        session.workers[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not signalled")
    );
    assert!(!journal.join("fs-planted.json").exists());
    assert!(
        forkscope_tests::procs::alive(pid as i32),
        "the bystander was signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

/// A connection that sent `bytes` and then stays open, saying nothing more.
fn held_connection(addr: std::net::SocketAddr, bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(bytes).expect("write");
    s
}
