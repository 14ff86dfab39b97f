//! Request metrics of forkscope-server's workers, per slot: read at scrape time from each
//! leader's counters file (`forkscope_protocol::requests`), which the workers update in shared
//! memory. The counters belong to the slot, not to the worker process, so they keep counting
//! across worker restarts and start over only with a new leader (a reset `rate()` handles).

use forkscope_protocol::RuntimeDir;
use forkscope_protocol::recycle::RecycleReason;
use forkscope_protocol::requests::{self, BUCKETS_MICROS, STATUS_CLASSES, SlotRequests};
use prometheus::core::Collector;
use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{GaugeVec, IntCounterVec, Opts};

use crate::api::ServerKind;
use crate::discovery::Snapshot;

const LABELS: [&str; 3] = ["server", "app", "slot"];

/// The series' names, for the docs and the tests.
pub const DURATION: &str = "forkscope_http_request_duration_seconds";

/// Every request-metric family for the forkscope leaders in `snap`. When two leaders serve
/// the same app (an upgrade in place), the newest one's counters are shown, as the process
/// series do; its counters start from zero, which Prometheus reads as a counter reset.
pub fn families(
    runtime: &RuntimeDir,
    snap: &Snapshot,
    app_label: impl Fn(&str) -> String,
) -> Vec<MetricFamily> {
    let requests = IntCounterVec::new(
        Opts::new(
            "forkscope_http_requests_total",
            "Requests answered by the workers of a slot, by status class (code: 1xx to 5xx, \
             or none when the client went away before a response).",
        ),
        &["server", "app", "slot", "code"],
    )
    .expect("constant metric");
    let bytes = counter(
        "forkscope_http_response_body_bytes_total",
        "Response body bytes sent by the workers of a slot.",
    );
    let exceptions = counter(
        "forkscope_http_exceptions_total",
        "Requests of a slot that ended in an exception (the app's, or a failed write).",
    );
    let recycles = IntCounterVec::new(
        Opts::new(
            "forkscope_worker_recycles_total",
            "Workers of a slot the server retired on purpose, by reason: memory \
             (--max-worker-memory), max_requests, timeout.",
        ),
        &["server", "app", "slot", "reason"],
    )
    .expect("constant metric");
    let in_flight = GaugeVec::new(
        Opts::new(
            "forkscope_http_requests_in_flight",
            "Requests the workers of a slot are running now.",
        ),
        &LABELS,
    )
    .expect("constant metric");
    let mut durations = MetricFamily::default();
    durations.set_name(DURATION.to_owned());
    durations.set_help(
        "Time from handing a request to the app until its response is written (or queued \
         for the event loop), by slot."
            .to_owned(),
    );
    durations.set_field_type(MetricType::HISTOGRAM);

    let mut leaders: Vec<_> = snap
        .leaders
        .iter()
        .filter(|l| l.server == ServerKind::Forkscope)
        .collect();
    leaders.sort_by_key(|l| std::cmp::Reverse(l.leader.key.start_ticks));
    let mut seen = std::collections::HashSet::new();
    for leader in leaders {
        let app = app_label(&leader.app);
        if !seen.insert(app.clone()) {
            continue;
        }
        let slots = match requests::read(&runtime.requests(leader.leader.key.pid)) {
            Ok(s) => s,
            Err(e) => {
                // An older server, or a runtime directory the leader could not write.
                tracing::debug!(
                    "no request metrics for leader {}: {e}",
                    leader.leader.key.pid
                );
                continue;
            }
        };
        // Every worker's slot has series from its start, at zero, so `increase()` and the
        // dashboard see a worker that has not served yet.
        let mut slots: std::collections::BTreeMap<u32, SlotRequests> =
            slots.into_iter().map(|s| (s.slot, s)).collect();
        for w in &leader.workers {
            slots.entry(w.slot).or_insert_with(|| SlotRequests {
                slot: w.slot,
                buckets: vec![0; BUCKETS_MICROS.len() + 1],
                ..SlotRequests::default()
            });
        }
        let server = leader.server.as_str();
        for s in slots.values() {
            let slot = s.slot.to_string();
            let labels = [server, app.as_str(), slot.as_str()];
            for (class, n) in STATUS_CLASSES.iter().zip(s.by_status) {
                requests
                    .with_label_values(&[server, app.as_str(), slot.as_str(), class])
                    .inc_by(n);
            }
            for (reason, n) in RecycleReason::ALL.iter().zip(s.recycles) {
                recycles
                    .with_label_values(&[server, app.as_str(), slot.as_str(), reason.as_str()])
                    .inc_by(n);
            }
            bytes.with_label_values(&labels).inc_by(s.bytes_out);
            exceptions.with_label_values(&labels).inc_by(s.exceptions);
            in_flight.with_label_values(&labels).set(s.in_flight as f64);
            durations.mut_metric().push(histogram(&labels, s));
        }
    }
    let mut out: Vec<MetricFamily> = [requests, recycles, bytes, exceptions]
        .iter()
        .flat_map(Collector::collect)
        .collect();
    out.extend(in_flight.collect());
    if !durations.get_metric().is_empty() {
        out.push(durations);
    }
    out
}

fn counter(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), &LABELS).expect("constant metric")
}

/// A Prometheus histogram from the file's per-bucket counts (cumulated here).
fn histogram(labels: &[&str; 3], s: &SlotRequests) -> Metric {
    let mut cumulative = 0;
    let buckets = BUCKETS_MICROS
        .iter()
        .zip(&s.buckets)
        .map(|(&bound, &n)| {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(bound as f64 / 1e6);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut h = Histogram::default();
    h.set_sample_count(s.count());
    h.set_sample_sum(s.duration_sum_micros as f64 / 1e6);
    h.set_bucket(buckets);
    let mut m = Metric::default();
    let [server, app, slot] = labels;
    // In name order, as the crate's own vectors write them.
    m.set_label(
        [("app", app), ("server", server), ("slot", slot)]
            .into_iter()
            .map(|(name, value)| {
                let mut l = LabelPair::default();
                l.set_name(name.to_owned());
                l.set_value((*value).to_owned());
                l
            })
            .collect(),
    );
    m.set_histogram(h);
    m
}
