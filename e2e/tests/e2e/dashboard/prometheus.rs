//! A real Prometheus server for the dashboard test: the binary in `FORKSCOPE_PROMETHEUS` (set
//! by `e2e/with-controlplane`), on 127.0.0.1 with a free port, its storage in a temporary
//! directory, killed when the handle drops; and the few calls of its HTTP API that Grafana
//! makes (instant and range queries, label values, targets).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use forkscope_e2e::wait::until;
use serde_json::Value;
use tokio::process::{Child, Command};

/// How long Prometheus may take to start and to see its targets up on a busy machine.
const READY: Duration = Duration::from_secs(90);

/// One series of a query result: its labels and its samples `(unix seconds, value)`.
#[derive(Clone, Debug)]
pub struct Series {
    /// The series' labels (`__name__` included when the query kept it).
    pub labels: BTreeMap<String, String>,
    /// Samples in time order; one for an instant query.
    pub samples: Vec<(f64, f64)>,
}

impl Series {
    /// The label `name`, or "" when the series has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// The newest sample's value.
    pub fn last(&self) -> Option<f64> {
        self.samples.last().map(|(_, v)| *v)
    }

    /// The largest value.
    pub fn max(&self) -> Option<f64> {
        self.samples.iter().map(|(_, v)| *v).reduce(f64::max)
    }
}

/// A scrape target as `/api/v1/targets` reports it.
#[derive(Clone, Debug)]
pub struct Target {
    /// Labels after relabelling.
    pub labels: BTreeMap<String, String>,
    /// `up`, `down` or `unknown`.
    pub health: String,
    /// The last scrape's error, if any.
    pub last_error: String,
}

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
    http: reqwest::Client,
}

fn program() -> PathBuf {
    std::env::var_os("FORKSCOPE_PROMETHEUS").map_or_else(|| "prometheus".into(), PathBuf::from)
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) in `dir` and waits until it is ready.
    ///
    /// # Errors
    /// When it cannot be spawned, exits (its log is in the error: a Prometheus built without
    /// Kubernetes service discovery, as Debian's package is, refuses `kubernetes_sd_configs`),
    /// or is not ready in time.
    pub async fn start(dir: &Path, config: &str) -> anyhow::Result<Self> {
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        let log = dir.join("prometheus.log");
        let file = std::fs::File::create(&log)?;
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let child = Command::new(program())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={listen}"))
            // New targets start being scraped every second, not every five (the default
            // throttle): the tests wait for a pod's first scrape.
            .arg("--scrape.discovery-reload-interval=1s")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", program().display()))?;
        let mut prom = Self {
            child,
            url: format!("http://{listen}"),
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()?,
        };
        let ready = format!("{}/-/ready", prom.url);
        let deadline = tokio::time::Instant::now() + READY;
        loop {
            if let Some(status) = prom.child.try_wait()? {
                let log = prom.log();
                let hint = if log.contains("kubernetes_sd_configs not found") {
                    "\nthis Prometheus is built without Kubernetes service discovery (Debian's \
                     package is): point FORKSCOPE_PROMETHEUS at one that has it"
                } else {
                    ""
                };
                bail!(
                    "{} exited ({status}) before it was ready:\n{log}{hint}",
                    program().display(),
                );
            }
            if matches!(prom.http.get(&ready).send().await, Ok(r) if r.status().is_success()) {
                return Ok(prom);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready after {READY:?}:\n{}",
                prom.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(format!("{}/api/v1/{path}", self.url))
            .query(params)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        ensure!(
            status.is_success() && body["status"] == "success",
            "GET /api/v1/{path} {params:?}: {status} {body}"
        );
        Ok(body["data"].clone())
    }

    /// The active scrape targets.
    ///
    /// # Errors
    /// When Prometheus does not answer.
    pub async fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let data = self.api("targets", &[("state", "active".into())]).await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| Target {
                labels: string_map(&t["labels"]),
                health: t["health"].as_str().unwrap_or_default().to_owned(),
                last_error: t["lastError"].as_str().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// Waits until the targets of exactly the pods `pods` are up, each scraped at least once.
    ///
    /// # Errors
    /// On timeout, with the targets as Prometheus sees them and its log.
    pub async fn await_targets(&self, pods: &[&str]) -> anyhow::Result<()> {
        let mut want: Vec<String> = pods.iter().map(|p| (*p).to_owned()).collect();
        want.sort();
        let seen = until("prometheus targets up", READY, || async {
            let targets = self
                .targets()
                .await
                .map_err(|e| forkscope_e2e::Error::Spawn {
                    program: "GET /api/v1/targets".into(),
                    source: std::io::Error::other(e),
                })?;
            let mut up: Vec<String> = targets
                .iter()
                .filter(|t| t.health == "up")
                .filter_map(|t| t.labels.get("pod").cloned())
                .collect();
            up.sort();
            Ok((up == want).then_some(()))
        })
        .await;
        if seen.is_err() {
            let targets: Vec<String> = self
                .targets()
                .await?
                .iter()
                .map(|t| format!("{:?}: {} {}", t.labels, t.health, t.last_error))
                .collect();
            bail!(
                "the targets of {want:?} never were all up:\n{}\n--- prometheus log\n{}",
                targets.join("\n"),
                self.log()
            );
        }
        Ok(())
    }

    /// An instant query at `time` (unix seconds).
    ///
    /// # Errors
    /// A query Prometheus rejects, or no answer.
    pub async fn query(&self, expr: &str, time: f64) -> anyhow::Result<Vec<Series>> {
        let data = self
            .api(
                "query",
                &[("query", expr.to_owned()), ("time", time.to_string())],
            )
            .await?;
        parse_result(&data).with_context(|| format!("query {expr}"))
    }

    /// A range query from `start` to `end` (unix seconds) every `step` seconds, as a Grafana
    /// time-series panel runs it.
    ///
    /// # Errors
    /// A query Prometheus rejects, or no answer.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> anyhow::Result<Vec<Series>> {
        let data = self
            .api(
                "query_range",
                &[
                    ("query", expr.to_owned()),
                    ("start", start.to_string()),
                    ("end", end.to_string()),
                    ("step", step.to_string()),
                ],
            )
            .await?;
        parse_result(&data).with_context(|| format!("query_range {expr}"))
    }

    /// `label_values(MATCH, LABEL)` as Grafana's variable query runs it.
    ///
    /// # Errors
    /// A matcher Prometheus rejects, or no answer.
    pub async fn label_values(&self, label: &str, matcher: &str) -> anyhow::Result<Vec<String>> {
        let data = self
            .api(
                &format!("label/{label}/values"),
                &[("match[]", matcher.to_owned())],
            )
            .await?;
        Ok(data
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect()
}

fn sample(v: &Value) -> anyhow::Result<(f64, f64)> {
    let time = v[0].as_f64().context("sample time")?;
    let value = v[1]
        .as_str()
        .context("sample value")?
        .parse()
        .context("a number")?;
    Ok((time, value))
}

fn parse_result(data: &Value) -> anyhow::Result<Vec<Series>> {
    let kind = data["resultType"].as_str().unwrap_or_default();
    let result = data["result"].as_array().context("result")?;
    match kind {
        "vector" => result
            .iter()
            .map(|s| {
                Ok(Series {
                    labels: string_map(&s["metric"]),
                    samples: vec![sample(&s["value"])?],
                })
            })
            .collect(),
        "matrix" => result
            .iter()
            .map(|s| {
                Ok(Series {
                    labels: string_map(&s["metric"]),
                    samples: s["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(sample)
                        .collect::<anyhow::Result<_>>()?,
                })
            })
            .collect(),
        other => bail!("unexpected result type {other:?}: {data}"),
    }
}
