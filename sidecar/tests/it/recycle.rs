//! `--max-worker-memory` with `--memory-watch-threshold` on a real leaky app under load: the
//! leaking worker starts tracing at the threshold, is recycled over the limit with a heap diff
//! whose top site is the leak line, its slot is refilled, no request fails, a worker that
//! never crossed is never traced, and the sidecar lists the recycle and counts it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use forkscope_protocol::recycle::RecycleReason;
use forkscope_protocol::result::Outcome;
use forkscope_tests::keepalive::KeepAlive;
use forkscope_tests::{apps_dir, request, wait_for};

use crate::util::{Sidecar, eventually, line_of, parse_metrics, unique_app_with};

#[tokio::test]
async fn a_worker_over_its_memory_limit_is_recycled_with_the_evidence_and_no_failed_request() {
    // A uniquely named copy of the app: its metric labels are its own on a shared machine.
    let (server, app, _dir) = unique_app_with(
        "leaky",
        2,
        &[
            "--max-worker-memory",
            "100Mi",
            "--memory-watch-threshold",
            "50%",
        ],
    );
    let module = app.trim_end_matches(":app");
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let workers = server.workers();
    // Leak through one keep-alive connection, so one worker grows and the other does not.
    let mut leaking = KeepAlive::connect(server.addr);
    let slot: serde_json::Value = serde_json::from_slice(&leaking.get("/slot").body).expect("json");
    let victim = slot["pid"].as_i64().expect("pid") as i32;
    let (victim_slot, _) = *workers
        .iter()
        .find(|(_, p)| *p == victim)
        .expect("the connection's worker");
    let bystander = workers.iter().find(|(_, p)| *p != victim).expect("other").1;

    // Load on other connections all along: every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, served, failed, addr) =
            (stop.clone(), served.clone(), failed.clone(), server.addr);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match std::panic::catch_unwind(|| request(addr, "GET", "/", &[], b"").status) {
                    Ok(200) => served.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // 10 MB per request: over the threshold (50 MiB) first, tracing starts; then over the limit.
    for _ in 0..5 {
        assert_eq!(leaking.get("/leak?n=1000").status, 200);
    }
    server.wait_log(
        &format!("Worker (pid:{victim}) in slot {victim_slot} crossed the memory watch threshold"),
        Duration::from_secs(30),
    );
    for _ in 0..6 {
        assert_eq!(leaking.get("/leak?n=1000").status, 200);
    }
    server.wait_log(
        &format!("Worker (pid:{victim}) in slot {victim_slot} recycled"),
        Duration::from_secs(60),
    );
    wait_for("the slot refilled", Duration::from_secs(60), || {
        server
            .workers()
            .iter()
            .any(|(s, p)| *s == victim_slot && *p != victim)
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(served.load(Ordering::Relaxed) > 0);

    // The evidence: the heap diff's top site is the leak line.
    let leak_line = line_of(&apps_dir().join("leaky.py"), "# LEAK");
    let client = sidecar.client();
    let list = client.recycles().await.expect("recycles");
    let record = list
        .recycles
        .iter()
        .find(|r| r.pid == victim as u32)
        .unwrap_or_else(|| panic!("no record of {victim}: {list:?}"));
    assert_eq!(record.reason, RecycleReason::Memory);
    assert_eq!(record.slot, victim_slot);
    assert!(record.uss_bytes > record.limit_bytes);
    let Some(Outcome::HeapDiff(diff)) = record.capture.as_ref().map(|c| &c.outcome) else {
        panic!("no heap diff: {record:?}");
    };
    let top = &diff.sites[0].traceback[0];
    assert!(top.filename.ends_with(&format!("{module}.py")), "{top:?}");
    assert_eq!(top.lineno, leak_line);
    assert!(diff.sites[0].size_diff > 30_000_000, "{:?}", diff.sites[0]);
    let log = server.log_text();
    assert!(log.contains(&format!("{module}.py:{leak_line} +")), "{log}");
    // The other worker never crossed the threshold: never traced.
    assert!(!log.contains(&format!("Worker (pid:{bystander})")), "{log}");
    let results = server.runtime.join(bystander.to_string()).join("results");
    assert!(
        std::fs::read_dir(&results).is_ok_and(|mut d| d.next().is_none()),
        "{} holds results",
        results.display()
    );

    // Counted per slot and reason.
    let series = format!(
        r#"forkscope_worker_recycles_total{{app="{app}",reason="memory",server="forkscope",slot="{victim_slot}"}}"#
    );
    eventually("the recycle counted", Duration::from_secs(10), || {
        let client = client.clone();
        let series = series.clone();
        async move {
            let m = parse_metrics(&client.metrics_text().await.ok()?);
            (m.get(&series) == Some(&1.0)).then_some(())
        }
    })
    .await;
}
