//! One connection's Kafka group member, and the offset queries the gateway makes: end offsets
//! when a connection opens, where newly assigned partitions start, and a group's lag
//! (`GET /v1/lag`).
//!
//! The member is configured as the runtime's ([`crate::runtime::consumer_config`]: cooperative
//! rebalancing, offsets committed only once stored, read_committed, bounded prefetch) with
//! three changes: `auto.offset.reset` is the connection's `from`, partition ends are reported
//! (for `caught_up`), and it has a context of its own whose rebalance callbacks give each
//! assignment of a partition a new epoch, as the runtime's do.
//!
//! The member's lag (the connection's share of `walrelay_consumer_stream_group_lag_messages`)
//! is the sum over its assigned partitions of the runtime's rule ([`crate::lag`]): librdkafka's
//! statistics while the partitions are fetched; while the session has paused them (its client
//! does not keep up: the session's step 3) the statistics freeze at the pause, so the session
//! tells the member ([`MemberContext::paused`]) and takes their lag from the broker every
//! [`lag::INTERVAL`] instead ([`refresh_lag`], on a blocking thread), until it resumes them.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use walrelay_common::kafka::{QuietContext, quiet_log};

use super::query::Start;
use crate::config::RuntimeSettings;
use crate::lag::{self, Epochs, LagError, Lags, Paused};
use crate::topics::{self, TopicPattern, Topics};

/// Longest wait of one metadata or offset request.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic-partition by name.
pub type Tp = (String, i32);

/// Rebalance bookkeeping of one member, shared with librdkafka's callbacks (which run inside
/// the session's poll).
#[derive(Default)]
pub struct MemberContext {
    /// Current epoch per assigned partition. Locked before `lags` where both are held.
    epochs: Mutex<Epochs>,
    next_epoch: AtomicU64,
    /// Bumped at every assignment change.
    generation: AtomicU64,
    /// What each assigned partition's lag is computed from, whether it is paused, and its lag.
    lags: Lags,
    /// Whether statistics came yet (the lag is unknown before).
    reported: AtomicBool,
}

impl ClientContext for MemberContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka client error (stream member).");
    }

    fn stats(&self, statistics: Statistics) {
        let epochs = walrelay_common::sync::lock(&self.epochs);
        // Only the sum is published (`lag`).
        self.lags
            .statistics(lag::reports(&statistics), &epochs, |_, _, _| {});
        self.reported.store(true, Ordering::Relaxed);
    }
}

impl ConsumerContext for MemberContext {
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
            }
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut epochs = walrelay_common::sync::lock(&self.epochs);
            for e in tpl.elements() {
                let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed) + 1;
                crate::lag::assign_epoch(&mut epochs, e.topic(), e.partition(), epoch);
            }
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl MemberContext {
    /// The current epoch of an assigned partition.
    pub fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        walrelay_common::sync::lock(&self.epochs)
            .get(topic)?
            .get(&partition)
            .copied()
    }

    /// The assigned partitions with their epochs.
    pub fn assigned(&self) -> HashMap<Tp, u64> {
        walrelay_common::sync::lock(&self.epochs)
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions
                    .iter()
                    .map(|(p, e)| ((topic.to_string(), *p), *e))
            })
            .collect()
    }

    /// The session now pauses fetching of every assigned partition (`true`: their lag is
    /// taken from the broker, [`refresh_lag`]) or of none (the statistics take over again).
    pub fn paused(&self, pause: bool) {
        let epochs = walrelay_common::sync::lock(&self.epochs);
        let paused: Paused = if pause {
            epochs
                .iter()
                .flat_map(|(topic, partitions)| {
                    partitions
                        .iter()
                        .map(|(p, e)| ((Arc::clone(topic), *p), *e))
                })
                .collect()
        } else {
            Paused::new()
        };
        self.lags.paused(&paused, &epochs);
    }

    /// Changes with every assignment change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The lag of the assigned partitions: librdkafka's last figures, the broker's for paused
    /// ones; `None` before the first statistics.
    pub fn lag(&self) -> Option<i64> {
        self.reported
            .load(Ordering::Relaxed)
            .then(|| self.lags.total())
    }
}

/// Takes the lag of the member's paused partitions from the broker ([`lag::refresh_paused`]);
/// how many were set. Blocking (ListOffsets, [`lag::TIMEOUT`] at most): run it on a blocking
/// thread.
pub fn refresh_lag(member: &Member) -> Result<usize, LagError> {
    let lags = &member.context().lags;
    lag::refresh_paused(member, lags, &lags.probes(), |_, _, _| {})
}

/// A member's consumer.
pub type Member = StreamConsumer<MemberContext>;

/// Creates a member of `group_id` (not subscribed yet).
pub fn member(
    settings: &RuntimeSettings,
    group_id: &str,
    start: Start,
) -> Result<Member, KafkaError> {
    let mut cfg = crate::runtime::consumer_config(settings, group_id);
    cfg.set("auto.offset.reset", start.reset());
    cfg.set("enable.partition.eof", "true");
    cfg.set("client.id", "walrelay-stream");
    cfg.create_with_context(MemberContext::default())
}

/// The end offset (high watermark) of every partition of the topics read, now (blocking).
pub fn ends<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topics: &Topics,
) -> Result<HashMap<Tp, i64>, KafkaError> {
    let mut out = HashMap::new();
    for (topic, ids) in topics.partitions(consumer, QUERY_TIMEOUT)? {
        for p in ids {
            let (_, high) = consumer.fetch_watermarks(&topic, p, QUERY_TIMEOUT)?;
            out.insert((topic.clone(), p), high);
        }
    }
    Ok(out)
}

/// Where the group starts reading each of `parts` (blocking): its committed offset, else the
/// first offset (`earliest`) or the end (`latest`, given as `i64::MAX`: nothing to catch up).
pub fn starts<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    parts: &[Tp],
    start: Start,
) -> Result<HashMap<Tp, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, *p);
    }
    let committed = consumer.committed_offsets(tpl, QUERY_TIMEOUT)?;
    let mut out = HashMap::new();
    for e in committed.elements() {
        let at = match (e.offset(), start) {
            (Offset::Offset(o), _) => o,
            (_, Start::Latest) => i64::MAX,
            (_, Start::Earliest) => {
                consumer
                    .fetch_watermarks(e.topic(), e.partition(), QUERY_TIMEOUT)?
                    .0
            }
        };
        out.insert((e.topic().to_string(), e.partition()), at);
    }
    Ok(out)
}

/// Subscribes to the topics `pattern` selects when they differ from `current` (blocking: a
/// metadata request); whether the subscription changed.
pub fn follow<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    pattern: &TopicPattern,
    current: &mut BTreeSet<String>,
) -> Result<bool, KafkaError> {
    let selected: BTreeSet<String> = topics::listed(consumer, None, QUERY_TIMEOUT)?
        .into_keys()
        .filter(|t| pattern.selects(t))
        .collect();
    if selected == *current {
        return Ok(false);
    }
    if selected.is_empty() {
        consumer.unsubscribe();
    } else {
        let names: Vec<&str> = selected.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
    }
    *current = selected;
    Ok(true)
}

/// A group's lag over the topics read (blocking): per partition, the end minus the group's
/// committed offset (minus the first offset when it has none).
pub fn group_lag(settings: &RuntimeSettings, group_id: &str) -> Result<i64, KafkaError> {
    let mut cfg = crate::runtime::consumer_config(settings, group_id);
    cfg.set("client.id", "walrelay-stream-lag");
    cfg.set("statistics.interval.ms", "0");
    let consumer: BaseConsumer<QuietContext> = cfg.create_with_context(QuietContext)?;
    let mut tpl = TopicPartitionList::new();
    for (topic, ids) in settings.topics.partitions(&consumer, QUERY_TIMEOUT)? {
        for p in ids {
            tpl.add_partition(&topic, p);
        }
    }
    let committed = consumer.committed_offsets(tpl, QUERY_TIMEOUT)?;
    let mut lag = 0i64;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), QUERY_TIMEOUT)?;
        let from = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - from).max(0);
    }
    Ok(lag)
}
