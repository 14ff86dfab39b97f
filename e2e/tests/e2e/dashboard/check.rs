//! The dashboard's check, shared by every test that has Prometheus scrape real sidecars: every
//! variable query and every panel target of the dashboard runs as Grafana runs it, and each
//! must show every worker (or pod, or outcome) with the values that pod's sidecar reports
//! through its own API. A target with no series, or a panel with no expectation here, fails.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, bail};
use forkscope_sidecar::api::{LeaderView, Memory, ProcessList, SessionState};

use super::grafana::{self, Dashboard, Query, Variables};
use super::prometheus::Series;
use super::scrape::{SCRAPE_SECONDS, Scraping, now};

/// How long the panels may take to agree with the sidecars (scrapes lag, a restart settles).
const AGREE: Duration = Duration::from_secs(90);

/// A pod's sidecar, as the test reaches it.
pub struct PodSidecar {
    /// The Pod's name: the `pod` label Prometheus gives its series.
    pub pod: String,
    /// A client authorised on its API.
    pub client: forkscope_sidecar::Client,
}

/// What the sidecar of one pod reports through its API.
struct PodView {
    name: String,
    leader: LeaderView,
    /// Sessions that ended, by outcome.
    outcomes: BTreeMap<&'static str, u64>,
}

impl PodView {
    fn worker(&self, slot: &str) -> Option<&Memory> {
        self.leader
            .workers
            .iter()
            .find(|w| w.slot.is_some_and(|s| s.to_string() == slot))
            .and_then(|w| w.memory.as_ref())
    }

    fn slots(&self) -> BTreeSet<String> {
        self.leader
            .workers
            .iter()
            .filter_map(|w| w.slot.map(|s| s.to_string()))
            .collect()
    }
}

async fn pod_views(sidecars: &[PodSidecar]) -> anyhow::Result<Vec<PodView>> {
    let mut views = Vec::new();
    for PodSidecar { pod, client } in sidecars {
        let ProcessList { leaders } = client.processes().await?;
        let [leader] = <[LeaderView; 1]>::try_from(leaders)
            .map_err(|l| anyhow::anyhow!("{pod}: want one leader, got {l:?}"))?;
        let mut outcomes = BTreeMap::new();
        for s in client.profiles().await?.sessions {
            if s.state.is_final() {
                *outcomes.entry(s.state.as_str()).or_default() += 1;
            }
        }
        views.push(PodView {
            name: pod.clone(),
            leader,
            outcomes,
        });
    }
    Ok(views)
}

/// The WSGI app the sidecars serve (the dashboard's `app` variable), from the first.
pub async fn app(sidecars: &[PodSidecar]) -> anyhow::Result<String> {
    let views = pod_views(sidecars.get(..1).context("a sidecar")?).await?;
    Ok(views[0].leader.app.clone())
}

/// What a panel's target must show, in terms of the sidecars' API.
enum Expect {
    /// One series per worker of every pod (labels pod, slot), its last value this.
    Worker(fn(&Memory) -> f64, Tolerance),
    /// One series per pod, its last value this.
    Pod(fn(&LeaderView) -> f64, Tolerance),
    /// One series per worker of every pod; over the range, above zero exactly for the slots
    /// the test replaced (the API does not count restarts).
    Restarts,
    /// One series per outcome, the number of sessions that ended so over all pods.
    SessionsByOutcome,
    /// One series per pod: the sidecar's scrape time, positive and under a second.
    ScrapeDuration,
    /// Series for every worker of every pod (the server's request counters, which the API does
    /// not report: a slot's series exist from its start, at zero), none for a slot that is not
    /// a worker; values not compared.
    EveryWorker,
    /// Series from another exporter (kube-state-metrics), not running here: the query must be
    /// valid; series, if any, are not checked.
    OtherExporter,
}

#[derive(Clone, Copy)]
enum Tolerance {
    /// Memory changes a little between a scrape and the API call: 2 % or 256 KiB.
    Bytes,
    /// A ratio, within 0.02.
    Ratio,
    Exact,
}

impl Tolerance {
    fn accepts(self, got: f64, want: f64) -> bool {
        let diff = (got - want).abs();
        match self {
            Tolerance::Bytes => diff <= (want.abs() * 0.02).max(256.0 * 1024.0),
            Tolerance::Ratio => diff <= 0.02,
            Tolerance::Exact => diff < 1e-9,
        }
    }
}

fn pss(m: &Memory) -> f64 {
    m.pss_bytes as f64
}

/// The expectation of each target, by panel title and refId. A target without one fails the
/// test, so a new panel cannot go unchecked.
fn expectation(q: &Query) -> Option<Expect> {
    Some(match (q.panel.as_str(), q.ref_id.as_str()) {
        ("PSS per worker", "A") => Expect::Worker(pss, Tolerance::Bytes),
        ("Workers per pod", "A") => Expect::Pod(|l| l.workers.len() as f64, Tolerance::Exact),
        ("Profile sessions by outcome", "A") => Expect::SessionsByOutcome,
        ("Private (USS) and shared memory per worker", "A") => {
            Expect::Worker(|m| m.uss_bytes as f64, Tolerance::Bytes)
        }
        ("Private (USS) and shared memory per worker", "B") => {
            Expect::Worker(|m| m.shared_bytes as f64, Tolerance::Bytes)
        }
        ("Copy-on-write sharing ratio per worker", "A") => Expect::Worker(
            |m| m.shared_bytes as f64 / m.rss_bytes as f64,
            Tolerance::Ratio,
        ),
        ("Pod PSS against the container's memory limit", "A") => Expect::Pod(
            |l| {
                let workers: u64 = l
                    .workers
                    .iter()
                    .filter_map(|w| w.memory.map(|m| m.pss_bytes))
                    .sum();
                (l.leader.memory.map_or(0, |m| m.pss_bytes) + workers) as f64
            },
            Tolerance::Bytes,
        ),
        ("Pod PSS against the container's memory limit", "B") => Expect::OtherExporter,
        ("Leader PSS", "A") => Expect::Pod(
            |l| l.leader.memory.map_or(f64::NAN, |m| m.pss_bytes as f64),
            Tolerance::Bytes,
        ),
        ("Worker restarts", "A") => Expect::Restarts,
        ("Sidecar scrape duration", "A") => Expect::ScrapeDuration,
        (
            "Requests per second per worker"
            | "Error rate per worker"
            | "p99 latency per worker"
            | "Worker recycles by reason",
            "A",
        ) => Expect::EveryWorker,
        _ => return None,
    })
}

/// The series of `result` by the values of `keys`; a key seen twice is a mismatch.
fn by_labels<'a>(
    result: &'a [Series],
    keys: &[&str],
    problems: &mut Vec<String>,
) -> BTreeMap<Vec<String>, &'a Series> {
    let mut map = BTreeMap::new();
    for s in result {
        let key: Vec<String> = keys.iter().map(|k| s.label(k).to_owned()).collect();
        if map.insert(key.clone(), s).is_some() {
            problems.push(format!("two series for {key:?}"));
        }
    }
    map
}

/// Compares one target's result with the sidecars (`restarted`: the `[pod, slot]`s whose
/// workers were replaced while Prometheus scraped); returns what disagrees.
fn compare(
    expect: &Expect,
    result: &[Series],
    views: &[PodView],
    restarted: &BTreeSet<Vec<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if result.is_empty() && !matches!(expect, Expect::OtherExporter) {
        return vec!["no series".to_owned()];
    }
    let value = |s: &Series| s.last().unwrap_or(f64::NAN);
    match expect {
        Expect::Worker(of, tolerance) => {
            let series = by_labels(result, &["pod", "slot"], &mut problems);
            let mut want_keys = BTreeSet::new();
            for view in views {
                for slot in view.slots() {
                    let key = vec![view.name.clone(), slot.clone()];
                    want_keys.insert(key.clone());
                    let Some(memory) = view.worker(&slot) else {
                        problems.push(format!("{} slot {slot}: the API has no memory", view.name));
                        continue;
                    };
                    let want = of(memory);
                    match series.get(&key) {
                        None => problems.push(format!("{key:?}: no series")),
                        Some(s) if !tolerance.accepts(value(s), want) => problems.push(format!(
                            "{key:?}: prometheus {} vs sidecar {want}",
                            value(s)
                        )),
                        Some(_) => {}
                    }
                }
            }
            for key in series.keys().filter(|k| !want_keys.contains(*k)) {
                problems.push(format!("{key:?}: a series of no worker"));
            }
        }
        Expect::Pod(of, tolerance) => {
            let series = by_labels(result, &["pod"], &mut problems);
            for view in views {
                let want = of(&view.leader);
                match series.get(&vec![view.name.clone()]) {
                    None => problems.push(format!("{}: no series", view.name)),
                    Some(s) if !tolerance.accepts(value(s), want) => problems.push(format!(
                        "{}: prometheus {} vs sidecar {want}",
                        view.name,
                        value(s)
                    )),
                    Some(_) => {}
                }
            }
            if series.len() != views.len() {
                problems.push(format!("{} series for {} pods", series.len(), views.len()));
            }
        }
        Expect::Restarts => {
            let series = by_labels(result, &["pod", "slot"], &mut problems);
            for view in views {
                for slot in view.slots() {
                    let key = vec![view.name.clone(), slot];
                    let Some(s) = series.get(&key) else {
                        problems.push(format!("{key:?}: no series"));
                        continue;
                    };
                    let max = s.max().unwrap_or(f64::NAN);
                    let restarted = restarted.contains(&key);
                    if restarted != (max >= 0.5) {
                        problems.push(format!(
                            "{key:?}: at most {max} restarts per interval, want {}",
                            if restarted { "some" } else { "none" }
                        ));
                    }
                }
            }
        }
        Expect::SessionsByOutcome => {
            let series = by_labels(result, &["outcome"], &mut problems);
            for outcome in [
                SessionState::Completed,
                SessionState::Failed,
                SessionState::Cancelled,
                SessionState::TimedOut,
                SessionState::Orphaned,
            ]
            .map(SessionState::as_str)
            {
                let want: u64 = views
                    .iter()
                    .map(|v| v.outcomes.get(outcome).copied().unwrap_or(0))
                    .sum();
                match series.get(&vec![outcome.to_owned()]) {
                    None => problems.push(format!("outcome {outcome}: no series")),
                    Some(s) if value(s) != want as f64 => problems.push(format!(
                        "outcome {outcome}: prometheus {} vs sidecars {want}",
                        value(s)
                    )),
                    Some(_) => {}
                }
            }
        }
        Expect::ScrapeDuration => {
            let series = by_labels(result, &["pod"], &mut problems);
            for view in views {
                match series.get(&vec![view.name.clone()]) {
                    None => problems.push(format!("{}: no series", view.name)),
                    Some(s) if !(value(s) > 0.0 && value(s) < 1.0) => {
                        problems.push(format!("{}: scrape took {} s", view.name, value(s)))
                    }
                    Some(_) => {}
                }
            }
        }
        Expect::EveryWorker => {
            let have: BTreeSet<Vec<String>> = result
                .iter()
                .map(|s| vec![s.label("pod").to_owned(), s.label("slot").to_owned()])
                .collect();
            let want: BTreeSet<Vec<String>> = views
                .iter()
                .flat_map(|v| v.slots().into_iter().map(|s| vec![v.name.clone(), s]))
                .collect();
            for key in want.difference(&have) {
                problems.push(format!("{key:?}: no series"));
            }
            for key in have.difference(&want) {
                problems.push(format!("{key:?}: a series of no worker"));
            }
        }
        Expect::OtherExporter => {}
    }
    problems
}

/// The dashboard's variables as a user selecting exactly these pods would set them (Grafana
/// formats a multi-value selection as a regex alternation).
fn selection(ns: &str, app: &str, views: &[PodView]) -> Variables {
    let pods: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
    Variables::default()
        .with("datasource", "prometheus")
        .with("namespace", ns)
        .with("app", app)
        .with("pod", format!("({})", pods.join("|")))
        .with("container", "app")
}

/// Runs every query of the dashboard over the whole scrape; the problems found, empty when
/// every panel agrees with the sidecars.
async fn check_dashboard(
    scraping: &Scraping,
    dashboard: &Dashboard,
    sidecars: &[PodSidecar],
    restarted: &BTreeSet<Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let (prom, ns, start) = (&scraping.prom, scraping.ns.as_str(), scraping.since);
    let views = pod_views(sidecars).await?;
    let app = views[0].leader.app.clone();
    let end = now();
    let range = end - start;
    let step = (range / 300.0).ceil().max(SCRAPE_SECONDS);
    let vars = selection(ns, &app, &views).with_time(range, step, SCRAPE_SECONDS);
    let mut problems = Vec::new();

    for var in &dashboard.variables {
        let matcher = vars.substitute(&var.matcher)?;
        let mut got = prom.label_values(&var.label, &matcher).await?;
        got.sort();
        let want: Vec<String> = match var.name.as_str() {
            "namespace" => vec![ns.to_owned()],
            "app" => vec![app.clone()],
            "pod" => {
                let mut pods: Vec<String> = views.iter().map(|v| v.name.clone()).collect();
                pods.sort();
                pods
            }
            other => bail!("variable ${other} has no expectation in this test"),
        };
        if got != want {
            problems.push(format!("variable ${}: {got:?}, want {want:?}", var.name));
        }
    }

    for q in &dashboard.queries {
        let expect = expectation(q).with_context(|| {
            format!(
                "panel {:?} target {} has no expectation in this test: add one",
                q.panel, q.ref_id
            )
        })?;
        let expr = vars.substitute(&q.expr)?;
        let result = if q.instant {
            prom.query(&expr, end).await?
        } else {
            prom.query_range(&expr, start, end, step).await?
        };
        for s in &result {
            grafana::legend(&q.legend, &s.labels)
                .with_context(|| format!("panel {:?} target {}", q.panel, q.ref_id))?;
        }
        problems.extend(
            compare(&expect, &result, &views, restarted)
                .into_iter()
                .map(|p| format!("{} / {}: {p} ({expr})", q.panel, q.ref_id)),
        );
    }
    Ok(problems)
}

/// Polls until every query of `dashboard` agrees with `sidecars` (the pods Prometheus
/// scrapes; `restarted`: the `(pod, slot)`s whose workers the test replaced after Prometheus
/// first scraped them).
///
/// # Errors
/// What still disagrees after a while, with Prometheus's log; a query Prometheus rejects.
pub async fn await_agreement(
    scraping: &Scraping,
    dashboard: &Dashboard,
    sidecars: &[PodSidecar],
    restarted: &[(&str, u32)],
) -> anyhow::Result<()> {
    let restarted: BTreeSet<Vec<String>> = restarted
        .iter()
        .map(|(pod, slot)| vec![(*pod).to_owned(), slot.to_string()])
        .collect();
    let deadline = tokio::time::Instant::now() + AGREE;
    loop {
        let problems = check_dashboard(scraping, dashboard, sidecars, &restarted).await?;
        if problems.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the dashboard disagrees with the sidecars after {AGREE:?}:\n{}\n--- prometheus log\n{}",
                problems.join("\n"),
                scraping.prom.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkscope_sidecar::api::{ProcessView, ServerKind};

    fn process(slot: Option<u32>, pss_bytes: u64) -> ProcessView {
        ProcessView {
            pid: 100 + slot.unwrap_or(0),
            start_ticks: 1,
            started_at: 0.0,
            slot,
            title: String::new(),
            cpu_seconds: 0.0,
            memory: Some(Memory {
                pss_bytes,
                rss_bytes: 2 * pss_bytes,
                uss_bytes: pss_bytes / 2,
                shared_bytes: pss_bytes,
                swap_bytes: 0,
            }),
        }
    }

    fn view() -> PodView {
        PodView {
            name: "web-a".into(),
            leader: LeaderView {
                server: ServerKind::Forkscope,
                app: "app:app".into(),
                leader: process(None, 10 << 20),
                workers: vec![process(Some(0), 20 << 20), process(Some(1), 30 << 20)],
            },
            outcomes: BTreeMap::new(),
        }
    }

    fn worker_series(slot: &str, value: f64) -> Series {
        Series {
            labels: [("pod", "web-a"), ("slot", slot)]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            samples: vec![(0.0, value)],
        }
    }

    #[test]
    fn a_query_that_returns_nothing_fails() {
        let none = BTreeSet::new();
        for expect in [
            Expect::Worker(pss, Tolerance::Bytes),
            Expect::Pod(|l| l.workers.len() as f64, Tolerance::Exact),
            Expect::Restarts,
            Expect::SessionsByOutcome,
            Expect::ScrapeDuration,
        ] {
            assert_eq!(compare(&expect, &[], &[view()], &none), ["no series"]);
        }
        assert!(compare(&Expect::OtherExporter, &[], &[view()], &none).is_empty());
    }

    #[test]
    fn every_worker_needs_its_series_with_the_sidecars_value() {
        let (none, expect) = (BTreeSet::new(), Expect::Worker(pss, Tolerance::Bytes));
        let both = [
            worker_series("0", f64::from(20 << 20)),
            worker_series("1", f64::from(30 << 20)),
        ];
        assert!(compare(&expect, &both, &[view()], &none).is_empty());
        let missing = compare(&expect, &both[..1], &[view()], &none);
        assert_eq!(missing, [r#"["web-a", "1"]: no series"#]);
        let wrong = [both[0].clone(), worker_series("1", f64::from(20 << 20))];
        assert_eq!(compare(&expect, &wrong, &[view()], &none).len(), 1);
    }
}
