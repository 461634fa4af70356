//! Membership of the consumer group: the librdkafka consumer, its configuration, the
//! subscription (one topic, or the topics a pattern selects, followed as they come and go),
//! rebalance bookkeeping per topic-partition and lag.
//!
//! Lag (`walrelay_consumer_lag_messages`) comes from librdkafka's statistics while a
//! topic-partition is fetched, and from the broker while the runtime has paused fetching it
//! (the statistics' figure freezes at the pause: [`crate::lag`], every [`lag::INTERVAL`] by
//! [`refresh_lag`]); the runtime tells the group what it paused ([`Group::paused`]). Only
//! assigned topic-partitions have a lag series: a revoke removes it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use walrelay_common::kafka::{Reachability, quiet_log};
use walrelay_common::telemetry::Readiness;

use super::{Pending, pending};
use crate::config::RuntimeSettings;
use crate::lag::{self, Epochs};
use crate::metrics::Metrics;
use crate::topics::{self, TopicPattern, Topics};

/// A failure to set up or use the consumer group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The client could not be created (a bad librdkafka property, usually). Definite.
    #[error("Kafka consumer: {0} (check --kafka-property values)")]
    Client(String),
    /// Subscribing failed. Definite.
    #[error("subscribing to {topic}: {message}")]
    Subscribe {
        /// The topic, or the topics a pattern selected.
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
        // and assigned, within seconds instead of librdkafka's default 5 minutes. Also how
        // often a --topic-pattern is resolved again (crate::topics).
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

/// The paused topic-partitions, with the assignment epoch each was paused under.
pub(super) type Paused = lag::Paused;

/// Rebalance bookkeeping shared with librdkafka's callbacks.
pub struct GroupContext {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    /// Current assignment epoch per assigned topic-partition (the topic's name is kept once,
    /// shared by every event read from it: `Event::topic`). Locked before `lags` where both
    /// are held.
    epochs: Mutex<Epochs>,
    next_epoch: AtomicU64,
    /// What each assigned topic-partition's lag is computed from, and which are paused.
    lags: lag::Lags,
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
        let epochs = walrelay_common::sync::lock(&self.epochs);
        self.lags.statistics(
            lag::reports(&statistics),
            &epochs,
            |topic, partition, lag| {
                set_lag(&self.metrics, topic, partition, lag);
            },
        );
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut epochs = walrelay_common::sync::lock(&self.epochs);
            for e in tpl.elements() {
                if let Some(partitions) = epochs.get_mut(e.topic()) {
                    partitions.remove(&e.partition());
                    if partitions.is_empty() {
                        epochs.remove(e.topic());
                    }
                }
                self.lags.revoked(e.topic(), e.partition());
                let _ = self
                    .metrics
                    .lag_messages
                    .remove_label_values(&[e.topic(), &e.partition().to_string()]);
            }
            self.metrics.assigned_partitions.set(assigned(&epochs));
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
                    crate::lag::assign_epoch(&mut epochs, e.topic(), e.partition(), epoch);
                }
                let total = assigned(&epochs);
                self.metrics.assigned_partitions.set(total);
                self.readiness.set("kafka", true);
                tracing::info!(assigned = ?partitions(tpl), total, "Partitions assigned.");
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

/// `topic/partition` of each element, for logs.
fn partitions(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

/// How many topic-partitions are assigned.
fn assigned(epochs: &Epochs) -> i64 {
    epochs.values().map(HashMap::len).sum::<usize>() as i64
}

/// Sets a topic-partition's `walrelay_consumer_lag_messages`.
fn set_lag(metrics: &Metrics, topic: &str, partition: i32, lag: i64) {
    metrics
        .lag_messages
        .with_label_values(&[topic, &partition.to_string()])
        .set(lag);
}

/// A member of the consumer group, subscribed to the topic or to the topics a pattern selects.
pub struct Group {
    consumer: StreamConsumer<GroupContext>,
    last_error_log: Mutex<Option<Instant>>,
    /// The topics a pattern selected at its last resolution, and those it skipped for their
    /// side-topic names (logged once each); unused for one topic.
    subscribed: Mutex<(BTreeSet<String>, BTreeSet<String>)>,
}

impl Group {
    /// Creates the consumer and subscribes to one topic; a pattern's subscription is left to
    /// [`follow`].
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
            lags: lag::Lags::default(),
        };
        let consumer: StreamConsumer<GroupContext> = consumer_config(settings, group_id)
            .create_with_context(context)
            .map_err(|e| GroupError::Client(e.to_string()))?;
        if let Topics::One(topic) = &settings.topics {
            consumer
                .subscribe(&[topic])
                .map_err(|e| GroupError::Subscribe {
                    topic: topic.clone(),
                    message: e.to_string(),
                })?;
        }
        tracing::info!(topics = %settings.topics, group = group_id, "Joined the consumer group.");
        Ok(Self {
            consumer,
            last_error_log: Mutex::new(None),
            subscribed: Mutex::new((BTreeSet::new(), BTreeSet::new())),
        })
    }

    /// Resolves `pattern` against the cluster's topics and subscribes to what it selects, when
    /// that changed since the last time (blocking: a metadata request); how many it selects.
    fn resubscribe(&self, pattern: &TopicPattern) -> Result<usize, GroupError> {
        let all = topics::listed(&self.consumer, None, Duration::from_secs(10)).map_err(|e| {
            GroupError::Subscribe {
                topic: format!("topics matching {:?}", pattern.as_str()),
                message: e.to_string(),
            }
        })?;
        let selected: BTreeSet<String> =
            all.keys().filter(|t| pattern.selects(t)).cloned().collect();
        let mut guard = walrelay_common::sync::lock(&self.subscribed);
        let (subscribed, skipped) = &mut *guard;
        skipped.retain(|t| all.contains_key(t));
        for t in all.keys().filter(|t| pattern.skips_as_side_topic(t)) {
            if skipped.insert(t.clone()) {
                tracing::warn!(topic = %t, pattern = %pattern.as_str(), "Not reading a matching topic: it is named like a walrelay side topic. If it is a table's topic, use --include-side-topics with a pattern that leaves the side topics out.");
            }
        }
        if *subscribed == selected {
            return Ok(selected.len());
        }
        let added: Vec<&String> = selected.difference(subscribed).collect();
        let removed: Vec<&String> = subscribed.difference(&selected).collect();
        tracing::info!(pattern = %pattern.as_str(), ?added, ?removed, "The topics the pattern selects changed; subscribing again.");
        if selected.is_empty() {
            self.consumer.unsubscribe();
        } else {
            let names: Vec<&str> = selected.iter().map(String::as_str).collect();
            self.consumer
                .subscribe(&names)
                .map_err(|e| GroupError::Subscribe {
                    topic: names.join(","),
                    message: e.to_string(),
                })?;
        }
        let count = selected.len();
        *subscribed = selected;
        Ok(count)
    }

    /// The librdkafka consumer.
    pub fn consumer(&self) -> &StreamConsumer<GroupContext> {
        &self.consumer
    }

    /// The current assignment epoch of `topic`'s `partition`, `None` when it is not assigned.
    pub fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        walrelay_common::sync::lock(&self.consumer.context().epochs)
            .get(topic)?
            .get(&partition)
            .copied()
    }

    /// Every assigned topic-partition with its assignment epoch.
    pub(super) fn assigned(&self) -> Vec<(Arc<str>, i32, u64)> {
        walrelay_common::sync::lock(&self.consumer.context().epochs)
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().map(|(p, e)| (Arc::clone(topic), *p, *e))
            })
            .collect()
    }

    /// The runtime now pauses fetching exactly `paused` (each under the assignment epoch it was
    /// paused under): their lag is taken from the broker ([`refresh_lag`]) until they resume.
    pub(super) fn paused(&self, paused: &Paused) {
        let context = self.consumer.context();
        let epochs = walrelay_common::sync::lock(&context.epochs);
        context.lags.paused(paused, &epochs);
    }

    /// The consumer's metrics.
    pub(super) fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.consumer.context().metrics)
    }

    /// The shared name of `topic` and the current assignment epoch of its `partition` (0, which
    /// no assignment has, when it is not assigned: the record is dropped before the sink).
    fn assignment(&self, topic: &str, partition: i32) -> (Arc<str>, u64) {
        let epochs = walrelay_common::sync::lock(&self.consumer.context().epochs);
        match epochs.get_key_value(topic) {
            Some((name, partitions)) => (
                Arc::clone(name),
                partitions.get(&partition).copied().unwrap_or(0),
            ),
            None => (Arc::from(topic), 0),
        }
    }

    /// A fetched message as a batch entry.
    fn entry<M: Message>(&self, m: &M, bytes: &mut Vec<u8>) -> Pending {
        let (topic, epoch) = self.assignment(m.topic(), m.partition());
        pending(m, topic, epoch, bytes)
    }

    /// A message that is already fetched, without waiting; its key and value are appended to
    /// `bytes`.
    pub(super) fn try_recv(&self, bytes: &mut Vec<u8>) -> Option<Pending> {
        use futures_util::FutureExt as _;
        match self.consumer.recv().now_or_never()? {
            Ok(m) => Some(self.entry(&m, bytes)),
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
                Some(self.entry(&m, bytes))
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

/// Keeps a pattern's subscription current: resolves it at once, then every `interval`, until
/// the group is dropped. A failed resolution keeps the last subscription and is tried again
/// (logged once a minute at most).
pub async fn follow(group: Weak<Group>, pattern: TopicPattern, interval: Duration) {
    let mut last_warning: Option<Instant> = None;
    let mut first = true;
    loop {
        let Some(g) = group.upgrade() else {
            return;
        };
        let p = pattern.clone();
        let resolved = tokio::task::spawn_blocking(move || g.resubscribe(&p)).await;
        match resolved {
            Ok(Ok(selected)) => {
                if first && selected == 0 {
                    tracing::info!(pattern = %pattern.as_str(), "No topic matches the pattern yet; waiting for one.");
                }
                first = false;
            }
            Ok(Err(e)) => {
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %e, "Could not resolve the topic pattern; retrying.");
                    last_warning = Some(Instant::now());
                }
            }
            Err(e) => tracing::error!(error = %e, "The topic pattern task failed; retrying."),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Keeps the lag of paused topic-partitions current ([`crate::lag`]): every [`lag::INTERVAL`]
/// until the group is dropped. A failure keeps the last values and is tried again at the next
/// interval (logged once a minute at most).
pub async fn refresh_lag(group: Weak<Group>) {
    let warnings = lag::Throttle::default();
    loop {
        tokio::time::sleep(lag::INTERVAL).await;
        let Some(g) = group.upgrade() else {
            return;
        };
        let probes = g.consumer.context().lags.probes();
        if probes.is_empty() {
            continue;
        }
        let refreshed = tokio::task::spawn_blocking(move || {
            let context = g.consumer.context();
            lag::refresh_paused(
                &g.consumer,
                &context.lags,
                &probes,
                |topic, partition, lag| {
                    set_lag(&context.metrics, topic, partition, lag);
                },
            )
        })
        .await;
        let refreshed = match refreshed {
            Ok(r) => r,
            Err(e) => Err(lag::LagError::Task(e.to_string())),
        };
        match refreshed {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                partitions = n,
                "Lag of paused partitions taken from the broker."
            ),
            Err(e) => {
                if warnings.due() {
                    tracing::warn!(error = %e, "Could not refresh the lag of paused partitions; the last values stay.");
                }
            }
        }
    }
}

/// How often [`follow`] resolves the pattern.
pub fn follow_interval(settings: &RuntimeSettings) -> Duration {
    topics::refresh_interval(&settings.kafka_properties)
}
