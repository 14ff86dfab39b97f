//! Reading the Grafana dashboard JSON the way Grafana runs it: its panels' PromQL targets with
//! the template variables and the built-in interval variables substituted, its `label_values`
//! variable queries, and legends rendered from a series' labels.

use std::collections::BTreeMap;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// The dashboard as committed.
pub const PATH: &str = "charts/forkscope/dashboards/forkscope.json";

/// One PromQL target of a panel.
#[derive(Clone, Debug)]
pub struct Query {
    /// The panel's title.
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// PromQL, with variables still in it.
    pub expr: String,
    /// The legend format (`{{pod}} slot {{slot}}`).
    pub legend: String,
    /// Grafana runs it as an instant query (else a range query).
    pub instant: bool,
}

/// A `label_values(MATCH, LABEL)` template variable.
#[derive(Clone, Debug)]
pub struct LabelValues {
    /// The variable's name.
    pub name: String,
    /// The series matcher, with variables still in it.
    pub matcher: String,
    /// The label whose values it lists.
    pub label: String,
}

/// The parts of the dashboard the test runs.
pub struct Dashboard {
    /// Every target of every panel, in panel order.
    pub queries: Vec<Query>,
    /// Every query variable.
    pub variables: Vec<LabelValues>,
}

impl Dashboard {
    /// Reads and checks the dashboard's shape: a Prometheus datasource variable used by
    /// every panel and target, and only `label_values` query variables.
    ///
    /// # Errors
    /// An unreadable file or a dashboard Grafana would not run as the test expects.
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        Self::parse(&std::fs::read_to_string(path)?).with_context(|| format!("{}", path.display()))
    }

    /// As [`Dashboard::load`], from the JSON text (the chart's ConfigMap holds it).
    ///
    /// # Errors
    /// Invalid JSON or a dashboard Grafana would not run as the test expects.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let json: Value = serde_json::from_str(text)?;
        let datasource = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
        let variables_json = json["templating"]["list"]
            .as_array()
            .context("templating.list")?;
        ensure!(
            variables_json.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "the dashboard needs a datasource variable of type prometheus"
        );
        let mut variables = Vec::new();
        for v in variables_json.iter().filter(|v| v["type"] == "query") {
            let name = v["name"].as_str().context("variable name")?.to_owned();
            ensure!(v["datasource"] == datasource, "variable {name}: datasource");
            let definition = v["definition"].as_str().context("definition")?;
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|s| s.strip_suffix(')'))
                .with_context(|| format!("variable {name}: not label_values(..): {definition}"))?;
            let (matcher, label) = inner
                .rsplit_once(',')
                .with_context(|| format!("variable {name}: {definition}"))?;
            variables.push(LabelValues {
                name,
                matcher: matcher.trim().to_owned(),
                label: label.trim().to_owned(),
            });
        }
        let mut queries = Vec::new();
        for panel in json["panels"].as_array().context("panels")? {
            let title = panel["title"].as_str().context("panel title")?.to_owned();
            ensure!(
                panel["datasource"] == datasource,
                "panel {title}: datasource"
            );
            for t in panel["targets"].as_array().context("targets")? {
                ensure!(
                    t["datasource"] == datasource,
                    "panel {title}: target datasource"
                );
                queries.push(Query {
                    panel: title.clone(),
                    ref_id: t["refId"].as_str().context("refId")?.to_owned(),
                    expr: t["expr"].as_str().context("expr")?.to_owned(),
                    legend: t["legendFormat"].as_str().unwrap_or_default().to_owned(),
                    instant: t["instant"].as_bool().unwrap_or(false),
                });
            }
        }
        Ok(Self { queries, variables })
    }
}

/// Values of the variables, as Grafana interpolates them into PromQL.
#[derive(Clone, Debug, Default)]
pub struct Variables(BTreeMap<String, String>);

impl Variables {
    /// Sets `$name` to `value` (already formatted: a regex such as `(a|b)` for a multi-value).
    #[must_use]
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.to_owned(), value.into());
        self
    }

    /// Grafana's built-ins for a panel over `range_seconds` with a `step_seconds` interval and
    /// a data source whose scrape interval is `scrape_seconds`: `$__interval` = the step,
    /// `$__range`, and `$__rate_interval` = max(step + scrape, 4 × scrape).
    #[must_use]
    pub fn with_time(self, range_seconds: f64, step_seconds: f64, scrape_seconds: f64) -> Self {
        let secs = |s: f64| format!("{}s", s.ceil() as u64);
        let rate = (step_seconds + scrape_seconds).max(4.0 * scrape_seconds);
        self.with("__interval", secs(step_seconds))
            .with("__range", secs(range_seconds))
            .with("__rate_interval", secs(rate))
    }

    /// `text` with every `$name` and `${name}` replaced.
    ///
    /// # Errors
    /// When a variable is left that has no value.
    pub fn substitute(&self, text: &str) -> anyhow::Result<String> {
        let mut out = text.to_owned();
        // Longest names first, so `$__range` never eats part of a longer name.
        let mut names: Vec<&String> = self.0.keys().collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for name in names {
            let value = &self.0[name];
            out = out.replace(&format!("${{{name}}}"), value);
            out = out.replace(&format!("${name}"), value);
        }
        if out.contains('$') {
            bail!("a variable without a value in {out}");
        }
        Ok(out)
    }
}

/// The legend Grafana shows for a series with `labels`: `{{label}}` replaced by its value.
///
/// # Errors
/// When the legend names a label the series does not have (Grafana would show a blank).
pub fn legend(format: &str, labels: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = format;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").context("an unclosed {{ in a legend")?;
        let name = after[..close].trim();
        let value = labels
            .get(name)
            .with_context(|| format!("legend {format:?}: the series has no label {name}"))?;
        out.push_str(value);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_variables_and_builtins() {
        let vars = Variables::default()
            .with("pod", "(a|b)")
            .with("namespace", "ns")
            .with_time(600.0, 2.0, 1.0);
        let expr = vars
            .substitute(
                r#"increase(x{namespace=~"$namespace", pod=~"${pod}"}[$__rate_interval]) / $__range"#,
            )
            .expect("all known");
        assert_eq!(
            expr,
            r#"increase(x{namespace=~"ns", pod=~"(a|b)"}[4s]) / 600s"#
        );
        assert!(vars.substitute("$unknown").is_err());
    }

    #[test]
    fn legends_need_their_labels() {
        let labels = BTreeMap::from([
            ("pod".to_owned(), "web-a".to_owned()),
            ("slot".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(
            legend("{{pod}} slot {{slot}}", &labels).expect("both present"),
            "web-a slot 1"
        );
        assert!(legend("{{pod}} {{outcome}}", &labels).is_err());
    }
}
