//! Observability under fire: a real Prometheus (Debian's) scrapes every walrelay process of the
//! run with the repository's scrape config and alert rules, and the report says which alerts
//! fired during which faults, and whether every Grafana panel's query returns series.
//!
//! ```text
//!   producers, index, notify, stream, replicate ──/metrics every 2 s──▶ Prometheus
//!        deploy/prometheus/prometheus.yml (targets rewritten to this run's ports)
//!        deploy/prometheus/rules/walrelay.yml            as deployed
//!        the same rules, time-compressed (copy="compressed") ──▶ ALERTS ──▶ verdict per rule
//! ```
//!
//! The deployed rules wait 1 to 30 minutes (`for:`) and judge sizes of production (1 GiB of
//! WAL, 10 000 messages of lag): in a run whose faults last seconds to a minute, most could
//! never fire. So Prometheus also loads a copy generated from the repository's file at the
//! start of the run ([`crate::prometheus::compress_rules`]): every `for:` and range window
//! divided by [`TIME_FACTOR`], and the three size thresholds scaled to the run (see
//! [`compression`]). The verdict is taken on the copy; what the deployed rules did is
//! reported beside it.
//!
//! Each rule has the fault kinds it exists for ([`exists_for`]); a rule passes when one of
//! them was in force at the onset of one of its firings: the moment its condition began to
//! hold (the firing's start less the copy's `for:`), a fault being in force from its injection
//! to 20 s after its restoration (reconnects and backoffs). Faults overlap in a busy schedule,
//! so the report lists every kind in force at each onset. Two rules watch what no fault of this run does on purpose (dead
//! letters, a webhook endpoint answering 410 Gone: the run's sinks hold events rather than
//! dead-letter them, so that every event can be checked); they are reported as not
//! exercised, and their `promtool test rules` cases stand for them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use super::faults::Done;
use super::stack::Stack;
use crate::prometheus::{
    AlertState, Compression, Config, ExtraTarget, Prometheus, compress_rules, dashboard_files,
    repo_root,
};

/// Every `for:` and range window of the copy is this many times shorter.
pub const TIME_FACTOR: u32 = 60;

/// The copy's compression: time ÷ [`TIME_FACTOR`]; retained WAL "over 1 GiB" becomes over
/// 128 KiB (the workload writes tens of KiB of WAL a second, so a slot held by a 60 s Kafka
/// blackout passes it within seconds and keeps growing, to a few MiB; a slot that keeps up
/// retains 50–250 KiB, so the copy may also fire in quiet moments, which the report shows);
/// "under 2 GiB of safe WAL" becomes under 1 GiB − 32 MiB with
/// [`super::stack::MAX_SLOT_WAL_KEEP`] (two WAL segments of margin: the value moves in 16 MiB
/// steps), i.e. 32 to 48 MiB retained, which no 60 s blackout reaches: the long-outage phase
/// ([`super::hygiene::long_outage`]) is its fault; 10 000 messages of lag become 300.
pub fn compression() -> Compression {
    Compression {
        time_factor: TIME_FACTOR,
        thresholds: vec![
            ("1073741824".into(), "131072".into()),
            ("2147483648".into(), "1040187392".into()),
            ("10000".into(), "300".into()),
        ],
        label: ("copy".into(), "compressed".into()),
    }
}

/// The fault kinds (labels) a rule exists for; empty: no fault of the run is meant to fire it.
pub fn exists_for(alert: &str) -> &'static [&'static str] {
    match alert {
        // Every broker unreachable from a process.
        "WalrelayKafkaUnreachable" => &["kafka_blackout"],
        // Not ready: Kafka gone; or not scraped: a frozen producer.
        "WalrelayProducerNotReady" => &["kafka_blackout", "producer_freeze"],
        // The slot held while Kafka does not acknowledge.
        "WalrelaySlotRetainedWalGrowing" => &["kafka_blackout"],
        // An outage long enough for the slot to near `max_slot_wal_keep_size`: a 60 s
        // blackout retains a few MiB, so the phase after the checks holds Kafka away while
        // tens of MiB of WAL are written (`hygiene::long_outage`).
        "WalrelaySlotNearWalLimit" => &["kafka_long_outage"],
        // A live producer not streaming: its session lost with the server or the link.
        "WalrelaySlotInactive" => &["postgres_restart", "producer_freeze", "net_cut"],
        // Sessions ending.
        "WalrelayProducerErrors" => &["postgres_restart", "producer_freeze", "net_cut"],
        // A sink that cannot apply.
        "WalrelayConsumerLagGrowing" => &["search_stall"],
        "WalrelayConsumerNotReady" => &["search_stall", "kafka_blackout"],
        _ => &[],
    }
}

/// A series' labels as `k=v,k=v`, leaving out `skip`.
fn joined(labels: &BTreeMap<String, String>, skip: &[&str]) -> String {
    labels
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a rule has no fault of its own in the run.
fn not_exercised(alert: &str) -> Option<&'static str> {
    match alert {
        "WalrelayDeadLetters" => Some(
            "no fault dead-letters: the run's sinks retry or hold (strict notifier) so that \
             every event is checked; promtool's unit test covers the rule",
        ),
        "WalrelayWebhookSubscriptionDisabled" => Some(
            "needs an endpoint answering 410 Gone, which would drop a subscription the run \
             checks; promtool's unit test covers the rule",
        ),
        _ => None,
    }
}

/// A rule's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleVerdict {
    /// `alert:` name.
    pub alert: String,
    /// Firing spans of the compressed copy.
    pub fired: usize,
    /// Fault kinds in force during those spans, with how many spans each.
    pub during: BTreeMap<String, usize>,
    /// The kinds it exists for.
    pub expected: Vec<String>,
    /// Fired during one of them (or not exercised on purpose).
    pub pass: bool,
    /// Why it is not exercised, when it is not.
    pub not_exercised: Option<String>,
    /// Firing spans of the deployed rule (its production windows).
    pub fired_deployed: usize,
}

/// One firing of the compressed copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Firing {
    /// Alert.
    pub alert: String,
    /// Series labels (job, component, instance, …) in one string.
    pub labels: String,
    /// When its condition began to hold (ms since the epoch).
    pub onset_ms: i64,
    /// First and last evaluation seen firing.
    pub from_ms: i64,
    /// Last.
    pub to_ms: i64,
    /// Faults in force at the onset: their kinds and details.
    pub faults: Vec<String>,
}

/// What Prometheus saw of a fault that exists to fire an alert: the largest value of the
/// alert's metric while it was in force.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultSeen {
    /// Fault kind.
    pub kind: String,
    /// When (ms since the epoch) and for how long (ms).
    pub at_ms: i64,
    /// Length.
    pub for_ms: i64,
    /// The query.
    pub metric: String,
    /// Per series (its labels): the value at injection and the largest while in force.
    pub series: Vec<(String, f64, f64)>,
}

/// Dashboard panels' queries evaluated over the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PanelVerdict {
    /// Dashboard file.
    pub dashboard: String,
    /// Panel title.
    pub panel: String,
    /// The query as written.
    pub expr: String,
    /// Series returned.
    pub series: usize,
    /// Prometheus' error.
    pub error: Option<String>,
}

/// What the report shows of Prometheus.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Observability {
    /// Per rule.
    pub rules: Vec<RuleVerdict>,
    /// Every panel query.
    pub panels: Vec<PanelVerdict>,
    /// Every firing of the copy.
    pub firings: Vec<Firing>,
    /// The faults meant to fire the WAL and lag alerts, as Prometheus saw them.
    pub seen: Vec<FaultSeen>,
    /// Scrape targets and whether each was up at the end.
    pub targets_up: Vec<(String, bool)>,
}

impl Observability {
    /// Failures, in words.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in self.rules.iter().filter(|r| !r.pass) {
            out.push(format!(
                "alert {} did not fire during {:?} (fired {} times, during {:?})",
                r.alert, r.expected, r.fired, r.during
            ));
        }
        for p in self
            .panels
            .iter()
            .filter(|p| p.series == 0 || p.error.is_some())
        {
            out.push(format!(
                "dashboard {} panel {:?}: {} ({})",
                p.dashboard,
                p.panel,
                p.error.as_deref().unwrap_or("no series"),
                p.expr
            ));
        }
        out
    }

    /// The report's section.
    pub fn markdown(&self) -> String {
        let mut s = String::from("## Prometheus under fire\n\n");
        s.push_str(&format!(
            "Rules: the repository's, and a copy with every window ÷ {TIME_FACTOR} and sizes scaled \
             (`copy=\"compressed\"`); the verdict is the copy's.\n\n"
        ));
        s.push_str("| alert | exists for | fired (copy) | fault kinds in force at its onsets | fired (deployed) | verdict |\n|---|---|---|---|---|---|\n");
        for r in &self.rules {
            let during: Vec<String> = r.during.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
            let verdict = match (&r.not_exercised, r.pass) {
                (Some(why), _) => format!("not exercised: {why}"),
                (None, true) => "pass".into(),
                (None, false) => "**FAIL**".into(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.alert,
                r.expected.join(", "),
                r.fired,
                during.join(", "),
                r.fired_deployed,
                verdict
            ));
        }
        if !self.seen.is_empty() {
            s.push_str(
                "\nWhat the WAL and lag metrics did during the faults meant to move them:\n\n",
            );
            for f in &self.seen {
                let values: Vec<String> = f
                    .series
                    .iter()
                    .map(|(l, first, max)| format!("{l} {first:.0} at its start, {max:.0} at most"))
                    .collect();
                s.push_str(&format!(
                    "- {} for {:.0} s, `{}`: {}\n",
                    f.kind,
                    f.for_ms as f64 / 1000.0,
                    f.metric,
                    if values.is_empty() {
                        "no data".to_string()
                    } else {
                        values.join("; ")
                    }
                ));
            }
        }
        let empty: Vec<&PanelVerdict> = self
            .panels
            .iter()
            .filter(|p| p.series == 0 || p.error.is_some())
            .collect();
        s.push_str(&format!(
            "\nDashboards: {} panel queries evaluated over the run (range queries, as the panels' graphs), {} without series.\n",
            self.panels.len(),
            empty.len()
        ));
        for p in empty {
            s.push_str(&format!(
                "- {} / {}: `{}` {}\n",
                p.dashboard,
                p.panel,
                p.expr,
                p.error.as_deref().unwrap_or("")
            ));
        }
        let down: Vec<&str> = self
            .targets_up
            .iter()
            .filter(|(_, up)| !up)
            .map(|(t, _)| t.as_str())
            .collect();
        s.push_str(&format!(
            "\nScrape targets: {} ({} down at the end{})\n",
            self.targets_up.len(),
            down.len(),
            if down.is_empty() {
                String::new()
            } else {
                format!(": {}", down.join(", "))
            }
        ));
        s
    }
}

/// A Prometheus watching one run.
pub struct Watch {
    prom: Prometheus,
    started: SystemTime,
    /// The copy's `for:` by alert, ms.
    for_ms: BTreeMap<String, i64>,
}

/// A duration of the copy (`60s`, `2m`, `1h`, `0s`) in ms.
fn duration_ms(d: &str) -> Option<i64> {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = n.parse().ok()?;
    Some(match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return None,
    })
}

impl Watch {
    /// Writes the compressed rules into `dir` and starts Prometheus on the stack's metrics
    /// addresses.
    pub async fn start(stack: &Stack, dir: &Path) -> anyhow::Result<Self> {
        let rules = compress_rules(
            &repo_root().join("deploy/prometheus/rules/walrelay.yml"),
            &compression(),
        )?;
        let rules_path = dir.join("rules-compressed.yml");
        std::fs::write(&rules_path, &rules).context("write the compressed rules")?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&rules).context("parse the copy")?;
        let mut for_ms = BTreeMap::new();
        for g in doc["groups"].as_sequence().into_iter().flatten() {
            for r in g["rules"].as_sequence().into_iter().flatten() {
                if let Some(a) = r["alert"].as_str() {
                    let d = r["for"].as_str().and_then(duration_ms).unwrap_or(0);
                    for_ms.insert(a.to_string(), d);
                }
            }
        }
        let mut config = Config {
            extra_rule_files: vec![rules_path],
            ..Config::default()
        };
        for (host, component, addr) in &stack.metrics {
            match host {
                Some(h) => config.targets.push((h.to_string(), *addr)),
                None => config.extra.push(ExtraTarget {
                    job: "walrelay-consumer".into(),
                    addr: *addr,
                    labels: BTreeMap::from([("component".to_string(), component.clone())]),
                }),
            }
        }
        let prom = Prometheus::start_with(config).await?;
        Ok(Self {
            prom,
            started: SystemTime::now(),
            for_ms,
        })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.prom.url()
    }

    /// Alert history since the start, against what was done; every dashboard's panels.
    pub async fn verdict(&self, done: &[Done]) -> anyhow::Result<Observability> {
        let spans = self
            .prom
            .alert_history(self.started, SystemTime::now())
            .await?;
        let text =
            std::fs::read_to_string(repo_root().join("deploy/prometheus/rules/walrelay.yml"))
                .context("read the rules")?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text).context("parse the rules")?;
        let mut alerts = BTreeSet::new();
        for g in doc["groups"].as_sequence().into_iter().flatten() {
            for r in g["rules"].as_sequence().into_iter().flatten() {
                if let Some(a) = r["alert"].as_str() {
                    alerts.insert(a.to_string());
                }
            }
        }
        let ms = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0)
        };
        let step = self.prom.interval().as_millis() as i64;
        let mut rules = Vec::new();
        let mut firings = Vec::new();
        for alert in alerts {
            let firing = |copy: bool| {
                spans
                    .iter()
                    .filter(|s| {
                        s.name == alert
                            && s.state == AlertState::Firing
                            && (s.labels.get("copy").map(String::as_str) == Some("compressed"))
                                == copy
                    })
                    .collect::<Vec<_>>()
            };
            let copy = firing(true);
            let mut during: BTreeMap<String, usize> = BTreeMap::new();
            for s in &copy {
                // The condition held `for` before the first evaluation that fired, give or
                // take an evaluation interval.
                let onset = ms(s.from) - self.for_ms.get(&alert).copied().unwrap_or(0) - step;
                let in_force: Vec<&Done> = done
                    .iter()
                    .filter(|d| {
                        d.at_ms <= onset + 2 * step && d.restored_ms.max(d.at_ms) + 20_000 >= onset
                    })
                    .collect();
                let kinds: BTreeSet<String> = in_force.iter().map(|d| d.kind.label()).collect();
                for k in kinds {
                    *during.entry(k).or_default() += 1;
                }
                firings.push(Firing {
                    alert: alert.clone(),
                    labels: joined(&s.labels, &["copy", "severity"]),
                    onset_ms: onset,
                    from_ms: ms(s.from),
                    to_ms: ms(s.to),
                    faults: in_force
                        .iter()
                        .map(|d| format!("{}: {}", d.kind.label(), d.detail))
                        .collect(),
                });
            }
            let expected: Vec<String> = exists_for(&alert).iter().map(|s| s.to_string()).collect();
            let why = not_exercised(&alert);
            let pass = why.is_some() || expected.iter().any(|k| during.contains_key(k));
            rules.push(RuleVerdict {
                fired: copy.len(),
                during,
                expected,
                pass,
                not_exercised: why.map(str::to_string),
                fired_deployed: firing(false).len(),
                alert,
            });
        }
        let mut seen = Vec::new();
        for d in done {
            let metric = match d.kind.label().as_str() {
                "kafka_blackout" | "kafka_long_outage" => {
                    "max(walrelay_producer_slot_retained_wal_bytes)"
                }
                "search_stall" => "sum by (component) (walrelay_consumer_lag_messages)",
                _ => continue,
            };
            let to_time = |t: i64| UNIX_EPOCH + Duration::from_millis(t.max(0) as u64);
            let points = self
                .prom
                .query_range(
                    metric,
                    to_time(d.at_ms),
                    to_time(d.restored_ms.max(d.at_ms)),
                    self.prom.interval(),
                )
                .await
                .unwrap_or_default();
            let series = points
                .iter()
                .filter_map(|s| {
                    let first = s.points.first()?.1;
                    let max = s.points.iter().map(|p| p.1).fold(first, f64::max);
                    Some((joined(&s.labels, &[]), first, max))
                })
                .collect();
            seen.push(FaultSeen {
                kind: d.kind.label(),
                at_ms: d.at_ms,
                for_ms: d.restored_ms - d.at_ms,
                metric: metric.to_string(),
                series,
            });
        }
        let mut panels = Vec::new();
        let files = dashboard_files(None)?;
        for f in files {
            for q in self
                .prom
                .evaluate_dashboard_over(&f, Some((self.started, SystemTime::now())))
                .await?
            {
                panels.push(PanelVerdict {
                    dashboard: q.dashboard,
                    panel: q.panel,
                    expr: q.expr,
                    series: q.series,
                    error: q.error,
                });
            }
        }
        let targets_up = self
            .prom
            .query("up")
            .await?
            .into_iter()
            .map(|s| {
                let name = format!(
                    "{} {}",
                    s.labels.get("job").cloned().unwrap_or_default(),
                    s.labels
                        .get("component")
                        .or(s.labels.get("instance"))
                        .cloned()
                        .unwrap_or_default()
                );
                (name, s.value == 1.0)
            })
            .collect();
        Ok(Observability {
            rules,
            panels,
            firings,
            seen,
            targets_up,
        })
    }

    /// The firing series of the time-compressed copy of `alert` now, as their labels (without
    /// `copy` and `severity`).
    pub async fn copy_firing(&self, alert: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .prom
            .alerts()
            .await?
            .into_iter()
            .filter(|a| {
                a.name == alert
                    && a.state == AlertState::Firing
                    && a.labels.get("copy").map(String::as_str) == Some("compressed")
            })
            .map(|a| joined(&a.labels, &["copy", "severity"]))
            .collect())
    }

    /// Each series of `expr` now: its labels (without the name), joined, and its value.
    pub async fn values(&self, expr: &str) -> anyhow::Result<Vec<(String, f64)>> {
        Ok(self
            .prom
            .query(expr)
            .await?
            .into_iter()
            .map(|s| (joined(&s.labels, &["__name__"]), s.value))
            .collect())
    }

    /// Waits until every target is scraped up (`n` of them).
    pub async fn wait_up(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let up = self.prom.query("up == 1").await?.len();
            if up >= n {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{up} of {n} scrape targets up after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
