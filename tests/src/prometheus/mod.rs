//! A real Prometheus server for tests, running the repository's own scrape config and alert
//! rules (`deploy/prometheus/prometheus.yml`, `deploy/prometheus/rules/*.yml`), and the
//! evaluation of every query of the Grafana dashboards in `deploy/grafana/dashboards`.
//!
//! The binary is Debian's, unpacked by `tests/services/prometheus/prometheus.sh install`. What
//! a test changes in the config, and nothing else:
//!
//! - each static target `host:port` becomes the loopback addresses the test gives for `host`
//!   (`producer`, `indexer`, `notifier` in the Compose config); a target group whose host has
//!   none is left out, its job stays (with no targets); [`Config::extra`] adds a target group
//!   (with labels) to a job for a binary the Compose config does not name;
//! - the global scrape and evaluation intervals, and any job's own scrape interval, become
//!   [`Config::interval`] (2 s), so a test sees data in seconds;
//! - rule files are the repository's, by absolute path. The rules' `for:` durations are kept:
//!   an alert with `for: 1m` fires a minute after its condition holds, as in production.
//!   [`Config::extra_rule_files`] adds files, such as a time-compressed copy of the rules
//!   ([`compress_rules`]) for runs of minutes, loaded next to the originals.
//!
//! Job names, labels and relabeling stay, so the dashboards' and rules' selectors are tested as
//! they are deployed. Alerts can be read now ([`Prometheus::alerts`]) or as a history of which
//! were pending or firing when ([`Prometheus::alert_history`], from the `ALERTS` series).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

mod config;
mod dashboards;
mod rules;

pub use config::{Config, ExtraTarget, rewrite_config};
pub use dashboards::{PanelQuery, dashboard_files, substitute};
pub use rules::{Compression, compress_rules};

/// The launcher script in this repository.
pub fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("services/prometheus/prometheus.sh")
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The folder of the `prometheus` and `promtool` binaries, installed once per process.
fn bin_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(launcher())
            .arg("install")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run prometheus.sh install: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "prometheus.sh install failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One series of an instant query: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One series of a range query.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(SystemTime, f64)>,
}

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AlertState {
    Pending,
    Firing,
}

impl AlertState {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "firing" => Some(Self::Firing),
            _ => None,
        }
    }
}

/// An active alert now (`/api/v1/alerts`).
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub name: String,
    pub state: AlertState,
    /// Labels without `alertname`.
    pub labels: BTreeMap<String, String>,
    /// When its condition began to hold (RFC 3339), as Prometheus says.
    pub active_at: String,
}

/// A stretch of time during which an alert was in one state (from the `ALERTS` series,
/// sampled at the evaluation interval).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpan {
    pub name: String,
    pub state: AlertState,
    /// Labels without `alertname` and `alertstate`.
    pub labels: BTreeMap<String, String>,
    pub from: SystemTime,
    pub to: SystemTime,
}

/// A rule group as loaded (`/api/v1/rules`).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleGroup {
    pub name: String,
    /// The rules file it comes from.
    pub file: String,
    /// Its evaluation interval.
    pub interval: Duration,
    pub rules: Vec<Rule>,
}

/// A loaded rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The alert's name, or the recorded series'.
    pub name: String,
    /// `alerting` or `recording`.
    pub kind: String,
    /// The expression as Prometheus parsed and printed it.
    pub query: String,
    /// `for:` (zero for none, and for recording rules).
    pub duration: Duration,
    pub labels: BTreeMap<String, String>,
    /// `ok`, `err` or `unknown` (not evaluated yet).
    pub health: String,
    /// The last evaluation's error, if any.
    pub last_error: String,
}

/// A running server; killed (data removed) on drop.
pub struct Prometheus {
    dir: tempfile::TempDir,
    port: u16,
    interval: Duration,
    child: Mutex<Child>,
    http: reqwest::Client,
    _watchdog: Child,
}

impl Prometheus {
    /// Starts with the repository's config, scraping `targets` (`("producer", addr)`, …), and
    /// waits until it is ready.
    pub async fn start(targets: &[(&str, std::net::SocketAddr)]) -> anyhow::Result<Self> {
        Self::start_with(Config {
            targets: targets.iter().map(|(h, a)| (h.to_string(), *a)).collect(),
            ..Config::default()
        })
        .await
    }

    /// Starts with `config` and waits until it is ready.
    pub async fn start_with(config: Config) -> anyhow::Result<Self> {
        let bin = bin_dir()?.join("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("walrelay-prometheus-")
            .tempdir()
            .context("temp dir")?;
        let yaml = rewrite_config(&config)?;
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, yaml).context("write prometheus.yml")?;
        let port = crate::free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).context("log file")?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1d")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        // Statics are never dropped: the server goes when the test binary does.
        let watchdog = crate::process::watchdog(&format!("kill -9 {} 2>/dev/null", child.id()))
            .context("start the Prometheus watchdog")?;
        let p = Self {
            dir,
            port,
            interval: config.interval,
            child: Mutex::new(child),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("HTTP client")?,
            _watchdog: watchdog,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = p.http.get(format!("{}/-/ready", p.url())).send().await
                && r.status().is_success()
            {
                tracing::info!(url = %p.url(), "Prometheus ready");
                return Ok(p);
            }
            if let Ok(Some(status)) = p.lock().try_wait() {
                bail!("Prometheus exited ({status}):\n{}", p.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("Prometheus not ready after 60 s:\n{}", p.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its HTTP address, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The scrape and evaluation interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The config it runs (targets rewritten).
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.yml")).unwrap_or_default()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn api(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let r = self
            .http
            .get(format!("{}/api/v1/{path}", self.url()))
            .query(params)
            .send()
            .await
            .with_context(|| format!("Prometheus {path}"))?;
        let body: Value = r
            .json()
            .await
            .with_context(|| format!("Prometheus {path}: not JSON"))?;
        if body["status"] != "success" {
            bail!(
                "Prometheus {path} {params:?}: {} {}",
                body["errorType"].as_str().unwrap_or(""),
                body["error"].as_str().unwrap_or("failed")
            );
        }
        Ok(body["data"].clone())
    }

    /// Evaluates `expr` now: one [`Sample`] per series (a scalar is one sample without labels;
    /// a range vector gives each series' last value).
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        let data = self.api("query", &[("query", expr.to_string())]).await?;
        let result = &data["result"];
        match data["resultType"].as_str() {
            Some("vector") => Ok(items(result)
                .iter()
                .map(|s| Sample {
                    labels: labels(&s["metric"]),
                    value: number(&s["value"][1]),
                })
                .collect()),
            Some("matrix") => Ok(items(result)
                .iter()
                .map(|s| Sample {
                    labels: labels(&s["metric"]),
                    value: items(&s["values"])
                        .last()
                        .map_or(f64::NAN, |v| number(&v[1])),
                })
                .collect()),
            Some("scalar") | Some("string") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: number(&result[1]),
            }]),
            other => bail!("query {expr}: unexpected result type {other:?}"),
        }
    }

    /// Evaluates `expr` from `start` to `end` every `step`.
    pub async fn query_range(
        &self,
        expr: &str,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> anyhow::Result<Vec<RangeSeries>> {
        let data = self
            .api(
                "query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{:.3}", unix(start))),
                    ("end", format!("{:.3}", unix(end))),
                    ("step", format!("{:.3}", step.as_secs_f64().max(0.001))),
                ],
            )
            .await?;
        Ok(items(&data["result"])
            .iter()
            .map(|s| RangeSeries {
                labels: labels(&s["metric"]),
                points: items(&s["values"])
                    .iter()
                    .map(|v| (from_unix(v[0].as_f64().unwrap_or(0.0)), number(&v[1])))
                    .collect(),
            })
            .collect())
    }

    /// Values of label `label`, of the series matching `selector` when given.
    pub async fn label_values(
        &self,
        label: &str,
        selector: Option<&str>,
    ) -> anyhow::Result<Vec<String>> {
        let params: Vec<(&str, String)> = selector
            .map(|s| vec![("match[]", s.to_string())])
            .unwrap_or_default();
        let data = self.api(&format!("label/{label}/values"), &params).await?;
        Ok(items(&data)
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }

    /// The rule groups it has loaded, with their rules.
    pub async fn rules(&self) -> anyhow::Result<Vec<RuleGroup>> {
        let data = self.api("rules", &[]).await?;
        let secs = |v: &Value| Duration::from_secs_f64(v.as_f64().unwrap_or(0.0).max(0.0));
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Ok(items(&data["groups"])
            .iter()
            .map(|g| RuleGroup {
                name: text(&g["name"]),
                file: text(&g["file"]),
                interval: secs(&g["interval"]),
                rules: items(&g["rules"])
                    .iter()
                    .map(|r| Rule {
                        name: text(&r["name"]),
                        kind: text(&r["type"]),
                        query: text(&r["query"]),
                        duration: secs(&r["duration"]),
                        labels: labels(&r["labels"]),
                        health: text(&r["health"]),
                        last_error: text(&r["lastError"]),
                    })
                    .collect(),
            })
            .collect())
    }

    /// Pending and firing alerts now.
    pub async fn alerts(&self) -> anyhow::Result<Vec<Alert>> {
        let data = self.api("alerts", &[]).await?;
        Ok(items(&data["alerts"])
            .iter()
            .filter_map(|a| {
                let mut labels = labels(&a["labels"]);
                let name = labels.remove("alertname")?;
                Some(Alert {
                    name,
                    state: AlertState::parse(a["state"].as_str()?)?,
                    labels,
                    active_at: a["activeAt"].as_str().unwrap_or_default().to_string(),
                })
            })
            .collect())
    }

    /// Waits up to `timeout` until alert `name` is in `state`; the alert, or an error listing
    /// the alerts seen last.
    pub async fn wait_alert(
        &self,
        name: &str,
        state: AlertState,
        timeout: Duration,
    ) -> anyhow::Result<Alert> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.alerts().await?;
            if let Some(a) = now.iter().find(|a| a.name == name && a.state == state) {
                return Ok(a.clone());
            }
            if Instant::now() > deadline {
                bail!("alert {name} not {state:?} within {timeout:?}; active: {now:?}");
            }
            tokio::time::sleep(self.interval / 2).await;
        }
    }

    /// Which alerts were pending or firing from `since` to `until`, as spans of time per alert,
    /// state and labels, in order of start. Resolution: the evaluation interval (a span starts
    /// at the first step at or after the evaluation that began it, so a state that began less
    /// than one interval before `until` may not show yet).
    pub async fn alert_history(
        &self,
        since: SystemTime,
        until: SystemTime,
    ) -> anyhow::Result<Vec<AlertSpan>> {
        let step = self.interval;
        let mut spans = Vec::new();
        for s in self.query_range("ALERTS", since, until, step).await? {
            let mut labels = s.labels;
            labels.remove("__name__");
            let (Some(name), Some(state)) = (
                labels.remove("alertname"),
                labels
                    .remove("alertstate")
                    .and_then(|s| AlertState::parse(&s)),
            ) else {
                continue;
            };
            let mut current: Option<(SystemTime, SystemTime)> = None;
            for (t, _) in s.points {
                current = match current {
                    // A gap of more than two steps ends a span.
                    Some((from, to)) if t.duration_since(to).unwrap_or_default() <= step * 2 => {
                        Some((from, t))
                    }
                    Some((from, to)) => {
                        spans.push(AlertSpan {
                            name: name.clone(),
                            state,
                            labels: labels.clone(),
                            from,
                            to,
                        });
                        Some((t, t))
                    }
                    None => Some((t, t)),
                };
            }
            if let Some((from, to)) = current {
                spans.push(AlertSpan {
                    name,
                    state,
                    labels,
                    from,
                    to,
                });
            }
        }
        spans.sort_by_key(|s| s.from);
        Ok(spans)
    }

    /// Waits up to `timeout` until `n` targets of `job` are up.
    pub async fn wait_up(&self, job: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let expr = format!("up{{job=\"{job}\"}} == 1");
        loop {
            let up = self.query(&expr).await?.len();
            if up >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{up} of {n} targets of {job} up after {timeout:?}");
            }
            tokio::time::sleep(self.interval / 2).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let mut c = self.lock();
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// A sample value as Prometheus writes it: a string ("1", "NaN", "+Inf").
fn number(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_f64())
        .unwrap_or(f64::NAN)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn from_unix(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_repository_rules_and_answers_queries() {
        let p = Prometheus::start(&[]).await.expect("start Prometheus");
        let rules = p.rules().await.expect("rules");
        let names: Vec<&str> = rules
            .iter()
            .flat_map(|g| &g.rules)
            .map(|r| r.name.as_str())
            .collect();
        assert!(names.contains(&"WalrelayKafkaUnreachable"), "{names:?}");
        let s = p.query("vector(3) + 4").await.expect("query");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].value, 7.0);
        let err = p.query("rate(").await.expect_err("a bad query fails");
        assert!(err.to_string().contains("parse"), "{err:#}");
        // No target, no metric: every dashboard query is empty, and they are all listed.
        let empty = p.empty_panels(None).await.expect("dashboards");
        assert!(empty.len() > 20, "{empty:?}");
        assert!(empty.iter().all(|q| q.error.is_none()), "{empty:?}");
    }
}
