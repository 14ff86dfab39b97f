//! Profile sessions end to end against a real forkscope-server running tests/apps/leaky.py:
//! heap diffs that find the leak line, explicit capture, slots, stacks of a busy worker,
//! conflicts, cancel, timeouts, and workers that die mid-session.

use std::net::SocketAddr;
use std::time::Duration;

use forkscope_protocol::Outcome;
use forkscope_sidecar::api::{ProfileRequest, Session, SessionState, Targets, WorkerState};
use forkscope_sidecar::{Client, ClientError};
use forkscope_tests::{Server, ServerBuilder, apps_dir, request, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;

use crate::util::{Sidecar, eventually, heap_diff, line_of, stacks};

fn leaky(workers: u32) -> Server {
    ServerBuilder::new("leaky:app").workers(workers).start()
}

async fn wait_state(client: &Client, id: &str, state: SessionState) -> Session {
    eventually(
        &format!("session {id} to be {state:?}"),
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move {
                let s = client.profile(id).await.expect("get session");
                assert!(
                    !s.state.is_final() || s.state == state,
                    "session ended as {:?}: {s:#?}",
                    s.state
                );
                (s.state == state).then_some(s)
            }
        },
    )
    .await
}

async fn wait_final(client: &Client, id: &str) -> Session {
    let s = client
        .wait(id, Duration::from_secs(60), Duration::from_millis(20))
        .await
        .expect("get session");
    assert!(s.state.is_final(), "session still {:?}", s.state);
    s
}

/// Leaks `n` objects per request over `requests` requests, LEAK_SIZE (10000) bytes each.
fn leak(addr: SocketAddr, requests: u32, n: u32) -> u64 {
    for _ in 0..requests {
        let r = request(addr, "GET", &format!("/leak?n={n}"), &[], b"");
        assert_eq!(r.status, 200);
    }
    u64::from(requests * n) * 10_000
}

/// Leaks 30 objects `hits` times in worker `pid` only: each try asks `/slot` on a keep-alive
/// connection (served by one worker) and sends `/leak` on it only when that worker is `pid`.
pub(crate) fn leak_on(addr: SocketAddr, pid: u32, hits: u32) -> u64 {
    use forkscope_tests::client::read_response;
    use std::io::Write;
    let mut landed = 0;
    for _ in 0..2000 {
        let mut conn = std::net::TcpStream::connect(addr).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        conn.write_all(b"GET /slot HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("write");
        let info: serde_json::Value =
            serde_json::from_slice(&read_response(&mut conn).body).expect("json");
        if info["pid"].as_u64() != Some(u64::from(pid)) {
            continue;
        }
        conn.write_all(b"GET /leak?n=30 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .expect("write");
        assert_eq!(read_response(&mut conn).status, 200);
        landed += 1;
        if landed == hits {
            return u64::from(hits) * 30 * 10_000;
        }
    }
    panic!("worker {pid} served only {landed} of {hits} leaks");
}

fn assert_leak_on_top(session: &Session, leaked: u64) {
    let line = line_of(&apps_dir().join("leaky.py"), "# LEAK");
    let summary = session.summary.as_ref().expect("summary");
    let top = &summary.sites[0];
    assert!(
        top.traceback[0].filename.ends_with("leaky.py") && top.traceback[0].lineno == line,
        "top site is {:?}, expected leaky.py:{line}; summary {summary:#?}",
        top.traceback
    );
    assert!(
        top.size_diff >= leaked as i64,
        "top site grew {} bytes, {leaked} were leaked",
        top.size_diff
    );
    assert!(top.size_diff < (leaked as i64) * 2, "{}", top.size_diff);
    assert!(summary.total_size_diff >= leaked as i64);
}

#[tokio::test]
async fn heap_diff_with_a_duration_finds_the_leak_line() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let done =
        timed_heap_diff_finds_the_leak(&client, &heap_diff(&server, Some(6.0)), server.addr).await;
    assert_eq!(done.leader_pid, server.pid() as u32);
    // The sidecar collected its result files and left no command behind.
    for w in &done.workers {
        let dir = server.runtime.join(w.pid.to_string());
        assert!(!dir.join("command.json").exists());
        let left: Vec<_> = std::fs::read_dir(dir.join("results"))
            .expect("results dir")
            .collect();
        assert!(left.is_empty(), "results left behind: {left:?}");
    }
    let listed = client.profiles().await.expect("list");
    assert!(listed.sessions.iter().any(|s| s.id == done.id));
}

/// Runs `req` (a heap diff with a duration, on two workers) while leaking through `addr`: the
/// session completes with a diff from each worker and the leak line on top. Returns it.
pub(crate) async fn timed_heap_diff_finds_the_leak(
    client: &Client,
    req: &ProfileRequest,
    addr: SocketAddr,
) -> Session {
    let started = client.start_profile(req).await.expect("start");
    assert_eq!(started.workers.len(), 2);
    wait_state(client, &started.id, SessionState::Tracing).await;
    let leaked = leak(addr, 20, 5);
    let done = wait_final(client, &started.id).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    for w in &done.workers {
        assert_eq!(w.state, WorkerState::Done, "{w:?}");
        let result = w.result.as_ref().expect("result");
        assert_eq!(result.request_id, done.id);
        assert!(matches!(result.outcome, Outcome::HeapDiff(_)));
    }
    assert_eq!(done.summary.as_ref().map(|s| s.workers), Some(2));
    assert_leak_on_top(&done, leaked);
    done
}

#[tokio::test]
async fn explicit_capture_on_one_slot() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let req = ProfileRequest {
        targets: Targets::Slots { slots: vec![1] },
        frames: 5,
        top: 5,
        ..heap_diff(&server, None)
    };
    let s = client.start_profile(&req).await.expect("start");
    let slot1 = server
        .workers()
        .into_iter()
        .find(|(slot, _)| *slot == 1)
        .expect("slot 1")
        .1 as u32;
    assert_eq!(s.workers.len(), 1);
    assert_eq!((s.workers[0].pid, s.workers[0].slot), (slot1, Some(1)));
    let tracing = wait_state(&client, &s.id, SessionState::Tracing).await;
    assert!(tracing.deadline_at.is_some());
    let leaked = leak_on(server.addr, slot1, 10);
    let captured = client.capture(&s.id).await.expect("capture");
    assert!(matches!(
        captured.state,
        SessionState::Tracing | SessionState::Capturing | SessionState::Starting
    ));
    let done = wait_final(&client, &s.id).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    let summary = done.summary.as_ref().expect("summary");
    assert_eq!(summary.workers, 1);
    assert!(summary.sites.len() <= 5);
    assert_leak_on_top(&done, leaked);
    // A second capture of a finished session is a conflict.
    let again = client.capture(&s.id).await.expect_err("finished");
    assert_eq!(again.status(), Some(StatusCode::CONFLICT));
}

#[tokio::test]
async fn stacks_show_a_busy_worker_inside_its_request() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let dir = tempfile::tempdir().expect("handshake dir");
    let path = format!("/block?dir={}&n=1", dir.path().display());
    let addr = server.addr;
    let blocked = std::thread::spawn(move || request(addr, "GET", &path, &[], b""));
    wait_for("the request to enter", Duration::from_secs(30), || {
        dir.path().join("entered").exists().then_some(())
    });
    let s = client.start_profile(&stacks(&server)).await.expect("start");
    let done = wait_final(&client, &s.id).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    let functions: Vec<String> = done
        .workers
        .iter()
        .filter_map(|w| match &w.result.as_ref()?.outcome {
            Outcome::Stacks { threads } => Some(threads.clone()),
            _ => None,
        })
        .flatten()
        .flat_map(|t| t.frames)
        .filter_map(|f| f.function)
        .collect();
    assert!(
        functions.iter().any(|f| f == "block"),
        "no worker was inside block(): {functions:?}"
    );
    std::fs::write(dir.path().join("go1"), "").expect("go1");
    std::fs::write(dir.path().join("go2"), "").expect("go2");
    assert_eq!(blocked.join().expect("request thread").status, 200);
}

#[tokio::test]
async fn one_session_per_worker_and_cancel_stops_tracing() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let first = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start");
    wait_state(&client, &first.id, SessionState::Tracing).await;
    match client.start_profile(&stacks(&server)).await {
        Err(ClientError::Api { status, body }) => {
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(body.code, "conflict");
            assert_eq!(body.holder.as_deref(), Some(first.id.as_str()));
            assert!(body.reason.contains(&first.id), "{}", body.reason);
        }
        other => panic!("expected a 409, got {other:?}"),
    }
    let cancelled = client.cancel(&first.id).await.expect("cancel");
    assert_eq!(cancelled.state, SessionState::Cancelled, "{cancelled:#?}");
    assert!(
        cancelled
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Stopped),
        "{cancelled:#?}"
    );
    // Cancelling again answers the same final session.
    assert_eq!(
        client.cancel(&first.id).await.expect("cancel again").state,
        SessionState::Cancelled
    );
    // Tracing really stopped: a worker refuses a start while a session traces, so a new
    // session can start tracing in both workers only if the cancel reached them.
    let second = client
        .start_profile(&heap_diff(&server, None))
        .await
        .expect("start again");
    let tracing = wait_state(&client, &second.id, SessionState::Tracing).await;
    assert!(
        tracing
            .workers
            .iter()
            .all(|w| w.state == WorkerState::Tracing),
        "{tracing:#?}"
    );
    client.cancel(&second.id).await.expect("cancel");
}

#[tokio::test]
async fn a_session_without_capture_times_out_and_stops_tracing() {
    let server = leaky(1);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let s = client
        .start_profile(&ProfileRequest {
            timeout_seconds: Some(1.0),
            ..heap_diff(&server, None)
        })
        .await
        .expect("start");
    let done = wait_final(&client, &s.id).await;
    assert_eq!(done.state, SessionState::TimedOut, "{done:#?}");
    assert_eq!(done.workers[0].state, WorkerState::Stopped);
    assert!(done.error.as_deref().unwrap_or("").contains("no capture"));
    let metrics = client.metrics_text().await.expect("metrics");
    assert!(
        metrics.contains("forkscope_profile_sessions_total{outcome=\"timed_out\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_session_is_reported_and_the_others_deliver() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    one_worker_killed_mid_session(&sidecar.client(), &heap_diff(&server, None), server.addr).await;
}

/// Starts `req` on two workers, SIGKILLs the first while it traces, leaks in the second (served
/// at `addr`) and captures: the dead worker is reported as exited without a result, the
/// survivor delivers the leak. Returns the dead worker's PID.
pub(crate) async fn one_worker_killed_mid_session(
    client: &Client,
    req: &ProfileRequest,
    addr: SocketAddr,
) -> u32 {
    let s = client.start_profile(req).await.expect("start");
    wait_state(client, &s.id, SessionState::Tracing).await;
    let [victim, survivor] = [s.workers[0].pid, s.workers[1].pid];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill");
    // Aimed at the survivor: the victim's slot is refilled at once, and its replacement must
    // not take some of the leaks.
    let leaked = leak_on(addr, survivor, 4);
    client.capture(&s.id).await.expect("capture");
    let done = wait_final(client, &s.id).await;
    assert_eq!(done.state, SessionState::Completed, "{done:#?}");
    let by_pid = |pid| done.workers.iter().find(|w| w.pid == pid).expect("worker");
    let dead = by_pid(victim);
    assert_eq!(dead.state, WorkerState::Exited, "{dead:?}");
    assert!(
        dead.error
            .as_deref()
            .unwrap_or("")
            .contains("without a result")
    );
    assert_eq!(by_pid(survivor).state, WorkerState::Done);
    assert_eq!(done.summary.as_ref().map(|s| s.workers), Some(1));
    // Every leak went to the survivor, so it is on top.
    assert_leak_on_top(&done, leaked);
    victim
}

#[tokio::test]
async fn a_worker_stopped_gracefully_mid_session_hands_in_its_exit_result() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    one_worker_stopped_mid_session(&sidecar.client(), &heap_diff(&server, None)).await;
}

/// Starts `req`, stops its first worker gracefully (TERM) while it traces, and captures: the
/// worker handed in its `exit` result and is reported as exited while tracing.
pub(crate) async fn one_worker_stopped_mid_session(client: &Client, req: &ProfileRequest) {
    let s = client.start_profile(req).await.expect("start");
    wait_state(client, &s.id, SessionState::Tracing).await;
    let victim = s.workers[0].pid;
    kill(Pid::from_raw(victim as i32), Signal::SIGTERM).expect("term");
    wait_for("the worker to exit", Duration::from_secs(30), || {
        (!forkscope_tests::procs::alive(victim as i32)).then_some(())
    });
    client.capture(&s.id).await.expect("capture");
    let done = wait_final(client, &s.id).await;
    let dead = done
        .workers
        .iter()
        .find(|w| w.pid == victim)
        .expect("worker");
    assert_eq!(dead.state, WorkerState::Exited, "{dead:?}");
    match dead.result.as_ref().map(|r| &r.outcome) {
        Some(Outcome::ExitedWhileTracing { .. }) => {}
        other => panic!("expected the worker's exit result, got {other:?}"),
    }
    assert!(
        dead.error
            .as_deref()
            .unwrap_or("")
            .contains("exited while tracing")
    );
}

#[tokio::test]
async fn unknown_slots_are_refused() {
    let server = leaky(1);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let err = sidecar
        .client()
        .start_profile(&ProfileRequest {
            targets: Targets::Slots { slots: vec![7] },
            ..stacks(&server)
        })
        .await
        .expect_err("no slot 7");
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let top = sidecar
        .client()
        .start_profile(&ProfileRequest {
            targets: Targets::TopPss { count: 5 },
            ..stacks(&server)
        })
        .await
        .expect("top 5 of 1 worker");
    assert_eq!(top.workers.len(), 1);
}

#[tokio::test]
async fn a_worker_that_does_not_answer_times_out_and_is_left_a_stop() {
    let server = leaky(2);
    // Only the frozen worker is asked, so the short timeout can only end an exchange that could
    // never succeed: on a loaded machine a live worker may take longer than a second.
    let sidecar = Sidecar::start(&server.runtime, &["--result-timeout", "1"]);
    let client = sidecar.client();
    let (frozen_slot, frozen) = server.workers()[0];
    // A stopped process keeps the doorbell pending and cannot answer.
    kill(Pid::from_raw(frozen), Signal::SIGSTOP).expect("stop");
    let on_frozen = Targets::Slots {
        slots: vec![frozen_slot],
    };
    let s = client
        .start_profile(&ProfileRequest {
            targets: on_frozen.clone(),
            ..stacks(&server)
        })
        .await
        .expect("start");
    let done = wait_final(&client, &s.id).await;
    assert_eq!(done.state, SessionState::Failed, "{done:#?}");
    let stuck = &done.workers[0];
    assert_eq!(stuck.state, WorkerState::Failed);
    assert!(
        stuck
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no stacks result"),
        "{stuck:?}"
    );
    // Still owing an answer, it is not handed to a new session.
    let busy = client
        .start_profile(&ProfileRequest {
            targets: on_frozen.clone(),
            ..heap_diff(&server, None)
        })
        .await
        .expect_err("the frozen worker is still reserved");
    assert_eq!(busy.status(), Some(StatusCode::CONFLICT), "{busy}");
    kill(Pid::from_raw(frozen), Signal::SIGCONT).expect("cont");
    // Woken, the worker answers the pending ring with the harmless `stop` it was left, not a
    // bare-doorbell toggle that would start tracing unobserved: once released, a heap diff
    // starts in it (a worker already tracing would refuse the start).
    let next = eventually("the worker released", Duration::from_secs(60), || {
        let client = client.clone();
        let req = ProfileRequest {
            targets: on_frozen.clone(),
            ..heap_diff(&server, None)
        };
        async move { client.start_profile(&req).await.ok() }
    })
    .await;
    let tracing = wait_state(&client, &next.id, SessionState::Tracing).await;
    assert_eq!(tracing.workers[0].state, WorkerState::Tracing);
    client.cancel(&next.id).await.expect("cancel");
    let results = server.runtime.join(frozen.to_string()).join("results");
    let names: Vec<String> = std::fs::read_dir(&results)
        .expect("results")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with("manual-")),
        "a bare toggle ran: {names:?}"
    );
}

#[tokio::test]
async fn finished_sessions_are_kept_in_bounded_number() {
    let server = leaky(1);
    let sidecar = Sidecar::start(&server.runtime, &["--max-finished", "2"]);
    let client = sidecar.client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = client.start_profile(&stacks(&server)).await.expect("start");
        assert_eq!(
            wait_final(&client, &s.id).await.state,
            SessionState::Completed
        );
        ids.push(s.id);
    }
    let listed = client.profiles().await.expect("list").sessions;
    let listed_ids: Vec<String> = listed.iter().map(|s| s.id.clone()).collect();
    assert_eq!(listed_ids, ids[1..].to_vec());
    // The listing leaves out result payloads; one session has them.
    assert!(
        listed
            .iter()
            .all(|s| s.workers.iter().all(|w| w.result.is_none()))
    );
    let full = client.profile(&ids[2]).await.expect("get");
    assert!(full.workers.iter().all(|w| w.result.is_some()));
    let gone = client.profile(&ids[0]).await.expect_err("pruned");
    assert_eq!(gone.status(), Some(StatusCode::NOT_FOUND));
    let metrics = client.metrics_text().await.expect("metrics");
    assert!(
        metrics.contains("forkscope_profile_sessions_total{outcome=\"completed\"} 3"),
        "{metrics}"
    );
}

/// `--retention`: a finished session is listed, then dropped once older than the retention
/// (from the list and by id), while a newer one stays.
#[tokio::test]
async fn finished_sessions_are_dropped_after_the_retention() {
    let server = leaky(1);
    let sidecar = Sidecar::start(&server.runtime, &["--retention", "4"]);
    let client = sidecar.client();
    let listed = |client: &Client| {
        let client = client.clone();
        async move {
            let list = client.profiles().await.expect("list").sessions;
            list.into_iter().map(|s| s.id).collect::<Vec<_>>()
        }
    };
    let old = client.start_profile(&stacks(&server)).await.expect("start");
    assert_eq!(
        wait_final(&client, &old.id).await.state,
        SessionState::Completed
    );
    assert_eq!(listed(&client).await, vec![old.id.clone()], "kept at first");
    eventually(
        "the session to be dropped",
        Duration::from_secs(60),
        || async { listed(&client).await.is_empty().then_some(()) },
    )
    .await;
    let gone = client.profile(&old.id).await.expect_err("dropped");
    assert_eq!(gone.status(), Some(StatusCode::NOT_FOUND));
    let new = client.start_profile(&stacks(&server)).await.expect("start");
    wait_final(&client, &new.id).await;
    assert_eq!(
        listed(&client).await,
        vec![new.id],
        "a newer session is kept"
    );
}

#[tokio::test]
async fn top_pss_picks_the_worker_that_grew() {
    let server = leaky(2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let fat = server.workers()[1].1 as u32;
    // About 6 MB more in one worker than in the other.
    leak_on(server.addr, fat, 20);
    let s = client
        .start_profile(&ProfileRequest {
            targets: Targets::TopPss { count: 1 },
            ..stacks(&server)
        })
        .await
        .expect("start");
    assert_eq!(s.workers.len(), 1);
    assert_eq!(s.workers[0].pid, fat, "{s:#?}");
    assert_eq!(
        wait_final(&client, &s.id).await.state,
        SessionState::Completed
    );
}
