//! Leader management of a real forkscope-server through the API: worker count, reload,
//! reopening logs.

use std::time::Duration;

use forkscope_sidecar::api::ScaleRequest;
use forkscope_tests::{ServerBuilder, wait_for};

use crate::util::Sidecar;

#[tokio::test]
async fn worker_count_is_set_one_signal_at_a_time() {
    let server = ServerBuilder::new("app:app").workers(2).start();
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let up = client
        .set_workers(&ScaleRequest {
            leader_pid: Some(server.pid() as u32),
            workers: 4,
            timeout_seconds: Some(60.0),
        })
        .await
        .expect("scale up");
    assert_eq!(
        (up.leader_pid, up.workers, up.signals_sent),
        (server.pid() as u32, 4, 2)
    );
    let slots: Vec<u32> = server.workers().into_iter().map(|(s, _)| s).collect();
    assert_eq!(slots, vec![0, 1, 2, 3]);
    let down = client
        .set_workers(&ScaleRequest {
            leader_pid: Some(server.pid() as u32),
            workers: 1,
            timeout_seconds: Some(60.0),
        })
        .await
        .expect("scale down");
    assert_eq!((down.workers, down.signal.as_str()), (1, "SIGTTOU"));
    wait_for("one worker left", Duration::from_secs(30), || {
        (server.workers().len() == 1).then_some(())
    });
    let same = client
        .set_workers(&ScaleRequest {
            leader_pid: Some(server.pid() as u32),
            workers: 1,
            timeout_seconds: None,
        })
        .await
        .expect("no change");
    assert_eq!(same.signals_sent, 0);
}

#[tokio::test]
async fn reload_replaces_workers_and_reopen_logs_recreates_the_log() {
    let server = ServerBuilder::new("app:app").workers(2).start();
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let before: Vec<i32> = server.workers().into_iter().map(|(_, p)| p).collect();
    let reload = client
        .reload(Some(server.pid() as u32))
        .await
        .expect("reload");
    assert_eq!(reload.signal, "SIGHUP");
    wait_for("every worker replaced", Duration::from_secs(60), || {
        let now: Vec<i32> = server.workers().into_iter().map(|(_, p)| p).collect();
        (now.len() == 2 && now.iter().all(|p| !before.contains(p))).then_some(())
    });
    // Rotate the error log away; USR1 makes the leader open the path again.
    let rotated = server.log.with_extension("log.1");
    std::fs::rename(&server.log, &rotated).expect("rotate");
    let reopened = client
        .reopen_logs(Some(server.pid() as u32))
        .await
        .expect("reopen");
    assert_eq!(reopened.signal, "SIGUSR1");
    wait_for(
        "the log file to be recreated",
        Duration::from_secs(30),
        || server.log.exists().then_some(()),
    );
}
