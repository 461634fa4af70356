//! The gateway's metrics, registered beside the consumer's catalogue
//! ([`crate::metrics::Metrics::registry`]).
//!
//! Labels are bounded: `reason` and `code` come from fixed lists, and `group`, which clients
//! choose, is capped: the first [`MAX_GROUP_LABELS`] groups with an open connection get a series
//! of their own, later ones are summed under `group="_other"` until a slot frees (a group's
//! series is removed when its last connection closes).

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use super::frames::Code;

/// Groups with a lag series of their own.
pub const MAX_GROUP_LABELS: usize = 32;
/// The label of the other groups.
pub const OTHER: &str = "_other";

/// Handles to the gateway's metrics.
pub struct StreamMetrics {
    /// Streams open.
    pub connections: IntGauge,
    /// Requests refused before the upgrade, by reason (`token`, `query`, `full`).
    pub refused: IntCounterVec,
    /// Event frames sent.
    pub events_sent: IntCounter,
    /// Records not sent, by reason (`table`, `tombstone`, `undecodable`).
    pub skipped: IntCounterVec,
    /// Ack frames applied.
    pub acks: IntCounter,
    /// Events sent and not yet acknowledged, over every connection.
    pub unacked: IntGauge,
    /// Error frames sent, by code.
    pub errors: IntCounterVec,
    /// Messages behind the end of the partitions read, by group (committed offsets; capped).
    pub group_lag: IntGaugeVec,
    groups: Mutex<Groups>,
}

/// Each group's connections and their last lag figures.
#[derive(Default)]
struct Groups {
    lag: HashMap<String, HashMap<u64, i64>>,
    labelled: Vec<String>,
}

impl Groups {
    fn label<'a>(&'a self, group: &'a str) -> &'a str {
        if self.labelled.iter().any(|g| g == group) {
            group
        } else {
            OTHER
        }
    }

    fn sum(&self, label: &str) -> i64 {
        self.lag
            .iter()
            .filter(|(g, _)| self.label(g) == label)
            .flat_map(|(_, c)| c.values())
            .sum()
    }
}

impl StreamMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            connections: IntGauge::new(
                "walrelay_consumer_stream_connections",
                "WebSocket streams open.",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_stream_refused_total",
                    "Stream requests refused before the upgrade, by reason.",
                ),
                &["reason"],
            )?,
            events_sent: IntCounter::new(
                "walrelay_consumer_stream_events_sent_total",
                "Event frames sent to stream clients.",
            )?,
            skipped: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_stream_skipped_total",
                    "Records not sent (no tables pattern matched, tombstone, undecodable), committed past all the same.",
                ),
                &["reason"],
            )?,
            acks: IntCounter::new("walrelay_consumer_stream_acks_total", "Ack frames applied.")?,
            unacked: IntGauge::new(
                "walrelay_consumer_stream_unacked_events",
                "Events sent and not yet acknowledged, over every connection.",
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_stream_errors_total",
                    "Error frames sent, by code.",
                ),
                &["code"],
            )?,
            group_lag: IntGaugeVec::new(
                Opts::new(
                    "walrelay_consumer_stream_group_lag_messages",
                    "Messages between a stream group's committed offsets and the ends of its partitions, by group (the first 32 groups connected; the others summed as _other).",
                ),
                &["group"],
            )?,
            groups: Mutex::new(Groups::default()),
        };
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.events_sent.clone()))?;
        registry.register(Box::new(m.skipped.clone()))?;
        registry.register(Box::new(m.acks.clone()))?;
        registry.register(Box::new(m.unacked.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.group_lag.clone()))?;
        for code in Code::ALL {
            m.errors.with_label_values(&[code.as_str()]);
        }
        for reason in ["table", "tombstone", "undecodable"] {
            m.skipped.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// Connection `conn` of `group` reports `lag` (`None`: it closed).
    pub fn report_lag(&self, group: &str, conn: u64, lag: Option<i64>) {
        let mut g = walrelay_common::sync::lock(&self.groups);
        match lag {
            Some(lag) => {
                if !g.lag.contains_key(group)
                    && g.labelled.len() < MAX_GROUP_LABELS
                    && !g.labelled.iter().any(|l| l == group)
                {
                    g.labelled.push(group.to_string());
                }
                g.lag
                    .entry(group.to_string())
                    .or_default()
                    .insert(conn, lag);
            }
            None => {
                if let Some(conns) = g.lag.get_mut(group) {
                    conns.remove(&conn);
                    if conns.is_empty() {
                        g.lag.remove(group);
                        if let Some(i) = g.labelled.iter().position(|l| l == group) {
                            g.labelled.swap_remove(i);
                            let _ = self.group_lag.remove_label_values(&[group]);
                        }
                    }
                }
            }
        }
        let label = g.label(group).to_string();
        if g.lag.contains_key(group) || label == OTHER {
            self.group_lag
                .with_label_values(&[&label])
                .set(g.sum(&label));
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::core::Collector;

    use super::*;

    #[test]
    fn group_labels_are_capped() {
        let m = StreamMetrics::new(&Registry::new()).expect("metrics");
        for i in 0..(MAX_GROUP_LABELS as u64 + 10) {
            m.report_lag(&format!("g{i}"), i, Some(1));
        }
        let series = |m: &StreamMetrics| {
            m.group_lag
                .collect()
                .iter()
                .map(|f| f.get_metric().len())
                .sum::<usize>()
        };
        assert_eq!(series(&m), MAX_GROUP_LABELS + 1);
        assert_eq!(m.group_lag.with_label_values(&[OTHER]).get(), 10);
        // A labelled group leaving frees its series and slot.
        m.report_lag("g0", 0, None);
        assert_eq!(series(&m), MAX_GROUP_LABELS);
        m.report_lag("new", 99, Some(5));
        assert_eq!(m.group_lag.with_label_values(&["new"]).get(), 5);
    }
}
