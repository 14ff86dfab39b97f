//! Prometheus metrics. Per-process memory and CPU come from a custom [`Collector`] that reads
//! `/proc` while Prometheus scrapes, so no background sampling loop can go stale. Labels are
//! bounded: `server`, `app`, `role`, `slot`; a process's PID appears only in the
//! `forkscope_process_info` series. See docs/METRICS.md.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
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

/// How many slots of one leader are tracked for restarts (the scale API's own bound); a title
/// that names a slot beyond the first this many of a leader gets no restart series.
const MAX_TRACKED_SLOTS: usize = 1024;

/// Counts worker restarts between scans: a forkscope-server slot whose process changed, or a
/// new gunicorn worker under a known leader whose worker count did not grow.
///
/// A slot is remembered while its leader lives, so a scan that falls between a worker's death
/// and its replacement still counts the restart; everything about a leader is forgotten (and
/// its series dropped) when the leader goes, so the series stay bounded by what runs now.
#[derive(Default)]
struct RestartTracker {
    slots: HashMap<(ProcessKey, u32), (ProcessKey, LabelSet)>,
    gunicorn: HashMap<ProcessKey, (HashSet<ProcessKey>, usize, LabelSet)>,
}

impl RestartTracker {
    /// Updates the tracker; returns `(server, app, slot)` for every restart seen, and every
    /// label set tracked now (so each counter exists from 0 and `increase()` sees the first
    /// restart; any other label set is stale).
    fn observe(&mut self, snap: &Snapshot) -> (Vec<LabelSet>, HashSet<LabelSet>) {
        let mut restarts = Vec::new();
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
                    let mut newest: Vec<(u32, ProcessKey)> = newest.into_iter().collect();
                    newest.sort();
                    let mut tracked = self.slots.keys().filter(|(k, _)| *k == leader).count();
                    for (slot, key) in newest {
                        let labels = (l.server, app_label(&l.app), slot.to_string());
                        match self.slots.get_mut(&(leader, slot)) {
                            Some((prev, _)) if *prev != key => {
                                restarts.push(labels);
                                *prev = key;
                            }
                            Some(_) => {}
                            None if tracked < MAX_TRACKED_SLOTS => {
                                tracked += 1;
                                self.slots.insert((leader, slot), (key, labels));
                            }
                            None => {}
                        }
                    }
                }
                ServerKind::Gunicorn => {
                    let labels = (l.server, app_label(&l.app), String::new());
                    let now: HashSet<ProcessKey> =
                        l.workers.iter().map(|w| w.process.key).collect();
                    let max = match self.gunicorn.get(&leader) {
                        Some((before, max, _)) => {
                            let new = now.difference(before).count();
                            let grown = now.len().saturating_sub(*max);
                            for _ in 0..new.saturating_sub(grown) {
                                restarts.push(labels.clone());
                            }
                            (*max).max(now.len())
                        }
                        None => now.len(),
                    };
                    self.gunicorn.insert(leader, (now, max, labels));
                }
            }
        }
        self.slots
            .retain(|(leader, _), _| seen_leaders.contains(leader));
        self.gunicorn.retain(|k, _| seen_leaders.contains(k));
        let labels = self
            .slots
            .values()
            .map(|(_, l)| l.clone())
            .chain(self.gunicorn.values().map(|(_, _, l)| l.clone()))
            .collect();
        (restarts, labels)
    }
}

fn app_label(app: &str) -> String {
    app.chars().take(MAX_APP_LABEL).collect()
}

/// The collector that reads `/proc` at scrape time.
pub struct ProcessCollector {
    source: ProcSource,
    /// Where the leaders' request counters are (`None`: no request metrics).
    runtime: Option<forkscope_protocol::RuntimeDir>,
    descs: Vec<Desc>,
    restarts: IntCounterVec,
    /// Held across the whole scan and update, so concurrent gathers update the tracker in the
    /// order of their scans.
    tracker: Mutex<Tracked>,
}

/// The restart tracker and the restart series it has exposed.
#[derive(Default)]
struct Tracked {
    tracker: RestartTracker,
    exposed: HashSet<LabelSet>,
}

impl ProcessCollector {
    /// A collector over `source`; worker restarts it detects are counted in `restarts`
    /// (labels `server`, `app`, `slot`).
    pub fn new(
        source: ProcSource,
        runtime: Option<forkscope_protocol::RuntimeDir>,
        restarts: IntCounterVec,
    ) -> Self {
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
            runtime,
            descs,
            restarts,
            tracker: Mutex::new(Tracked::default()),
        }
    }

    /// Reads `/proc` and renders every process series.
    fn gather(&self) -> Vec<MetricFamily> {
        let started = Instant::now();
        let snap = {
            let mut tracked = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
            let snap = self.source.scan();
            let (restarts, labels) = tracked.tracker.observe(&snap);
            let values = |(server, app, slot): &LabelSet| {
                [server.as_str(), app.as_str(), slot.as_str()].map(str::to_owned)
            };
            for gone in tracked.exposed.difference(&labels) {
                let v = values(gone);
                let _ = self.restarts.remove_label_values(&[&v[0], &v[1], &v[2]]);
            }
            for l in &labels {
                let v = values(l);
                self.restarts.with_label_values(&[&v[0], &v[1], &v[2]]);
            }
            for l in &restarts {
                let v = values(l);
                self.restarts
                    .with_label_values(&[&v[0], &v[1], &v[2]])
                    .inc();
            }
            tracked.exposed = labels;
            snap
        };
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
        if let Some(runtime) = &self.runtime {
            families.extend(crate::request_metrics::families(runtime, &snap, app_label));
        }
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

/// How long a rendered scrape is served as is.
pub const SCRAPE_FRESH: Duration = Duration::from_secs(1);

/// How long a rendered scrape may still be served while a newer one is read in the background;
/// a request that finds only an older one waits for a fresh read.
pub const SCRAPE_STALE: Duration = Duration::from_secs(10);

/// One rendered scrape.
#[derive(Clone)]
struct Rendered {
    /// When the `/proc` read that produced it began.
    at: Instant,
    text: Bytes,
}

/// Shares `/proc` reads between concurrent `/metrics` requests: at most one read runs at a
/// time, its text is reused while fresh, and a stale text is served while the next read runs
/// in the background. The sidecar's own CPU then follows its cadence ([`SCRAPE_FRESH`]), not
/// how often or how many clients scrape.
#[derive(Default)]
struct Scrapes {
    latest: Mutex<Option<Rendered>>,
    /// Held by the one read in flight.
    flight: tokio::sync::Mutex<()>,
    /// `/proc` reads made for `/metrics` so far.
    reads: std::sync::atomic::AtomicU64,
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
    scrapes: Scrapes,
}

impl Metrics {
    /// Registers every metric, with the process collector reading from `source` and the
    /// leaders' request counters from `runtime`.
    pub fn new(source: ProcSource, runtime: Option<forkscope_protocol::RuntimeDir>) -> Self {
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
        let collector = ProcessCollector::new(source, runtime, restarts.clone());
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
            scrapes: Scrapes::default(),
        }
    }

    /// The text exposition of every metric, read now (on the calling thread: it blocks on
    /// `/proc`).
    ///
    /// # Errors
    /// When encoding fails (never for well-formed metrics).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }

    /// The text `/metrics` serves: shared between concurrent requests and cached briefly (see
    /// [`SCRAPE_FRESH`] and [`SCRAPE_STALE`]); the `/proc` read runs on the blocking pool.
    ///
    /// # Errors
    /// When encoding fails, or the read panicked.
    pub async fn scrape(self: &Arc<Self>) -> Result<Bytes, String> {
        let now = Instant::now();
        let latest = self.latest();
        if let Some(r) = latest {
            let age = now.saturating_duration_since(r.at);
            if age < SCRAPE_FRESH {
                return Ok(r.text);
            }
            if age < SCRAPE_STALE {
                if let Ok(flight) = self.scrapes.flight.try_lock() {
                    drop(flight);
                    let this = self.clone();
                    tokio::spawn(async move { this.read_shared(Instant::now()).await });
                }
                return Ok(r.text);
            }
        }
        // Read in a task of its own, so a client that goes away does not waste the read.
        let this = self.clone();
        tokio::spawn(async move { this.read_shared(now).await })
            .await
            .map_err(|e| e.to_string())?
    }

    fn latest(&self) -> Option<Rendered> {
        self.scrapes
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A text fresh for a request that arrived at `arrival`: the one the read in flight
    /// produces, or a new one.
    async fn read_shared(self: Arc<Self>, arrival: Instant) -> Result<Bytes, String> {
        let _flight = self.scrapes.flight.lock().await;
        if let Some(r) = self.latest().filter(|r| r.at + SCRAPE_FRESH > arrival) {
            return Ok(r.text);
        }
        let at = Instant::now();
        self.scrapes
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let this = self.clone();
        let text: Bytes = tokio::task::spawn_blocking(move || this.render())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .into();
        *self
            .scrapes
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Rendered {
            at,
            text: text.clone(),
        });
        Ok(text)
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
        use crate::discovery::fixture::{one_leader, proc, rollup};
        let root = one_leader("web:app");
        let r = root.path();
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
        rollup(r, 102, 700);
        let metrics = Metrics::new(ProcSource::new(r), None);
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

    /// Issue 14: a scan between a worker's death and its replacement made the tracker forget
    /// the slot, so the restart was never counted.
    #[test]
    fn a_slot_missing_from_one_scan_still_counts_its_restart() {
        let mut t = RestartTracker::default();
        t.observe(&snap(ServerKind::Forkscope, &[(0, 11, 5), (1, 12, 5)]));
        let (r, labels) = t.observe(&snap(ServerKind::Forkscope, &[(1, 12, 5)]));
        assert!(r.is_empty());
        assert_eq!(
            labels.len(),
            2,
            "slot 0 keeps its series while its leader lives"
        );
        let (r, _) = t.observe(&snap(ServerKind::Forkscope, &[(0, 13, 9), (1, 12, 5)]));
        assert_eq!(r, vec![(ServerKind::Forkscope, "a:a".into(), "0".into())]);
    }

    /// Issue 14: a series for every (app, slot) ever seen, slots taken from titles.
    #[test]
    fn restart_series_are_bounded_by_the_leaders_that_run() {
        let mut t = RestartTracker::default();
        let many: Vec<(u32, u32, u64)> = (0..3000).map(|i| (i, 1000 + i, 5)).collect();
        let (_, labels) = t.observe(&snap(ServerKind::Forkscope, &many));
        assert_eq!(labels.len(), MAX_TRACKED_SLOTS);
        let (_, labels) = t.observe(&Snapshot { leaders: vec![] });
        assert!(labels.is_empty());
    }

    #[test]
    fn a_gone_leader_takes_its_restart_series_along() {
        let root = crate::discovery::fixture::one_leader("gone:app");
        let r = root.path();
        let metrics = Metrics::new(ProcSource::new(r), None);
        let series = r#"forkscope_worker_restarts_total{app="gone:app""#;
        assert!(metrics.render().expect("render").contains(series));
        std::fs::remove_dir_all(r.join("100")).expect("leader gone");
        std::fs::remove_dir_all(r.join("101")).expect("worker gone");
        assert!(!metrics.render().expect("render").contains(series));
    }

    #[tokio::test]
    async fn concurrent_scrapes_share_one_read() {
        let root = crate::discovery::fixture::one_leader("web:app");
        let r = root.path();
        let metrics = Arc::new(Metrics::new(ProcSource::new(r), None));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let m = metrics.clone();
            set.spawn(async move { m.scrape().await.expect("scrape") });
        }
        let texts: Vec<Bytes> = set.join_all().await;
        assert!(texts.iter().all(|t| *t == texts[0]));
        // One read shared by every request in flight.
        let reads = metrics
            .scrapes
            .reads
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reads, 1, "16 concurrent scrapes");
        assert!(String::from_utf8_lossy(&texts[0]).contains("forkscope_workers"));
    }
}
