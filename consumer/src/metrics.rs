//! The consumer's metric catalogue. Names follow Prometheus rules: `walrelay_consumer_` prefix,
//! base units, `_total` on counters, bounded labels only (`op`; `table`, bounded by the
//! captured tables; `topic` and `partition`, bounded by the topics read and their partitions:
//! with `--topic-pattern` over the producer's per-table topics, one topic per captured table,
//! so no more series than `table` gives; `sink`, `kind` and `reason` from fixed lists).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Handles to every consumer metric.
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// Events the sink handled, by op and table.
    pub events: IntCounterVec,
    /// Events sent to the dead-letter topic, by reason (`decode`, `rejected`).
    pub dead_letters: IntCounterVec,
    /// Sink errors by sink and kind (`throttled`, `server`, `connection`, `rejected`, …).
    pub sink_errors: IntCounterVec,
    /// Writes the sink answered with a version conflict: a stale or repeated event, skipped.
    pub version_conflicts: IntCounter,
    /// Schema events by what the sink did (`applied`, `stale`, `renamed`, `dropped`, `kept`).
    pub schema_events: IntCounterVec,
    /// Schema changes an index could not follow, by kind (`type_change`, `name_taken`).
    pub schema_conflicts: IntCounterVec,
    /// Time to apply one batch to the sink, retries included.
    pub batch_seconds: Histogram,
    /// Events per batch.
    pub batch_events: Histogram,
    /// Commit time in Postgres to the sink having applied the event.
    pub end_to_end_seconds: Histogram,
    /// Messages behind the end of each assigned partition, by topic and partition (librdkafka
    /// statistics).
    pub lag_messages: IntGaugeVec,
    /// Webhook delivery attempts by outcome class (`2xx`, `3xx`, `4xx`, `5xx`, `timeout`,
    /// `connection`, `refused`).
    pub webhook_deliveries: IntCounterVec,
    /// Webhook request durations.
    pub webhook_duration_seconds: Histogram,
    /// Webhook attempts that were retried.
    pub webhook_retries: IntCounter,
    /// Subscriptions disabled by a 410 Gone.
    pub webhook_disabled: IntCounter,
    /// Partitions assigned to this process.
    pub assigned_partitions: IntGauge,
    /// Assigned partitions whose fetching is paused (the sink is behind, or its backlog full).
    pub paused_partitions: IntGauge,
    /// Webhook subscriptions parked (their endpoint kept failing or was too slow).
    pub webhook_parked: IntGauge,
    /// Events held in memory for parked subscriptions (strict mode).
    pub webhook_held_events: IntGauge,
    /// Bytes of the events held for parked subscriptions (strict mode).
    pub webhook_held_bytes: IntGauge,
    /// Rebalances this process took part in.
    pub rebalances: IntCounter,
    /// reindex: events left to read before the new indexes are caught up.
    pub reindex_lag_messages: IntGauge,
    /// Build information (always 1).
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let seconds = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let m = Self {
            events: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_events_total",
                    "Change events the sink handled (applied, or skipped as stale), by op and table.",
                ),
                &["op", "table"],
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_dead_letters_total",
                    "Events written to the dead-letter topic, by reason.",
                ),
                &["reason"],
            )?,
            sink_errors: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_sink_errors_total",
                    "Failed sink requests or items, by sink and kind.",
                ),
                &["sink", "kind"],
            )?,
            schema_events: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_schema_events_total",
                    "Schema events handled by the sink, by outcome.",
                ),
                &["outcome"],
            )?,
            schema_conflicts: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_schema_conflicts_total",
                    "Schema changes the index mapping could not follow (a re-index resolves them), by kind.",
                ),
                &["kind"],
            )?,
            version_conflicts: IntCounter::new(
                "walrelay_consumer_version_conflicts_total",
                "Writes refused because the stored document is as new or newer (stale or repeated events; expected after restarts).",
            )?,
            batch_seconds: seconds(
                "walrelay_consumer_batch_duration_seconds",
                "Time to apply one batch to the sink, retries included.",
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )?,
            batch_events: Histogram::with_opts(
                HistogramOpts::new("walrelay_consumer_batch_events", "Events per batch.").buckets(
                    vec![1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0],
                ),
            )?,
            end_to_end_seconds: seconds(
                "walrelay_consumer_end_to_end_latency_seconds",
                "Commit time in Postgres to the sink having applied the event.",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0],
            )?,
            webhook_deliveries: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_webhook_deliveries_total",
                    "Webhook delivery attempts, by outcome class.",
                ),
                &["class"],
            )?,
            webhook_duration_seconds: seconds(
                "walrelay_consumer_webhook_delivery_duration_seconds",
                "Duration of one webhook request.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )?,
            webhook_retries: IntCounter::new(
                "walrelay_consumer_webhook_retries_total",
                "Webhook attempts that failed and were retried.",
            )?,
            webhook_disabled: IntCounter::new(
                "walrelay_consumer_webhook_disabled_subscriptions_total",
                "Subscriptions disabled because their endpoint answered 410 Gone.",
            )?,
            lag_messages: IntGaugeVec::new(
                Opts::new(
                    "walrelay_consumer_lag_messages",
                    "Messages between this consumer's position and the end of the partition.",
                ),
                &["topic", "partition"],
            )?,
            assigned_partitions: IntGauge::new(
                "walrelay_consumer_assigned_partitions",
                "Partitions (of every topic read) assigned to this process.",
            )?,
            paused_partitions: IntGauge::new(
                "walrelay_consumer_paused_partitions",
                "Assigned partitions whose fetching is paused while polling goes on (the sink is behind, or its backlog is full).",
            )?,
            webhook_parked: IntGauge::new(
                "walrelay_consumer_webhook_subscriptions_parked",
                "Webhook subscriptions parked because their endpoint kept failing or was too slow.",
            )?,
            webhook_held_events: IntGauge::new(
                "walrelay_consumer_webhook_held_events",
                "Events held in memory for parked webhook subscriptions (strict mode).",
            )?,
            webhook_held_bytes: IntGauge::new(
                "walrelay_consumer_webhook_held_bytes",
                "Bytes of the events held in memory for parked webhook subscriptions (strict mode).",
            )?,
            rebalances: IntCounter::new(
                "walrelay_consumer_rebalances_total",
                "Consumer-group rebalances this process took part in.",
            )?,
            reindex_lag_messages: IntGauge::new(
                "walrelay_consumer_reindex_lag_messages",
                "reindex: messages left before the new indexes are caught up.",
            )?,
            build_info: IntGaugeVec::new(
                Opts::new(
                    "walrelay_consumer_build_info",
                    "Build information (always 1).",
                ),
                &["version"],
            )?,
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every bounded label value exists from the start, so rates and alerts see zeros.
        for reason in ["decode", "rejected", "delivery_failed", "gone", "parked"] {
            m.dead_letters.with_label_values(&[reason]);
        }
        for class in [
            "2xx",
            "3xx",
            "4xx",
            "5xx",
            "timeout",
            "connection",
            "refused",
        ] {
            m.webhook_deliveries.with_label_values(&[class]);
        }
        for outcome in ["applied", "stale", "renamed", "dropped", "kept"] {
            m.schema_events.with_label_values(&[outcome]);
        }
        for kind in ["type_change", "name_taken", "mapping_refused"] {
            m.schema_conflicts.with_label_values(&[kind]);
        }
        for c in m.collectors() {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.events.clone()),
            Box::new(self.dead_letters.clone()),
            Box::new(self.sink_errors.clone()),
            Box::new(self.version_conflicts.clone()),
            Box::new(self.schema_events.clone()),
            Box::new(self.webhook_deliveries.clone()),
            Box::new(self.webhook_duration_seconds.clone()),
            Box::new(self.webhook_retries.clone()),
            Box::new(self.webhook_disabled.clone()),
            Box::new(self.schema_conflicts.clone()),
            Box::new(self.batch_seconds.clone()),
            Box::new(self.batch_events.clone()),
            Box::new(self.end_to_end_seconds.clone()),
            Box::new(self.lag_messages.clone()),
            Box::new(self.assigned_partitions.clone()),
            Box::new(self.paused_partitions.clone()),
            Box::new(self.webhook_parked.clone()),
            Box::new(self.webhook_held_events.clone()),
            Box::new(self.webhook_held_bytes.clone()),
            Box::new(self.rebalances.clone()),
            Box::new(self.reindex_lag_messages.clone()),
            Box::new(self.build_info.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_readme_metric_is_registered() {
        let m = Metrics::new().expect("metrics");
        // Labelled families only appear once a child exists.
        m.events.with_label_values(&["c", "public.t"]).inc();
        m.dead_letters.with_label_values(&["decode"]).inc();
        m.schema_events.with_label_values(&["applied"]).inc();
        m.webhook_deliveries.with_label_values(&["2xx"]).inc();
        m.schema_conflicts.with_label_values(&["type_change"]).inc();
        m.sink_errors
            .with_label_values(&["search", "throttled"])
            .inc();
        m.lag_messages.with_label_values(&["t", "0"]).set(0);
        // The stream gateway's metrics go to the same registry when it runs.
        let stream = crate::stream::metrics::StreamMetrics::new(&m.registry).expect("stream");
        stream.refused.with_label_values(&["token"]).inc();
        stream.report_lag("g", 1, Some(0));
        // So do the replicator's.
        crate::sinks::postgres::sink::ReplicateMetrics::new(&m.registry).expect("replicate");
        let names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let readme = include_str!("../../README.md");
        let documented: Vec<&str> = readme
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("walrelay_consumer_"))
            .collect();
        assert!(
            !documented.is_empty(),
            "the README lists the consumer metrics"
        );
        for name in documented {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_count")
                .trim_end_matches("_sum");
            assert!(
                names.iter().any(|n| n == base),
                "{name} documented but not registered"
            );
        }
        for n in &names {
            assert!(
                readme.contains(n.as_str()),
                "{n} registered but not documented"
            );
        }
    }
}
