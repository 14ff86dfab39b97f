//! The operator's Prometheus metrics (prefix `forkscope_operator_`), served on `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use crate::crd::Phase;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Counters and histograms, cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    reconciles: IntCounterVec,
    reconcile_seconds: HistogramVec,
    requests: IntGaugeVec,
    status_writes: prometheus::IntCounter,
    sidecar_calls: IntCounterVec,
    sidecar_seconds: HistogramVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    ///
    /// # Panics
    /// Never in practice: the metric definitions are static and valid.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "forkscope_operator_reconciles_total",
                "Reconciles of ProfileRequests, by result (ok, error).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "forkscope_operator_reconcile_duration_seconds",
                "Time one reconcile of a ProfileRequest took.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &[],
        )
        .expect("valid metric");
        let requests = IntGaugeVec::new(
            Opts::new(
                "forkscope_operator_requests",
                "ProfileRequests known to the operator, by phase.",
            ),
            &["phase"],
        )
        .expect("valid metric");
        let status_writes = prometheus::IntCounter::new(
            "forkscope_operator_status_writes_total",
            "Status writes to ProfileRequests.",
        )
        .expect("valid metric");
        let sidecar_calls = IntCounterVec::new(
            Opts::new(
                "forkscope_operator_sidecar_calls_total",
                "Calls to sidecars, by call (start, get, list, cancel) and result (ok, busy, not_found, unreachable, rejected, failed).",
            ),
            &["call", "result"],
        )
        .expect("valid metric");
        let sidecar_seconds = HistogramVec::new(
            HistogramOpts::new(
                "forkscope_operator_sidecar_call_duration_seconds",
                "Latency of calls to sidecars, by call.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["call"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_seconds.clone()),
            Box::new(requests.clone()),
            Box::new(status_writes.clone()),
            Box::new(sidecar_calls.clone()),
            Box::new(sidecar_seconds.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        // Every phase's series exists from the start.
        for phase in Phase::ALL {
            requests.with_label_values(&[phase.as_str()]).set(0);
        }
        Self {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                reconcile_seconds,
                requests,
                status_writes,
                sidecar_calls,
                sidecar_seconds,
            }),
        }
    }

    /// Counts one reconcile and its duration.
    pub fn reconciled(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.inner.reconciles.with_label_values(&[result]).inc();
        self.inner
            .reconcile_seconds
            .with_label_values(&[] as &[&str])
            .observe(took.as_secs_f64());
    }

    /// Counts one status write.
    pub fn status_written(&self) {
        self.inner.status_writes.inc();
    }

    /// Counts one sidecar call.
    pub fn sidecar_call(&self, call: &str, result: &str, took: Duration) {
        self.inner
            .sidecar_calls
            .with_label_values(&[call, result])
            .inc();
        self.inner
            .sidecar_seconds
            .with_label_values(&[call])
            .observe(took.as_secs_f64());
    }

    /// Sets the number of requests per phase from every request's phase (zeros included).
    pub fn set_requests(&self, phases: impl IntoIterator<Item = Phase>) {
        let mut counts = [0i64; Phase::ALL.len()];
        for phase in phases {
            if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, n) in Phase::ALL.iter().zip(counts) {
            self.inner
                .requests
                .with_label_values(&[phase.as_str()])
                .set(n);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.inner.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
