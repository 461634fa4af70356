//! The report: JSON (everything) and markdown (the tables a person reads), both written under
//! the run's folder; the markdown is also printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::checker::{EventCheck, StateCheck};
use super::faults::{Done, Planned};
use super::hygiene::{Hygiene, LongOutage};
use super::observability::Observability;
use super::observe::PartialSample;
use super::workload::LoadStats;

/// Recovery after one fault kind, on one component.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recovery {
    /// Fault kind.
    pub kind: String,
    /// Component.
    pub component: String,
    /// Faults of the kind.
    pub faults: usize,
    /// Median and largest recovery, ms (faults after which nothing was seen are left out).
    pub p50_ms: Option<i64>,
    /// Largest.
    pub max_ms: Option<i64>,
}

/// Partial transactions a `read_committed` reader saw, per topic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Partials {
    /// Topic's delivery mode.
    pub mode: String,
    /// Samples taken with every partition at its end.
    pub samples: usize,
    /// Of those, samples that showed a partial transaction.
    pub with_partial: usize,
    /// Whether the mode allows them (at-least-once does).
    pub allowed: bool,
}

/// A whole run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Seed.
    pub seed: u64,
    /// Fault window, minutes.
    pub minutes: f64,
    /// The producer binary (another one under `--broken`).
    pub producer_bin: String,
    /// Outcome.
    pub pass: bool,
    /// Why not, in words.
    pub failures: Vec<String>,
    /// The schedule.
    pub planned: Vec<Planned>,
    /// What was injected.
    pub done: Vec<Done>,
    /// The workload's counters.
    pub load: LoadStats,
    /// Committed transactions (ledger rows).
    pub committed: usize,
    /// Events per component.
    pub events: Vec<EventCheck>,
    /// Final states.
    pub states: Vec<StateCheck>,
    /// Largest heartbeat lag of the polled components, ms.
    pub polled_lag_ms: BTreeMap<String, i64>,
    /// Recovery by fault kind and component.
    pub recoveries: Vec<Recovery>,
    /// Partial transactions under read_committed.
    pub partials: Vec<Partials>,
    /// Partial samples, all.
    pub partial_samples: Vec<(String, PartialSample)>,
    /// Slot → largest retained WAL, bytes.
    pub retained_wal: BTreeMap<String, i64>,
    /// Seconds from the end of the fault window until every component had caught up.
    pub drain_seconds: f64,
    /// Prometheus' view: alerts per fault, dashboard queries.
    pub observability: Option<Observability>,
    /// The long Kafka outage phase.
    pub long_outage: Option<LongOutage>,
    /// The slot invalidation phase.
    pub hygiene: Option<Hygiene>,
    /// Notes (what is not measured, what was changed for this profile).
    pub notes: Vec<String>,
}

fn ms(v: Option<i64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} s", v as f64 / 1000.0))
}

impl Report {
    /// The markdown.
    pub fn markdown(&self) -> String {
        let mut m = String::new();
        let _ = writeln!(
            m,
            "# Chaos run: seed {}, {} min — {}\n",
            self.seed,
            self.minutes,
            if self.pass { "PASS" } else { "FAIL" }
        );
        if !self.failures.is_empty() {
            let _ = writeln!(m, "**Failures**\n");
            for f in &self.failures {
                let _ = writeln!(m, "- {f}");
            }
            let _ = writeln!(m);
        }
        let _ = writeln!(
            m,
            "Workload: {} transactions committed (ledger); client saw {} committed, {} failed, {} without a COMMIT answer ({} of them committed), {} reconnects; big transaction {} rows.\n",
            self.committed,
            self.load.committed,
            self.load.failed,
            self.load.unknown,
            self.load.unknown_committed,
            self.load.reconnects,
            self.load.big_rows
        );
        let _ = writeln!(
            m,
            "## Faults\n\n| kind | planned | injected |\n|---|---|---|"
        );
        let mut kinds: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for p in &self.planned {
            kinds.entry(p.kind.label()).or_default().0 += 1;
        }
        for d in &self.done {
            kinds.entry(d.kind.label()).or_default().1 += 1;
        }
        for (k, (p, d)) in &kinds {
            let _ = writeln!(m, "| {k} | {p} | {d} |");
        }
        let _ = writeln!(
            m,
            "\n## Events per component\n\n| component | expected | received | missing | extra | duplicates | dup. not allowed | out of order | max latency | duplicate rule | result |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for e in &self.events {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                e.name,
                e.expected,
                e.received,
                e.missing,
                e.extra,
                e.duplicates,
                e.duplicates_not_allowed,
                e.out_of_order,
                ms(Some(e.max_latency_ms)),
                e.duplicate_rule,
                if e.pass { "pass" } else { "FAIL" }
            );
        }
        for e in self.events.iter().filter(|e| !e.samples.is_empty()) {
            let _ = writeln!(m, "\n{}:", e.name);
            for s in &e.samples {
                let _ = writeln!(m, "- {s}");
            }
        }
        let _ = writeln!(
            m,
            "\n## Final state against Postgres\n\n| component | rows | missing | extra | differing | result |\n|---|---|---|---|---|---|"
        );
        for s in &self.states {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} |",
                s.name,
                s.rows,
                s.missing,
                s.extra,
                s.differing,
                if s.pass { "pass" } else { "FAIL" }
            );
        }
        for s in self.states.iter().filter(|s| !s.samples.is_empty()) {
            let _ = writeln!(m, "\n{}:", s.name);
            for x in &s.samples {
                let _ = writeln!(m, "- {x}");
            }
        }
        let _ = writeln!(
            m,
            "\n## Partial transactions under read_committed\n\n| topic | samples | with a partial transaction | allowed |\n|---|---|---|---|"
        );
        for p in &self.partials {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                p.mode, p.samples, p.with_partial, p.allowed
            );
        }
        let _ = writeln!(m, "\n## Latency and recovery\n");
        for (k, v) in &self.polled_lag_ms {
            let _ = writeln!(
                m,
                "- {k}: largest heartbeat lag {} (polled every 0.5 s)",
                ms(Some(*v))
            );
        }
        let _ = writeln!(
            m,
            "\nTime to recover (fault → first change committed after it seen), p50 / max:\n\n| fault | count | {} |\n|---|---|{}",
            self.components().join(" | "),
            "---|".repeat(self.components().len())
        );
        let mut by_kind: BTreeMap<&str, BTreeMap<&str, &Recovery>> = BTreeMap::new();
        for r in &self.recoveries {
            by_kind
                .entry(r.kind.as_str())
                .or_default()
                .insert(r.component.as_str(), r);
        }
        for (kind, comps) in &by_kind {
            let count = comps.values().next().map_or(0, |r| r.faults);
            let cells: Vec<String> = self
                .components()
                .iter()
                .map(|c| {
                    comps.get(c.as_str()).map_or("–".into(), |r| {
                        format!("{} / {}", ms(r.p50_ms), ms(r.max_ms))
                    })
                })
                .collect();
            let _ = writeln!(m, "| {kind} | {count} | {} |", cells.join(" | "));
        }
        let _ = writeln!(m, "\n## Slots\n");
        for (slot, bytes) in &self.retained_wal {
            let _ = writeln!(
                m,
                "- {slot}: largest retained WAL {:.1} MiB",
                *bytes as f64 / 1_048_576.0
            );
        }
        let _ = writeln!(
            m,
            "\nDrain after the fault window: {:.0} s.",
            self.drain_seconds
        );
        if let Some(o) = &self.observability {
            let _ = write!(m, "\n{}", o.markdown());
        }
        if let Some(l) = &self.long_outage {
            let _ = write!(m, "\n{}", l.markdown());
        }
        if let Some(h) = &self.hygiene {
            let _ = write!(m, "\n{}", h.markdown());
        }
        if !self.notes.is_empty() {
            let _ = writeln!(m, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(m, "- {n}");
            }
        }
        m
    }

    fn components(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for r in &self.recoveries {
            if !v.contains(&r.component) {
                v.push(r.component.clone());
            }
        }
        v
    }

    /// Writes `report.json` and `report.md` into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }
}

/// p50 and max of recoveries.
pub fn summarize(kind: &str, component: &str, values: &[Option<i64>]) -> Recovery {
    let mut seen: Vec<i64> = values.iter().flatten().copied().collect();
    seen.sort_unstable();
    Recovery {
        kind: kind.to_string(),
        component: component.to_string(),
        faults: values.len(),
        p50_ms: seen.get(seen.len() / 2).copied(),
        max_ms: seen.last().copied(),
    }
}
