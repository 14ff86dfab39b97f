//! Per-slot request metrics of a real forkscope-server, exported by the sidecar: counts equal
//! to the requests sent, by slot and status class, a consistent histogram, requests in flight,
//! counters that survive a worker's restart, and an exposition `promtool` accepts.

use std::collections::HashMap;
use std::time::Duration;

use forkscope_tests::{request, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::{Sidecar, eventually, parse_metrics, unique_app};

/// One slot's request series, keyed `name{other labels}` (app, server and slot taken out).
fn slot_series(m: &HashMap<String, f64>, app: &str, slot: u32) -> HashMap<String, f64> {
    let wanted = [
        format!(r#"app="{app}""#),
        r#"server="forkscope""#.to_owned(),
        format!(r#"slot="{slot}""#),
    ];
    m.iter()
        .filter(|(k, _)| k.starts_with("forkscope_http_"))
        .filter_map(|(k, v)| {
            let (name, labels) = k.trim_end_matches('}').split_once('{')?;
            let labels: Vec<&str> = labels.split(',').collect();
            if !wanted.iter().all(|w| labels.contains(&w.as_str())) {
                return None;
            }
            let rest: Vec<&str> = labels
                .into_iter()
                .filter(|l| !wanted.iter().any(|w| w == l))
                .collect();
            Some((format!("{name}{{{}}}", rest.join(",")), *v))
        })
        .collect()
}

fn get(series: &HashMap<String, f64>, key: &str) -> f64 {
    *series
        .get(key)
        .unwrap_or_else(|| panic!("{key} missing: {series:?}"))
}

/// The `promtool` built by e2e/controlplane.sh (`FORKSCOPE_PROMTOOL`, or found in the cache).
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FORKSCOPE_PROMTOOL") {
        return p.into();
    }
    let cache = std::env::var_os("FORKSCOPE_CACHE").map_or_else(
        || std::path::PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/forkscope"),
        std::path::PathBuf::from,
    );
    std::fs::read_dir(cache.join("bin"))
        .ok()
        .and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("promtool-"))
            })
        })
        .expect("promtool is missing: run e2e/controlplane.sh build (scripts/test does)")
}

#[tokio::test]
async fn request_counts_per_slot_equal_what_was_sent() {
    let (server, app, _dir) = unique_app("app", 2);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    let slots: HashMap<String, u32> = server
        .workers()
        .into_iter()
        .map(|(slot, pid)| (pid.to_string(), slot))
        .collect();
    // 2xx answered by a known slot, 4xx, and 5xx raised by the app.
    let mut ok_by_slot: HashMap<u32, f64> = HashMap::new();
    let mut body_bytes = 0usize;
    for _ in 0..20 {
        let r = request(server.addr, "GET", "/pid", &[], b"");
        assert_eq!(r.status, 200);
        *ok_by_slot.entry(slots[&r.text()]).or_default() += 1.0;
        body_bytes += r.body.len();
    }
    for _ in 0..6 {
        let r = request(server.addr, "GET", "/nowhere", &[], b"");
        assert_eq!(r.status, 404);
        body_bytes += r.body.len();
    }
    for _ in 0..4 {
        assert_eq!(request(server.addr, "GET", "/error", &[], b"").status, 500);
    }
    let m = parse_metrics(&client.metrics_text().await.expect("metrics"));
    let mut totals: HashMap<&str, f64> = HashMap::new();
    let mut bytes = 0.0;
    for slot in [0, 1] {
        let s = slot_series(&m, &app, slot);
        assert_eq!(
            get(&s, r#"forkscope_http_requests_total{code="2xx"}"#),
            ok_by_slot.get(&slot).copied().unwrap_or(0.0),
            "slot {slot}: {s:?}"
        );
        let mut answered = 0.0;
        for code in ["1xx", "2xx", "3xx", "4xx", "5xx", "none"] {
            let n = get(
                &s,
                &format!(r#"forkscope_http_requests_total{{code="{code}"}}"#),
            );
            *totals.entry(code).or_default() += n;
            answered += n;
        }
        // The histogram: cumulative buckets, +Inf = count = every answered request.
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix("forkscope_http_request_duration_seconds_bucket{le=\"")?
                    .trim_end_matches("\"}");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.len(), 17, "16 bounds and +Inf: {s:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        let count = get(&s, "forkscope_http_request_duration_seconds_count{}");
        assert_eq!(buckets.last().map(|b| b.1), Some(count));
        assert_eq!(count, answered, "slot {slot}");
        assert!(get(&s, "forkscope_http_request_duration_seconds_sum{}") > 0.0);
        assert_eq!(get(&s, "forkscope_http_requests_in_flight{}"), 0.0);
        bytes += get(&s, "forkscope_http_response_body_bytes_total{}");
        *totals.entry("exceptions").or_default() += get(&s, "forkscope_http_exceptions_total{}");
    }
    assert_eq!(totals["2xx"], 20.0);
    assert_eq!(totals["4xx"], 6.0);
    assert_eq!(totals["5xx"], 4.0);
    assert_eq!(totals["exceptions"], 4.0);
    assert_eq!(totals["1xx"] + totals["3xx"] + totals["none"], 0.0);
    assert_eq!(
        bytes, body_bytes as f64,
        "the app's error page is the server's, not counted"
    );

    // A request in flight shows, and goes with its worker when that worker is killed; the
    // slot's counters outlive the worker.
    let addr = server.addr;
    let sleeper = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| request(addr, "GET", "/sleep?s=60", &[], b""));
    });
    let in_flight = |m: &HashMap<String, f64>, slot: u32| {
        get(
            &slot_series(m, &app, slot),
            "forkscope_http_requests_in_flight{}",
        )
    };
    let busy_slot = eventually("a request in flight", Duration::from_secs(30), || {
        let client = client.clone();
        let in_flight = &in_flight;
        async move {
            let m = parse_metrics(&client.metrics_text().await.ok()?);
            [0, 1].into_iter().find(|&s| in_flight(&m, s) == 1.0)
        }
    })
    .await;
    let before = get(
        &slot_series(&m, &app, busy_slot),
        r#"forkscope_http_requests_total{code="2xx"}"#,
    );
    let victim = server
        .workers()
        .into_iter()
        .find(|(s, _)| *s == busy_slot)
        .map(|(_, p)| p)
        .expect("the busy slot's worker");
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill");
    wait_for("the slot respawned", Duration::from_secs(60), || {
        server
            .workers()
            .iter()
            .any(|(s, p)| *s == busy_slot && *p != victim)
            .then_some(())
    });
    let _ = sleeper.join();
    eventually("the killed request gone", Duration::from_secs(30), || {
        let client = client.clone();
        let in_flight = &in_flight;
        async move {
            let m = parse_metrics(&client.metrics_text().await.ok()?);
            (in_flight(&m, busy_slot) == 0.0).then_some(())
        }
    })
    .await;
    let m = parse_metrics(&client.metrics_text().await.expect("metrics"));
    assert_eq!(
        get(
            &slot_series(&m, &app, busy_slot),
            r#"forkscope_http_requests_total{code="2xx"}"#
        ),
        before,
        "a worker's restart does not reset its slot's counters"
    );

    // The exposition as a whole passes Prometheus' own linter.
    let text = client.metrics_text().await.expect("metrics");
    let mut check = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), text.as_bytes())
        .expect("write to promtool");
    let done = check.wait_with_output().expect("promtool");
    assert!(
        done.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
}

#[tokio::test]
async fn workers_retired_by_max_requests_are_counted_as_recycles_of_their_slot() {
    let (server, app, _dir) = crate::util::unique_app_with("app", 1, &["--max-requests", "5"]);
    let sidecar = Sidecar::start(&server.runtime, &[]);
    let client = sidecar.client();
    for _ in 0..12 {
        assert_eq!(request(server.addr, "GET", "/", &[], b"").status, 200);
    }
    let series = format!(
        r#"forkscope_worker_recycles_total{{app="{app}",reason="max_requests",server="forkscope",slot="0"}}"#
    );
    let memory = series.replace("max_requests", "memory");
    // Every retirement the server logs is counted. (Usually two; a retiring worker may still
    // answer a client it accepted just before it stopped accepting, which leaves the next
    // worker short of its 5.)
    let log = server.log.clone();
    let m = eventually("the retirements counted", Duration::from_secs(30), || {
        let client = client.clone();
        let series = series.clone();
        let log = log.clone();
        async move {
            let m = parse_metrics(&client.metrics_text().await.ok()?);
            let logged = std::fs::read_to_string(&log)
                .ok()?
                .matches("Autorestarting worker after current request.")
                .count();
            #[allow(clippy::cast_precision_loss)]
            let logged = logged as f64;
            (logged >= 1.0 && m.get(&series) == Some(&logged)).then_some(m)
        }
    })
    .await;
    assert_eq!(m.get(&memory), Some(&0.0), "other reasons stay at zero");
    // 12 requests answered across three workers of slot 0: the counters are the slot's.
    let s = slot_series(&m, &app, 0);
    assert_eq!(
        get(&s, r#"forkscope_http_requests_total{code="2xx"}"#),
        12.0
    );
}
