//! Lag per topic-partition (`walrelay_consumer_lag_messages`), and where it is taken from.
//!
//! librdkafka's statistics (every `statistics.interval.ms`, 5 s) carry each partition's
//! `consumer_lag`: the end of the partition (the last stable offset, under `read_committed`)
//! minus the group's committed offset. librdkafka learns the end from its fetch responses, so
//! while the runtime has paused fetching a topic-partition (the sink is stalled, or its backlog
//! full: the runtime's "Polling never stops") the end stays where it was when the pause began
//! and so does the lag, flat exactly while a stalled sink falls behind (librdkafka issue
//! #4996). An alert on growing lag could never fire for the consumer it exists for.
//!
//! So the lag of a paused topic-partition is taken from the broker instead. Every
//! [`INTERVAL`], [`refresh`] asks for the end offsets of the paused topic-partitions (ListOffsets
//! for the latest offset: one request per partition leader, covering all of them, with a
//! [`TIMEOUT`]) on a blocking thread, never inside a librdkafka callback or the poll loop, and
//! subtracts the committed offset the statistics last reported for each (commits go on while
//! fetching is paused, and the statistics keep reporting them). The statistics do not
//! overwrite that value while the pause lasts; once fetching resumes they take over again. A
//! failed query keeps the last values and is logged once a minute at most.
//!
//! ListOffsets is asked under the consumer's isolation level, so the end is the last stable
//! offset, the one the statistics use. Lag is counted in offsets either way: under
//! exactly-once delivery each Kafka transaction's commit marker takes an offset in every
//! partition it wrote to and is never delivered, so the lag reads a few more than the records
//! left to read (1 per partition at rest; while paused, one per transaction written since the
//! committed offset).
//!
//! Only assigned topic-partitions have a lag: the statistics' figures for any other are
//! ignored, and a revoke forgets what was kept here as it removes the series.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use walrelay_common::sync::lock;

use super::{Epochs, Group, GroupContext};
use crate::metrics::Metrics;

/// How often the lag of paused topic-partitions is taken from the broker (as often as the
/// statistics come).
pub const INTERVAL: Duration = Duration::from_secs(5);

/// How long the broker gets to answer for the end offsets.
const TIMEOUT: Duration = Duration::from_secs(2);

/// How often a failing query is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why the lag of paused topic-partitions could not be refreshed (the last values stay).
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// The ListOffsets query failed as a whole (no leader known, broker unreachable, timeout).
    #[error("asking the broker for the end of {partitions} paused partition(s): {error}")]
    Query {
        /// How many topic-partitions were asked about.
        partitions: usize,
        /// What librdkafka said.
        error: KafkaError,
    },
    /// The broker gave no end offset for some topic-partitions.
    #[error("no end offset for {failed} paused partition(s), {topic}/{partition} first: {reason}")]
    Partitions {
        /// How many failed.
        failed: usize,
        /// The first one's topic.
        topic: String,
        /// The first one's partition.
        partition: i32,
        /// Why.
        reason: String,
    },
    /// The blocking task asking the broker failed.
    #[error("the lag task failed: {0}")]
    Task(String),
}

/// What one assigned topic-partition's lag is computed from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    /// The group's committed offset, as the last statistics reported it.
    committed: Option<i64>,
    /// The assignment epoch under which the runtime paused fetching it; `None` while fetched.
    paused: Option<u64>,
}

/// A paused topic-partition to ask the broker about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    topic: Arc<str>,
    partition: i32,
    /// The assignment it was paused under: an answer for another one is dropped.
    epoch: u64,
}

/// One partition's figures in a statistics report.
#[derive(Debug, Clone, Copy)]
pub struct Reported<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition (librdkafka reports an internal one as -1).
    pub partition: i32,
    /// The group's committed offset (negative: none known).
    pub committed: i64,
    /// librdkafka's `consumer_lag` (negative: none known).
    pub lag: i64,
}

/// Per assigned topic-partition: the committed offset from the statistics, and whether the
/// runtime paused it. Shared by librdkafka's callbacks, the reader and [`refresh`]; taken after
/// the group's epochs where both are held.
#[derive(Default)]
pub struct Lags(Mutex<HashMap<Arc<str>, HashMap<i32, Tracked>>>);

impl Lags {
    /// Takes a statistics report: keeps the committed offsets of the assigned topic-partitions
    /// and sets the lag of those being fetched (a paused one's is the broker's).
    pub fn statistics<'a>(
        &self,
        reports: impl IntoIterator<Item = Reported<'a>>,
        epochs: &Epochs,
        metrics: &Metrics,
    ) {
        let mut tracked = lock(&self.0);
        for r in reports {
            let Some((name, partitions)) = epochs.get_key_value(r.topic) else {
                continue;
            };
            if !partitions.contains_key(&r.partition) {
                continue;
            }
            let t = tracked
                .entry(Arc::clone(name))
                .or_default()
                .entry(r.partition)
                .or_default();
            if r.committed >= 0 {
                t.committed = Some(r.committed);
            }
            if t.paused.is_none() && r.lag >= 0 {
                set(metrics, r.topic, r.partition, r.lag);
            }
        }
    }

    /// The runtime now pauses fetching exactly `paused` (each with the assignment epoch it was
    /// paused under); one paused under an assignment that is not current any more is ignored.
    pub fn paused(&self, paused: &HashMap<(Arc<str>, i32), u64>, epochs: &Epochs) {
        let mut tracked = lock(&self.0);
        for t in tracked.values_mut().flat_map(HashMap::values_mut) {
            t.paused = None;
        }
        for ((topic, partition), epoch) in paused {
            let Some((name, partitions)) = epochs.get_key_value(topic) else {
                continue;
            };
            if partitions.get(partition) == Some(epoch) {
                tracked
                    .entry(Arc::clone(name))
                    .or_default()
                    .entry(*partition)
                    .or_default()
                    .paused = Some(*epoch);
            }
        }
    }

    /// Forgets a revoked topic-partition (its lag series is removed by the caller).
    pub fn revoked(&self, topic: &str, partition: i32) {
        let mut tracked = lock(&self.0);
        if let Some(partitions) = tracked.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                tracked.remove(topic);
            }
        }
    }

    /// The paused topic-partitions whose committed offset is known (the others have no lag to
    /// compute yet: the next statistics tell).
    pub fn probes(&self) -> Vec<Probe> {
        lock(&self.0)
            .iter()
            .flat_map(|(topic, partitions)| {
                partitions.iter().filter_map(|(partition, t)| {
                    t.committed?;
                    Some(Probe {
                        topic: Arc::clone(topic),
                        partition: *partition,
                        epoch: t.paused?,
                    })
                })
            })
            .collect()
    }

    /// Sets the lag of `probe` from the end offset the broker gave, unless it was resumed or
    /// revoked meanwhile (a revoke removes the series: it must not come back). Whether it was
    /// set.
    pub fn answered(&self, probe: &Probe, end: i64, metrics: &Metrics) -> bool {
        let tracked = lock(&self.0);
        let Some(t) = tracked
            .get(&probe.topic)
            .and_then(|partitions| partitions.get(&probe.partition))
        else {
            return false;
        };
        match (t.paused, t.committed) {
            (Some(epoch), Some(committed)) if epoch == probe.epoch => {
                // The metric is set under the lock, so a revoke's removal comes after it.
                set(
                    metrics,
                    &probe.topic,
                    probe.partition,
                    (end - committed).max(0),
                );
                true
            }
            _ => false,
        }
    }
}

fn set(metrics: &Metrics, topic: &str, partition: i32, lag: i64) {
    metrics
        .lag_messages
        .with_label_values(&[topic, &partition.to_string()])
        .set(lag);
}

/// Keeps the lag of paused topic-partitions current (see the module's documentation): every
/// [`INTERVAL`] until the group is dropped. A failure keeps the last values and is tried again
/// at the next interval (logged once a minute at most).
pub async fn refresh(group: Weak<Group>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        tokio::time::sleep(INTERVAL).await;
        let Some(g) = group.upgrade() else {
            return;
        };
        match refresh_once(g).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(
                partitions = n,
                "Lag of paused partitions taken from the broker."
            ),
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() > WARN_EVERY) {
                    tracing::warn!(error = %e, "Could not refresh the lag of paused partitions; the last values stay.");
                    last_warning = Some(Instant::now());
                }
            }
        }
    }
}

/// One round of [`refresh`]: how many topic-partitions' lag was set.
async fn refresh_once(group: Arc<Group>) -> Result<usize, LagError> {
    let probes = group.consumer.context().lags.probes();
    if probes.is_empty() {
        return Ok(0);
    }
    tokio::task::spawn_blocking(move || {
        let ends = end_offsets(&group.consumer, &probes)?;
        let context = group.consumer.context();
        let mut refreshed = 0;
        let mut first_failure: Option<LagError> = None;
        for (probe, end) in probes.iter().zip(ends) {
            match (end, &mut first_failure) {
                (Ok(end), _) => {
                    refreshed += usize::from(context.lags.answered(probe, end, &context.metrics));
                }
                (Err(_), Some(LagError::Partitions { failed, .. })) => *failed += 1,
                (Err(reason), _) => {
                    first_failure = Some(LagError::Partitions {
                        failed: 1,
                        topic: probe.topic.to_string(),
                        partition: probe.partition,
                        reason,
                    });
                }
            }
        }
        first_failure.map_or(Ok(refreshed), Err)
    })
    .await
    .map_err(|e| LagError::Task(e.to_string()))?
}

/// The end offset of each probed topic-partition (blocking: ListOffsets for the latest offset,
/// one request per leader), or why the broker gave none.
fn end_offsets(
    consumer: &StreamConsumer<GroupContext>,
    probes: &[Probe],
) -> Result<Vec<Result<i64, String>>, LagError> {
    let mut asked = TopicPartitionList::new();
    for p in probes {
        // The "offset" of a ListOffsets query is a timestamp; -1 (`Offset::End`) is the latest.
        asked
            .add_partition_offset(&p.topic, p.partition, Offset::End)
            .map_err(|error| LagError::Query {
                partitions: probes.len(),
                error,
            })?;
    }
    let answer = consumer
        .offsets_for_times(asked, TIMEOUT)
        .map_err(|error| LagError::Query {
            partitions: probes.len(),
            error,
        })?;
    Ok(probes
        .iter()
        .map(|p| {
            let e = answer
                .find_partition(&p.topic, p.partition)
                .ok_or_else(|| "missing from the answer".to_string())?;
            e.error().map_err(|err| err.to_string())?;
            match e.offset() {
                Offset::Offset(end) if end >= 0 => Ok(end),
                other => Err(format!("no offset in the answer ({other:?})")),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs(assigned: &[(&str, i32, u64)]) -> Epochs {
        let mut e = Epochs::new();
        for (topic, partition, epoch) in assigned {
            e.entry(Arc::from(*topic))
                .or_default()
                .insert(*partition, *epoch);
        }
        e
    }

    fn report(topic: &str, partition: i32, committed: i64, lag: i64) -> Reported<'_> {
        Reported {
            topic,
            partition,
            committed,
            lag,
        }
    }

    /// The lag series of `topic`/`partition`, `None` when there is none.
    fn lag(m: &Metrics, topic: &str, partition: i32) -> Option<i64> {
        let partition = partition.to_string();
        m.registry
            .gather()
            .iter()
            .filter(|f| f.name() == "walrelay_consumer_lag_messages")
            .flat_map(|f| f.get_metric())
            .find(|s| {
                let label = |name: &str| {
                    s.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                label("topic").as_deref() == Some(topic)
                    && label("partition").as_deref() == Some(partition.as_str())
            })
            .map(|s| s.get_gauge().value() as i64)
    }

    fn paused(list: &[(&str, i32, u64)]) -> HashMap<(Arc<str>, i32), u64> {
        list.iter()
            .map(|(t, p, e)| ((Arc::from(*t), *p), *e))
            .collect()
    }

    #[test]
    fn statistics_set_the_lag_of_fetched_partitions_only() {
        let m = Metrics::new().expect("metrics");
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 1), ("t", 1, 2)]);
        lags.statistics([report("t", 0, 10, 5), report("t", 1, 20, 7)], &e, &m);
        assert_eq!(lag(&m, "t", 0), Some(5));
        assert_eq!(lag(&m, "t", 1), Some(7));

        // Paused: the statistics' frozen figure does not overwrite the broker's.
        lags.paused(&paused(&[("t", 1, 2)]), &e);
        let probes = lags.probes();
        assert_eq!(probes.len(), 1);
        assert!(lags.answered(&probes[0], 120, &m));
        assert_eq!(lag(&m, "t", 1), Some(100));
        lags.statistics([report("t", 0, 10, 6), report("t", 1, 30, 7)], &e, &m);
        assert_eq!(lag(&m, "t", 0), Some(6));
        assert_eq!(lag(&m, "t", 1), Some(100));
        // The committed offset still follows the statistics while paused.
        assert!(lags.answered(&probes[0], 130, &m));
        assert_eq!(lag(&m, "t", 1), Some(100));

        // Resumed: the statistics take over; a late answer is dropped.
        lags.paused(&HashMap::new(), &e);
        assert!(!lags.answered(&probes[0], 999, &m));
        lags.statistics([report("t", 1, 40, 3)], &e, &m);
        assert_eq!(lag(&m, "t", 1), Some(3));
    }

    #[test]
    fn unassigned_partitions_and_stale_epochs_get_no_lag() {
        let m = Metrics::new().expect("metrics");
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 3)]);
        lags.statistics(
            [
                report("t", 1, 10, 5),
                report("u", 0, 10, 5),
                report("t", -1, 0, 1),
            ],
            &e,
            &m,
        );
        assert_eq!(lag(&m, "t", 1), None);
        assert_eq!(lag(&m, "u", 0), None);
        assert_eq!(lag(&m, "t", -1), None);

        // Paused under an older assignment: not tracked as paused.
        lags.statistics([report("t", 0, 10, 5)], &e, &m);
        lags.paused(&paused(&[("t", 0, 2)]), &e);
        assert!(lags.probes().is_empty());
    }

    #[test]
    fn a_revoke_wins_over_a_late_answer_and_an_unknown_commit_is_not_probed() {
        let m = Metrics::new().expect("metrics");
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 1), ("t", 1, 1)]);
        // Partition 1 has no committed offset yet: nothing to compute.
        lags.statistics([report("t", 0, 10, 5), report("t", 1, -1001, -1)], &e, &m);
        lags.paused(&paused(&[("t", 0, 1), ("t", 1, 1)]), &e);
        let probes = lags.probes();
        assert_eq!(probes.len(), 1, "{probes:?}");
        lags.revoked("t", 0);
        let _ = m.lag_messages.remove_label_values(&["t", "0"]);
        assert!(!lags.answered(&probes[0], 50, &m));
        assert_eq!(lag(&m, "t", 0), None);
    }
}
