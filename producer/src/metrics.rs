//! The producer's metric catalogue. Every name follows Prometheus rules: `walrelay_` prefix,
//! base units, `_total` on counters, and only bounded labels (`op`, `kind`, and `table`, which
//! is bounded by the publication).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};
use walrelay_common::event::Op;

/// Handles to every producer metric.
pub struct Metrics {
    /// The registry served on `/metrics`.
    pub registry: Registry,
    /// Events handed to Kafka, by op.
    pub events: IntCounterVec,
    /// `events` per op, resolved once (the hot path skips the label lookup).
    events_by_op: [IntCounter; Op::ALL.len()],
    /// Bytes of event values handed to Kafka.
    pub event_bytes: IntCounter,
    /// Events over `--max-event-bytes` (or a topic's smaller limit), written in chunks.
    pub oversized_events: IntCounter,
    /// Bytes of those events (whole), written to the chunk topics.
    pub oversized_bytes: IntCounter,
    /// Failed schema-registry requests (`--format avro`), each retried.
    pub registry_errors: IntCounter,
    /// Transactions seen on the stream.
    pub transactions: IntCounter,
    /// Bytes read from Postgres and not yet acknowledged by Kafka.
    pub buffer_bytes: IntGauge,
    /// The configured cap of `buffer_bytes`.
    pub buffer_capacity_bytes: IntGauge,
    /// Time from handing an event to Kafka until it was acknowledged.
    pub delivery_seconds: Histogram,
    /// Commit time to Kafka's acknowledgement of the transaction's last event.
    pub commit_to_ack_seconds: Histogram,
    /// Kafka transactions ended, by result (`committed`, `aborted`), under exactly-once.
    pub kafka_transactions: IntCounterVec,
    /// Time a Kafka transaction's commit took (flush of its events and the commit itself).
    pub kafka_commit_seconds: Histogram,
    /// Server WAL position minus the confirmed LSN.
    pub replication_lag_bytes: IntGauge,
    /// The LSN last confirmed to Postgres (as a number; exact below 2^53).
    pub confirmed_lsn: Gauge,
    /// Seconds from commit to Kafka acknowledgement of the commit's last event.
    pub source_lag_seconds: Gauge,
    /// Snapshot rows read, per table.
    pub snapshot_rows: IntCounterVec,
    /// Snapshot progress per table, 0 to 1.
    pub snapshot_progress: GaugeVec,
    /// Incremental-snapshot rows emitted, per table.
    pub incremental_rows: IntCounterVec,
    /// Incremental-snapshot chunks completed (acknowledged by Kafka), per table.
    pub incremental_chunks: IntCounterVec,
    /// Incremental-snapshot rows dropped because the stream changed their key inside the
    /// chunk's watermark window, per table.
    pub incremental_dropped: IntCounterVec,
    /// Errors by kind.
    pub errors: IntCounterVec,
    /// Schema events, by origin (`trigger`, `relation`, `snapshot`).
    pub schema_events: IntCounterVec,
    /// WAL that can still be written before the slot is lost; -1 when unlimited.
    pub slot_safe_wal_bytes: IntGauge,
    /// WAL the slot retains (current position minus `restart_lsn`).
    pub slot_retained_wal_bytes: IntGauge,
    /// 1 while the slot is active.
    pub slot_active: IntGauge,
    /// Build information (always 1).
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// The events counter of `op`.
    pub fn events_of(&self, op: Op) -> &IntCounter {
        &self.events_by_op[op.index()]
    }

    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new(
                "walrelay_producer_events_total",
                "Change events handed to Kafka, by op.",
            ),
            &["op"],
        )?;
        let events_by_op = Op::ALL.map(|op| events.with_label_values(&[op.code()]));
        let m = Self {
            events,
            events_by_op,
            event_bytes: IntCounter::new(
                "walrelay_producer_event_bytes_total",
                "Bytes of change events handed to Kafka.",
            )?,
            oversized_events: IntCounter::new(
                "walrelay_producer_oversized_events_total",
                "Events over --max-event-bytes written in chunks to <topic>.oversized, their rows carrying a reference.",
            )?,
            oversized_bytes: IntCounter::new(
                "walrelay_producer_oversized_bytes_total",
                "Bytes of oversized events written in chunks to <topic>.oversized.",
            )?,
            registry_errors: IntCounter::new(
                "walrelay_producer_schema_registry_errors_total",
                "Schema registry requests that failed transiently and were retried (--format avro).",
            )?,
            transactions: IntCounter::new(
                "walrelay_producer_transactions_total",
                "Committed transactions read from the slot.",
            )?,
            buffer_bytes: IntGauge::new(
                "walrelay_producer_buffer_bytes",
                "Bytes of events read from Postgres and not yet acknowledged by Kafka.",
            )?,
            buffer_capacity_bytes: IntGauge::new(
                "walrelay_producer_buffer_capacity_bytes",
                "Configured cap of walrelay_producer_buffer_bytes (--max-buffer-bytes).",
            )?,
            delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "walrelay_producer_kafka_delivery_duration_seconds",
                    "Time from handing an event to Kafka until it was acknowledged.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ]),
            )?,
            commit_to_ack_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "walrelay_producer_commit_to_ack_seconds",
                    "Time from a transaction's commit in Postgres until Kafka acknowledged its last event.",
                )
                .buckets(vec![
                    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
            )?,
            kafka_transactions: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_kafka_transactions_total",
                    "Kafka transactions ended under --delivery exactly-once, by result.",
                ),
                &["result"],
            )?,
            kafka_commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "walrelay_producer_kafka_commit_duration_seconds",
                    "Time a Kafka transaction's commit took (flushing its events, then the commit).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0,
                ]),
            )?,
            replication_lag_bytes: IntGauge::new(
                "walrelay_producer_replication_lag_bytes",
                "Server WAL position minus the LSN confirmed to Postgres.",
            )?,
            confirmed_lsn: Gauge::new(
                "walrelay_producer_confirmed_lsn",
                "The LSN confirmed to Postgres, as a number.",
            )?,
            source_lag_seconds: Gauge::new(
                "walrelay_producer_source_lag_seconds",
                "Seconds between the commit of the newest fully acknowledged transaction and its acknowledgement.",
            )?,
            snapshot_rows: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_snapshot_rows_total",
                    "Rows read by the initial snapshot, per table.",
                ),
                &["table"],
            )?,
            snapshot_progress: GaugeVec::new(
                Opts::new(
                    "walrelay_producer_snapshot_progress_ratio",
                    "Share of a table's snapshot done, 0 to 1.",
                ),
                &["table"],
            )?,
            incremental_rows: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_incremental_snapshot_rows_total",
                    "Rows emitted by incremental snapshots (op r, source.incremental), per table.",
                ),
                &["table"],
            )?,
            incremental_chunks: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_incremental_snapshot_chunks_total",
                    "Incremental-snapshot chunks whose rows Kafka acknowledged, per table.",
                ),
                &["table"],
            )?,
            incremental_dropped: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_incremental_snapshot_dropped_rows_total",
                    "Chunk rows dropped because the stream changed their key between the chunk's watermarks (the streamed change is newer), per table.",
                ),
                &["table"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("walrelay_producer_errors_total", "Errors, by kind."),
                &["kind"],
            )?,
            schema_events: IntCounterVec::new(
                Opts::new(
                    "walrelay_producer_schema_events_total",
                    "Schema changes turned into schema events (each sent to every partition), by origin.",
                ),
                &["origin"],
            )?,
            slot_safe_wal_bytes: IntGauge::new(
                "walrelay_producer_slot_safe_wal_bytes",
                "WAL that can still be written before max_slot_wal_keep_size invalidates the slot (pg_replication_slots.safe_wal_size); -1 when unlimited.",
            )?,
            slot_retained_wal_bytes: IntGauge::new(
                "walrelay_producer_slot_retained_wal_bytes",
                "WAL retained by the slot: current WAL position minus restart_lsn.",
            )?,
            slot_active: IntGauge::new(
                "walrelay_producer_slot_active",
                "1 while the replication slot is active.",
            )?,
            build_info: IntGaugeVec::new(
                Opts::new(
                    "walrelay_build_info",
                    "walrelay build information; always 1.",
                ),
                &["version", "component"],
            )?,
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.events.clone()),
            Box::new(m.event_bytes.clone()),
            Box::new(m.oversized_events.clone()),
            Box::new(m.oversized_bytes.clone()),
            Box::new(m.registry_errors.clone()),
            Box::new(m.transactions.clone()),
            Box::new(m.buffer_bytes.clone()),
            Box::new(m.buffer_capacity_bytes.clone()),
            Box::new(m.delivery_seconds.clone()),
            Box::new(m.commit_to_ack_seconds.clone()),
            Box::new(m.kafka_transactions.clone()),
            Box::new(m.kafka_commit_seconds.clone()),
            Box::new(m.replication_lag_bytes.clone()),
            Box::new(m.confirmed_lsn.clone()),
            Box::new(m.source_lag_seconds.clone()),
            Box::new(m.snapshot_rows.clone()),
            Box::new(m.snapshot_progress.clone()),
            Box::new(m.incremental_rows.clone()),
            Box::new(m.incremental_chunks.clone()),
            Box::new(m.incremental_dropped.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.schema_events.clone()),
            Box::new(m.slot_safe_wal_bytes.clone()),
            Box::new(m.slot_retained_wal_bytes.clone()),
            Box::new(m.slot_active.clone()),
            Box::new(m.build_info.clone()),
        ];
        for c in collectors {
            m.registry.register(c)?;
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "producer"])
            .set(1);
        // Every label value exists from the start, so rates and alerts see zeros, not gaps.
        for kind in [
            "postgres",
            "replication",
            "slot",
            "kafka_delivery",
            "kafka_unreachable",
            "event_too_large",
            "decode",
            "setup",
            "ddl_rejected",
            "kafka_fenced",
            "kafka_transaction",
        ] {
            m.errors.with_label_values(&[kind]);
        }
        for result in ["committed", "aborted"] {
            m.kafka_transactions.with_label_values(&[result]);
        }
        for origin in ["trigger", "relation", "snapshot"] {
            m.schema_events.with_label_values(&[origin]);
        }
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric the README documents is registered and exposed.
    #[test]
    fn every_documented_metric_is_exposed() {
        let m = Metrics::new().expect("metrics");
        m.events.with_label_values(&["c"]).inc();
        m.snapshot_rows.with_label_values(&["public.t"]).inc();
        m.snapshot_progress
            .with_label_values(&["public.t"])
            .set(1.0);
        m.errors.with_label_values(&["postgres"]).inc();
        m.schema_events.with_label_values(&["trigger"]).inc();
        for v in [
            &m.incremental_rows,
            &m.incremental_chunks,
            &m.incremental_dropped,
        ] {
            v.with_label_values(&["public.t"]).inc();
        }
        let names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let readme = include_str!("../../README.md");
        let documented: Vec<&str> = readme
            .split('`')
            .filter(|w| w.starts_with("walrelay_producer_") || w.starts_with("walrelay_build_info"))
            .map(|w| w.split('{').next().unwrap_or(w))
            .collect();
        assert!(
            documented.len() >= 15,
            "README lists the metrics: {documented:?}"
        );
        for name in documented {
            assert!(
                names.iter().any(|n| n == name),
                "{name} is documented but not exposed; exposed: {names:?}"
            );
        }
    }
}
