//! Every query of every panel of the Grafana dashboards, evaluated by a [`Prometheus`] with
//! the template variables substituted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::{Prometheus, items, repo_root};

/// A query of a dashboard panel and what it returned.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// The dashboard's file name.
    pub dashboard: String,
    pub panel: String,
    /// The query as written in the dashboard.
    pub expr: String,
    /// The query as evaluated (template variables substituted).
    pub evaluated: String,
    /// Series returned.
    pub series: usize,
    /// Prometheus' error, if the query failed.
    pub error: Option<String>,
}

/// The Grafana dashboards (`*.json`) in `dir` (`deploy/grafana/dashboards` by default),
/// sorted.
pub fn dashboard_files(dir: Option<&Path>) -> anyhow::Result<Vec<PathBuf>> {
    let dir = dir.map_or_else(
        || repo_root().join("deploy/grafana/dashboards"),
        Path::to_path_buf,
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files)
}

impl Prometheus {
    /// Evaluates every query of every panel of the dashboard `file` (Grafana JSON), template
    /// variables substituted ([`Self::variables`]).
    pub async fn evaluate_dashboard(&self, file: &Path) -> anyhow::Result<Vec<PanelQuery>> {
        self.evaluate_dashboard_over(file, None).await
    }

    /// [`Self::evaluate_dashboard`], evaluated now (`None`) or over a stretch of time
    /// (`Some((from, to))`: a range query with about 200 steps, as a dashboard's graph does;
    /// a query counts the series that had a value at any step).
    pub async fn evaluate_dashboard_over(
        &self,
        file: &Path,
        range: Option<(std::time::SystemTime, std::time::SystemTime)>,
    ) -> anyhow::Result<Vec<PanelQuery>> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        let dash: Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", file.display()))?;
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let vars = self.variables(&dash).await;
        let mut panels = Vec::new();
        collect_panels(&dash["panels"], &mut panels);
        let mut out = Vec::new();
        for p in panels {
            let title = p["title"].as_str().unwrap_or("(untitled)").to_string();
            for t in items(&p["targets"]) {
                let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) else {
                    continue;
                };
                let evaluated = substitute(expr, &vars);
                let result = match range {
                    None => self.query(&evaluated).await.map(|s| s.len()),
                    Some((from, to)) => {
                        let span = to.duration_since(from).unwrap_or_default();
                        let step = (span / 200).max(self.interval());
                        self.query_range(&evaluated, from, to, step)
                            .await
                            .map(|s| s.len())
                    }
                };
                let (series, error) = match result {
                    Ok(n) => (n, None),
                    Err(e) => (0, Some(format!("{e:#}"))),
                };
                out.push(PanelQuery {
                    dashboard: name.clone(),
                    panel: title.clone(),
                    expr: expr.to_string(),
                    evaluated,
                    series,
                    error,
                });
            }
        }
        Ok(out)
    }

    /// Every query of every dashboard in `dir` (`deploy/grafana/dashboards` by default) that
    /// returns no series or fails.
    pub async fn empty_panels(&self, dir: Option<&Path>) -> anyhow::Result<Vec<PanelQuery>> {
        let files = dashboard_files(dir)?;
        let mut empty = Vec::new();
        for f in files {
            empty.extend(
                self.evaluate_dashboard(&f)
                    .await?
                    .into_iter()
                    .filter(|q| q.series == 0 || q.error.is_some()),
            );
        }
        Ok(empty)
    }

    /// Values for a dashboard's template variables: Grafana's built-ins (`$__rate_interval` is
    /// four scrape intervals, `$__interval` one, `$__range` five minutes), then each variable of
    /// `templating.list`: its current value, else the first value Prometheus has for a
    /// `label_values(…)` query, else the first of a custom list, else `.*`.
    pub async fn variables(&self, dash: &Value) -> BTreeMap<String, String> {
        let secs = self.interval.as_secs().max(1);
        let mut vars: BTreeMap<String, String> = [
            ("__rate_interval", format!("{}s", 4 * secs)),
            ("__interval", format!("{secs}s")),
            ("__interval_ms", format!("{}", secs * 1000)),
            ("__range", "5m".to_string()),
            ("__range_s", "300".to_string()),
            ("__range_ms", "300000".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for v in items(&dash["templating"]["list"]) {
            let Some(name) = v["name"].as_str() else {
                continue;
            };
            let current = match &v["current"]["value"] {
                Value::String(s) => Some(s.clone()),
                Value::Array(a) => a.first().and_then(|x| x.as_str()).map(str::to_string),
                _ => None,
            }
            .filter(|s| !s.is_empty() && s != "$__all");
            let value = match current {
                Some(c) => c,
                None => self.variable_default(v).await,
            };
            vars.insert(name.to_string(), value);
        }
        vars
    }

    async fn variable_default(&self, v: &Value) -> String {
        let query = match &v["query"] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("query")
                .and_then(|q| q.as_str())
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        if let Some(args) = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let (selector, label) = match args.rsplit_once(',') {
                Some((sel, label)) => (Some(sel.trim()), label.trim()),
                None => (None, args.trim()),
            };
            if let Ok(values) = self.label_values(label, selector).await
                && let Some(first) = values.into_iter().next()
            {
                return first;
            }
        } else if (v["type"] == "custom" || v["type"] == "constant")
            && let Some(first) = query.split(',').map(str::trim).find(|s| !s.is_empty())
        {
            return first.to_string();
        }
        v["allValue"].as_str().unwrap_or(".*").to_string()
    }
}

/// Panels, rows' panels included.
fn collect_panels<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
    for p in items(panels) {
        if p.get("targets").is_some() {
            out.push(p);
        }
        collect_panels(&p["panels"], out);
    }
}

/// `expr` with Grafana's variable syntaxes (`$name`, `${name}`, `${name:format}`, `[[name]]`)
/// replaced by `vars`; unknown names are left as they are.
pub fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if let Some(inner) = tail.strip_prefix("${") {
            match inner.find('}') {
                Some(end) => (inner[..end].split(':').next().unwrap_or(""), end + 3),
                None => ("", 0),
            }
        } else if let Some(inner) = tail.strip_prefix("[[") {
            match inner.find("]]") {
                Some(end) => (inner[..end].split(':').next().unwrap_or(""), end + 4),
                None => ("", 0),
            }
        } else if let Some(inner) = tail.strip_prefix('$') {
            let end = inner.find(|c: char| !is_name(c)).unwrap_or(inner.len());
            (&inner[..end], end + 1)
        } else {
            ("", 0)
        };
        match vars.get(name) {
            Some(v) if len > 0 => {
                out.push_str(v);
                rest = &tail[len..];
            }
            _ => {
                // Not a variable: keep the character and go on after it.
                let c = tail.chars().next().map_or(1, char::len_utf8);
                out.push_str(&tail[..c]);
                rest = &tail[c..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_grafana_variables() {
        let vars: BTreeMap<String, String> = [
            ("__rate_interval", "8s"),
            ("job", "walrelay-producer"),
            ("instance", "127.0.0.1:9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            substitute(
                r#"rate(x{job="$job",instance=~"${instance:regex}"}[$__rate_interval]) [[job]] $unknown $"#,
                &vars
            ),
            r#"rate(x{job="walrelay-producer",instance=~"127.0.0.1:9"}[8s]) walrelay-producer $unknown $"#
        );
        assert_eq!(substitute("a[5m]", &vars), "a[5m]");
    }
}
