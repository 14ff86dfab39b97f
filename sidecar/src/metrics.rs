//! Prometheus metrics. Per-process memory and CPU come from a custom [`Collector`] that reads
//! `/proc` while Prometheus scrapes, so no background sampling loop can go stale. Labels are
//! bounded: `server`, `app`, `role`, `slot`; a process's PID appears only in the
//! `forkscope_process_info` series. See docs/METRICS.md.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Gauge, GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::api::{ServerKind, SessionState};
use crate::discovery::{ProcSource, ProcessKey, Snapshot};

/// Label names of the per-process series.
const PROCESS_LABELS: [&str; 4] = ["server", "app", "role", "slot"];

/// The longest `app` label value; longer names are cut (labels stay bounded).
const MAX_APP_LABEL: usize = 64;

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("metric name and labels are constants")
}

/// Templates of every series the collector emits: `desc()` describes them and each scrape
/// fills fresh copies, so a process that exited disappears from the next scrape.
fn templates() -> Vec<(&'static str, &'static str, Vec<&'static str>)> {
    vec![
        (
            "forkscope_process_pss_bytes",
            "Proportional set size of a leader or worker (smaps_rollup Pss).",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_rss_bytes",
            "Resident set size of a leader or worker (smaps_rollup Rss).",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_uss_bytes",
            "Unique set size (Private_Clean + Private_Dirty) of a leader or worker.",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_shared_bytes",
            "Resident memory shared with other processes (Shared_Clean + Shared_Dirty).",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_swap_bytes",
            "Swapped-out memory of a leader or worker.",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_start_time_seconds",
            "Start time of a leader or worker, seconds since the Unix epoch.",
            PROCESS_LABELS.to_vec(),
        ),
        (
            "forkscope_process_info",
            "Always 1: maps the bounded labels to the process's current PID.",
            vec!["server", "app", "role", "slot", "pid"],
        ),
        (
            "forkscope_workers",
            "Workers a leader has now.",
            vec!["server", "app"],
        ),
        (
            "forkscope_sidecar_scrape_duration_seconds",
            "Time this scrape spent reading /proc.",
            vec![],
        ),
    ]
}

/// CPU time is a counter (it only grows for one process); rebuilt each scrape from `/proc`.
fn cpu_counter() -> CounterVec {
    CounterVec::new(
        Opts::new(
            "forkscope_process_cpu_seconds_total",
            "User plus system CPU time of a leader or worker, seconds.",
        ),
        &PROCESS_LABELS,
    )
    .expect("metric name and labels are constants")
}

/// `(server, app, slot)` of a restart counter.
type LabelSet = (ServerKind, String, String);

/// Counts worker restarts between scans: a forkscope-server slot whose process changed, or a
/// new gunicorn worker under a known leader whose worker count did not grow.
#[derive(Default)]
struct RestartTracker {
    slots: HashMap<(ProcessKey, u32), ProcessKey>,
    gunicorn: HashMap<ProcessKey, (HashSet<ProcessKey>, usize)>,
}

impl RestartTracker {
    /// Updates the tracker; returns `(server, app, slot)` for every restart seen, and every
    /// label set seen (so each counter exists from 0 and `increase()` sees the first restart).
    fn observe(&mut self, snap: &Snapshot) -> (Vec<LabelSet>, Vec<LabelSet>) {
        let mut restarts = Vec::new();
        let mut labels = Vec::new();
        let mut seen_slots = HashSet::new();
        let mut seen_leaders = HashSet::new();
        for l in &snap.leaders {
            let leader = l.leader.key;
            seen_leaders.insert(leader);
            match l.server {
                ServerKind::Forkscope => {
                    // During a reload a slot may briefly have two processes: track the newest.
                    let mut newest: HashMap<u32, ProcessKey> = HashMap::new();
                    for w in &l.workers {
                        let e = newest.entry(w.slot).or_insert(w.process.key);
                        if w.process.key.start_ticks > e.start_ticks {
                            *e = w.process.key;
                        }
                    }
                    for (slot, key) in newest {
                        seen_slots.insert((leader, slot));
                        labels.push((l.server, app_label(&l.app), slot.to_string()));
                        let prev = self.slots.insert((leader, slot), key);
                        if prev.is_some_and(|p| p != key) {
                            restarts.push((l.server, app_label(&l.app), slot.to_string()));
                        }
                    }
                }
                ServerKind::Gunicorn => {
                    labels.push((l.server, app_label(&l.app), String::new()));
                    let now: HashSet<ProcessKey> =
                        l.workers.iter().map(|w| w.process.key).collect();
                    if let Some((before, max)) = self.gunicorn.get(&leader) {
                        let new = now.difference(before).count();
                        let grown = now.len().saturating_sub(*max);
                        for _ in 0..new.saturating_sub(grown) {
                            restarts.push((l.server, app_label(&l.app), String::new()));
                        }
                    }
                    let max = self
                        .gunicorn
                        .get(&leader)
                        .map_or(now.len(), |(_, m)| (*m).max(now.len()));
                    self.gunicorn.insert(leader, (now, max));
                }
            }
        }
        self.slots.retain(|k, _| seen_slots.contains(k));
        self.gunicorn.retain(|k, _| seen_leaders.contains(k));
        (restarts, labels)
    }
}

fn app_label(app: &str) -> String {
    app.chars().take(MAX_APP_LABEL).collect()
}

/// The collector that reads `/proc` at scrape time.
pub struct ProcessCollector {
    source: ProcSource,
    descs: Vec<Desc>,
    restarts: IntCounterVec,
    tracker: Mutex<RestartTracker>,
}

impl ProcessCollector {
    /// A collector over `source`; worker restarts it detects are counted in `restarts`
    /// (labels `server`, `app`, `slot`).
    pub fn new(source: ProcSource, restarts: IntCounterVec) -> Self {
        let mut descs: Vec<Desc> = templates()
            .into_iter()
            .flat_map(|(name, help, labels)| {
                gauge_vec(name, help, &labels)
                    .desc()
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        descs.extend(cpu_counter().desc().into_iter().cloned());
        // The restart counter is exposed by this collector, right after the scan that updates
        // it, so a scrape never shows it one scan behind.
        descs.extend(restarts.desc().into_iter().cloned());
        Self {
            source,
            descs,
            restarts,
            tracker: Mutex::new(RestartTracker::default()),
        }
    }

    /// Reads `/proc` and renders every process series.
    fn gather(&self) -> Vec<MetricFamily> {
        let started = Instant::now();
        let snap = self.source.scan();
        let (restarts, labels) = self
            .tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(&snap);
        for (server, app, slot) in labels {
            self.restarts
                .with_label_values(&[server.as_str(), app.as_str(), slot.as_str()]);
        }
        for (server, app, slot) in restarts {
            self.restarts
                .with_label_values(&[server.as_str(), app.as_str(), slot.as_str()])
                .inc();
        }
        let vecs: Vec<GaugeVec> = templates()
            .into_iter()
            .map(|(name, help, labels)| gauge_vec(name, help, &labels))
            .collect();
        let [pss, rss, uss, shared, swap, start, info, workers, duration] = &vecs[..] else {
            unreachable!("templates() lists nine series")
        };
        let cpu = cpu_counter();
        // One series per label set: when two processes share one (a slot mid-reload), the
        // newest wins; the info metric still lists both PIDs.
        let mut emitted: HashSet<[String; 4]> = HashSet::new();
        for l in &snap.leaders {
            let app = app_label(&l.app);
            let server = l.server.as_str();
            workers
                .with_label_values(&[server, app.as_str()])
                .set(l.workers.len() as f64);
            let mut procs: Vec<(&crate::discovery::Found, &str, String)> =
                vec![(&l.leader, "leader", String::new())];
            procs.extend(
                l.workers
                    .iter()
                    .map(|w| (&w.process, "worker", w.slot.to_string())),
            );
            procs.sort_by_key(|(f, _, _)| std::cmp::Reverse(f.key.start_ticks));
            for (found, role, slot) in procs {
                let labels = [server, app.as_str(), role, slot.as_str()];
                info.with_label_values(&[
                    server,
                    app.as_str(),
                    role,
                    slot.as_str(),
                    &found.key.pid.to_string(),
                ])
                .set(1.0);
                if !emitted.insert(labels.map(str::to_owned)) {
                    continue;
                }
                cpu.with_label_values(&labels)
                    .inc_by(self.source.cpu_seconds(found.cpu_ticks));
                start
                    .with_label_values(&labels)
                    .set(self.source.started_at(found.key.start_ticks));
                if let Some(m) = self.source.memory(found.key) {
                    pss.with_label_values(&labels).set(m.pss_bytes as f64);
                    rss.with_label_values(&labels).set(m.rss_bytes as f64);
                    uss.with_label_values(&labels).set(m.uss_bytes as f64);
                    shared.with_label_values(&labels).set(m.shared_bytes as f64);
                    swap.with_label_values(&labels).set(m.swap_bytes as f64);
                }
            }
        }
        duration
            .with_label_values::<&str>(&[])
            .set(started.elapsed().as_secs_f64());
        let mut families: Vec<MetricFamily> = vecs.iter().flat_map(|v| v.collect()).collect();
        families.extend(cpu.collect());
        families.extend(self.restarts.collect());
        families
    }
}

impl Collector for ProcessCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gather()
    }
}

/// The sidecar's registry and the counters other modules update.
pub struct Metrics {
    /// Everything `/metrics` shows.
    pub registry: Registry,
    /// `forkscope_profile_sessions_total{outcome}`.
    pub sessions: IntCounterVec,
    /// `forkscope_worker_restarts_total{server,app,slot}`.
    pub restarts: IntCounterVec,
    /// `forkscope_sidecar_up`, always 1 (a liveness series).
    pub up: Gauge,
}

impl Metrics {
    /// Registers every metric, with the process collector reading from `source`.
    pub fn new(source: ProcSource) -> Self {
        let registry = Registry::new();
        let sessions = IntCounterVec::new(
            Opts::new(
                "forkscope_profile_sessions_total",
                "Profile sessions that ended, by outcome.",
            ),
            &["outcome"],
        )
        .expect("constant metric");
        for state in [
            SessionState::Completed,
            SessionState::Failed,
            SessionState::Cancelled,
            SessionState::TimedOut,
            SessionState::Orphaned,
        ] {
            sessions.with_label_values(&[state.as_str()]);
        }
        let restarts = IntCounterVec::new(
            Opts::new(
                "forkscope_worker_restarts_total",
                "Worker processes replaced under a running leader, as seen between scrapes.",
            ),
            &["server", "app", "slot"],
        )
        .expect("constant metric");
        let up = Gauge::new("forkscope_sidecar_up", "Always 1 while the sidecar serves.")
            .expect("constant metric");
        up.set(1.0);
        let collector = ProcessCollector::new(source, restarts.clone());
        for c in [
            Box::new(sessions.clone()) as Box<dyn Collector>,
            Box::new(up.clone()),
            Box::new(collector),
        ] {
            registry
                .register(c)
                .expect("each metric is registered once");
        }
        Self {
            registry,
            sessions,
            restarts,
            up,
        }
    }

    /// The text exposition of every metric.
    ///
    /// # Errors
    /// When encoding fails (never for well-formed metrics).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{Found, LeaderEntry, Title, WorkerEntry};

    fn found(pid: u32, ticks: u64) -> Found {
        Found {
            key: ProcessKey {
                pid,
                start_ticks: ticks,
            },
            ppid: 1,
            title: String::new(),
            class: Title::Other,
            cpu_ticks: 0,
        }
    }

    fn snap(server: ServerKind, workers: &[(u32, u32, u64)]) -> Snapshot {
        Snapshot {
            leaders: vec![LeaderEntry {
                server,
                app: "a:a".into(),
                leader: found(10, 1),
                workers: workers
                    .iter()
                    .map(|(slot, pid, ticks)| WorkerEntry {
                        process: found(*pid, *ticks),
                        slot: *slot,
                    })
                    .collect(),
            }],
        }
    }

    #[test]
    fn a_slot_whose_process_changed_is_a_restart_and_a_new_slot_is_not() {
        let mut t = RestartTracker::default();
        let (r, labels) = t.observe(&snap(ServerKind::Forkscope, &[(0, 11, 5), (1, 12, 5)]));
        assert!(r.is_empty());
        assert_eq!(labels.len(), 2);
        let (r, _) = t.observe(&snap(
            ServerKind::Forkscope,
            &[(0, 11, 5), (1, 13, 9), (2, 14, 9)],
        ));
        assert_eq!(r, vec![(ServerKind::Forkscope, "a:a".into(), "1".into())]);
        // Mid-reload the old and the new process of slot 0 coexist: the newest is tracked.
        let (r, _) = t.observe(&snap(
            ServerKind::Forkscope,
            &[(0, 11, 5), (0, 15, 20), (1, 13, 9), (2, 14, 9)],
        ));
        assert_eq!(r.len(), 1);
        let (r, _) = t.observe(&snap(
            ServerKind::Forkscope,
            &[(0, 15, 20), (1, 13, 9), (2, 14, 9)],
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn renders_fixture_processes_with_bounded_labels() {
        use crate::discovery::fixture::{fixture, proc, rollup};
        let root = fixture();
        let r = root.path();
        proc(
            r,
            100,
            1,
            'S',
            1000,
            &["forkscope-server: leader [web:app]"],
        );
        proc(
            r,
            101,
            100,
            'S',
            1100,
            &["forkscope-server: worker 0 [web:app]"],
        );
        // Slot 0 mid-reload: an older process still shuts down beside its replacement.
        proc(
            r,
            102,
            100,
            'S',
            900,
            &["forkscope-server: worker 0 [web:app]"],
        );
        rollup(r, 100, 2000);
        rollup(r, 101, 800);
        rollup(r, 102, 700);
        let metrics = Metrics::new(ProcSource::new(r));
        let text = metrics.render().expect("render");
        let line = |series: &str| {
            text.lines()
                .find(|l| l.starts_with(series))
                .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
                .rsplit_once(' ')
                .expect("value")
                .1
                .to_owned()
        };
        let w0 = r#"{app="web:app",role="worker",server="forkscope",slot="0"}"#;
        let leader = r#"{app="web:app",role="leader",server="forkscope",slot=""}"#;
        // The newest process of the slot is the series; both PIDs are on the info series.
        assert_eq!(
            line(&format!("forkscope_process_pss_bytes{w0}")),
            (800 * 1024).to_string()
        );
        assert_eq!(
            line(&format!("forkscope_process_rss_bytes{w0}")),
            (950 * 1024).to_string()
        );
        assert_eq!(
            line(&format!("forkscope_process_uss_bytes{w0}")),
            (800 * 1024).to_string()
        );
        assert_eq!(
            line(&format!("forkscope_process_shared_bytes{w0}")),
            (150 * 1024).to_string()
        );
        assert_eq!(
            line(&format!("forkscope_process_swap_bytes{w0}")),
            (3 * 1024).to_string()
        );
        assert_eq!(
            line(&format!("forkscope_process_pss_bytes{leader}")),
            (2000 * 1024).to_string()
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("forkscope_process_pss_bytes{"))
                .count(),
            2
        );
        for pid in [100, 101, 102] {
            assert!(text.contains(&format!(r#"pid="{pid}""#)), "{text}");
        }
        assert_eq!(
            line(r#"forkscope_workers{app="web:app",server="forkscope"}"#),
            "2"
        );
        assert_eq!(
            line(r#"forkscope_worker_restarts_total{app="web:app",server="forkscope",slot="0"}"#),
            "0"
        );
        for l in text.lines().filter(|l| l.contains("pid=")) {
            assert!(l.starts_with("forkscope_process_info{"), "{l}");
        }
    }

    #[test]
    fn gunicorn_counts_replacements_but_not_growth() {
        let mut t = RestartTracker::default();
        t.observe(&snap(ServerKind::Gunicorn, &[(0, 11, 5), (1, 12, 5)]));
        // TTIN: one more worker, nothing replaced.
        let (r, _) = t.observe(&snap(
            ServerKind::Gunicorn,
            &[(0, 11, 5), (1, 12, 5), (2, 13, 6)],
        ));
        assert!(r.is_empty());
        // HUP: all three replaced.
        let (r, _) = t.observe(&snap(
            ServerKind::Gunicorn,
            &[(0, 21, 9), (1, 22, 9), (2, 23, 9)],
        ));
        assert_eq!(r.len(), 3);
    }
}
