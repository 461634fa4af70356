//! Membership of the consumer group: the librdkafka consumer, its configuration, rebalance
//! bookkeeping and lag from librdkafka's statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use walrelay_common::kafka::{Reachability, quiet_log};
use walrelay_common::telemetry::Readiness;

use super::{Pending, pending};
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;

/// A failure to set up or use the consumer group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The client could not be created (a bad librdkafka property, usually). Definite.
    #[error("Kafka consumer: {0} (check --kafka-property values)")]
    Client(String),
    /// Subscribing failed. Definite.
    #[error("subscribing to {topic}: {message}")]
    Subscribe {
        /// Topic.
        topic: String,
        /// What librdkafka said.
        message: String,
    },
}

/// librdkafka configuration of a group member: walrelay's defaults, then the user's properties.
pub fn consumer_config(settings: &RuntimeSettings, group_id: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    let queued_kbytes = (settings.max_queued_bytes / 1024).max(1024);
    // librdkafka checks the queue's cap before a fetch, so one fetch response can overshoot it,
    // and fetch.max.bytes counts compressed bytes: a response of lz4-compressed envelopes
    // decompresses to several times its size. So an eighth of the queue (1 MiB at least: it may
    // not be below message.max.bytes); a quarter cost the benchmark about 3 MiB more.
    let fetch_max = (settings.max_queued_bytes / 8).max(1 << 20);
    for (k, v) in [
        ("bootstrap.servers", settings.kafka_brokers.clone()),
        ("group.id", group_id.to_string()),
        ("client.id", "walrelay-consumer".into()),
        ("partition.assignment.strategy", "cooperative-sticky".into()),
        ("enable.auto.commit", "true".into()),
        ("auto.commit.interval.ms", "1000".into()),
        // Offsets are stored by the runtime only after the sink handled the batch.
        ("enable.auto.offset.store", "false".into()),
        ("auto.offset.reset", "earliest".into()),
        // Only records of committed Kafka transactions (librdkafka's default, stated so no
        // property file can change it: the option check refuses read_uncommitted).
        ("isolation.level", "read_committed".into()),
        ("enable.partition.eof", "false".into()),
        // Bounded prefetch, whatever the backlog.
        ("queued.max.messages.kbytes", queued_kbytes.to_string()),
        ("fetch.max.bytes", fetch_max.to_string()),
        (
            "max.partition.fetch.bytes",
            (1usize << 20).min(fetch_max).to_string(),
        ),
        ("fetch.wait.max.ms", "20".into()),
        // librdkafka postpones a partition's next fetch by this much once the queue is full
        // (default 1 s): with a bounded queue that stalled the consumer every half second.
        ("fetch.queue.backoff.ms", "5".into()),
        ("statistics.interval.ms", "5000".into()),
        // A topic created after the consumer subscribed (the producer started later) is seen,
        // and assigned, within seconds instead of librdkafka's default 5 minutes.
        ("topic.metadata.refresh.interval.ms", "5000".into()),
        ("session.timeout.ms", "10000".into()),
        ("heartbeat.interval.ms", "1000".into()),
        ("max.poll.interval.ms", "600000".into()),
    ] {
        cfg.set(k, v);
    }
    for (k, v) in &settings.kafka_properties {
        cfg.set(k, v);
    }
    cfg
}

/// Rebalance bookkeeping shared with librdkafka's callbacks.
pub struct GroupContext {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    /// Current assignment epoch per assigned partition.
    epochs: Mutex<HashMap<i32, u64>>,
    next_epoch: AtomicU64,
    reachability: Reachability,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.reachability
            .on_error(&error, reason, "consuming resumes when it is back");
    }

    fn stats(&self, statistics: Statistics) {
        for topic in statistics.topics.values() {
            for (id, p) in &topic.partitions {
                if *id >= 0 && p.consumer_lag >= 0 {
                    self.metrics
                        .lag_messages
                        .with_label_values(&[&id.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut epochs = walrelay_common::sync::lock(&self.epochs);
            for e in tpl.elements() {
                epochs.remove(&e.partition());
                let _ = self
                    .metrics
                    .lag_messages
                    .remove_label_values(&[&e.partition().to_string()]);
            }
            self.metrics.assigned_partitions.set(epochs.len() as i64);
            tracing::info!(revoked = ?partitions(tpl), "Partitions revoked.");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.metrics.rebalances.inc();
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut epochs = walrelay_common::sync::lock(&self.epochs);
                for e in tpl.elements() {
                    let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
                    epochs.insert(e.partition(), epoch);
                }
                self.metrics.assigned_partitions.set(epochs.len() as i64);
                self.readiness.set("kafka", true);
                tracing::info!(assigned = ?partitions(tpl), total = epochs.len(), "Partitions assigned.");
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "Rebalance failed."),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = ?partitions(offsets), "Offsets committed."),
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Committing offsets failed; they are retried with the next commit.")
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

/// A member of the consumer group, subscribed to the topic.
pub struct Group {
    consumer: StreamConsumer<GroupContext>,
    last_error_log: Mutex<Option<Instant>>,
}

impl Group {
    /// Creates the consumer and subscribes.
    pub fn join(
        settings: &RuntimeSettings,
        group_id: &str,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> Result<Self, GroupError> {
        readiness.set("kafka", false);
        let context = GroupContext {
            metrics,
            reachability: Reachability::new(readiness.clone()),
            readiness,
            epochs: Mutex::new(HashMap::new()),
            next_epoch: AtomicU64::new(1),
        };
        let consumer: StreamConsumer<GroupContext> = consumer_config(settings, group_id)
            .create_with_context(context)
            .map_err(|e| GroupError::Client(e.to_string()))?;
        consumer
            .subscribe(&[&settings.topic])
            .map_err(|e| GroupError::Subscribe {
                topic: settings.topic.clone(),
                message: e.to_string(),
            })?;
        tracing::info!(topic = %settings.topic, group = group_id, "Joined the consumer group.");
        Ok(Self {
            consumer,
            last_error_log: Mutex::new(None),
        })
    }

    /// The librdkafka consumer.
    pub fn consumer(&self) -> &StreamConsumer<GroupContext> {
        &self.consumer
    }

    /// The current assignment epoch of `partition`, `None` when it is not assigned.
    pub fn epoch(&self, partition: i32) -> Option<u64> {
        walrelay_common::sync::lock(&self.consumer.context().epochs)
            .get(&partition)
            .copied()
    }

    /// A message that is already fetched, without waiting; its key and value are appended to
    /// `bytes`.
    pub(super) fn try_recv(&self, bytes: &mut Vec<u8>) -> Option<Pending> {
        use futures_util::FutureExt as _;
        match self.consumer.recv().now_or_never()? {
            Ok(m) => {
                let epoch = self.epoch(m.partition()).unwrap_or(0);
                Some(pending(&m, epoch, bytes))
            }
            Err(e) => {
                tracing::debug!(error = %e, "Kafka consumer error.");
                None
            }
        }
    }

    /// The next message, or `None` when `deadline` passes first (or after a client error); its
    /// key and value are appended to `bytes`.
    pub(super) async fn recv(
        &self,
        deadline: Option<Instant>,
        bytes: &mut Vec<u8>,
    ) -> Option<Pending> {
        let wait = deadline.map_or(Duration::from_secs(1), |d| {
            d.saturating_duration_since(Instant::now())
        });
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => None,
            Ok(Ok(m)) => {
                self.consumer.context().reachability.answered();
                let epoch = self.epoch(m.partition()).unwrap_or(0);
                Some(pending(&m, epoch, bytes))
            }
            Ok(Err(e)) => {
                {
                    let mut last = walrelay_common::sync::lock(&self.last_error_log);
                    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "Kafka consumer error; retrying.");
                        *last = Some(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            }
        }
    }
}
