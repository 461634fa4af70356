//! Lag per assigned topic-partition, and where it is taken from. Shared by the two kinds of
//! group member: the runtime's ([`crate::runtime`]: `walrelay_consumer_lag_messages` per
//! topic-partition) and each stream connection's ([`crate::stream`]: summed per connection into
//! `walrelay_consumer_stream_group_lag_messages`).
//!
//! librdkafka's statistics (every `statistics.interval.ms`, 5 s) carry each partition's
//! `consumer_lag`: the end of the partition (the last stable offset, under `read_committed`)
//! minus the group's committed offset. librdkafka learns the end from its fetch responses, so
//! while a member has paused fetching a topic-partition the end stays where it was when the
//! pause began and so does the lag (librdkafka issue #4996). Both members pause exactly when
//! they fall behind: the runtime while its sink is stalled or its backlog full (the runtime's
//! "Polling never stops"), a stream session while its client does not keep up (the session's
//! step 3). The lag stayed flat exactly while it should grow, and an alert on growing lag could
//! never fire for the consumer it exists for.
//!
//! So the lag of a paused topic-partition is taken from the broker instead. Every
//! [`INTERVAL`] while something is paused, the member asks for the end offsets of its paused
//! topic-partitions ([`refresh_paused`]: ListOffsets for the latest offset, one request per
//! partition leader covering all of them, with a [`TIMEOUT`]) on a blocking thread, never
//! inside a librdkafka callback or a poll loop, and subtracts the committed offset the
//! statistics last reported for each (commits go on while fetching is paused, and the
//! statistics keep reporting them). The statistics do not overwrite that value while the pause
//! lasts; once fetching resumes they take over again. A failed query keeps the last values; the
//! member logs it once a minute at most ([`Throttle`]).
//!
//! ListOffsets is asked under the consumer's isolation level, so the end is the last stable
//! offset, the one the statistics use. Lag is counted in offsets either way: under
//! exactly-once delivery each Kafka transaction's commit marker takes an offset in every
//! partition it wrote to and is never delivered, so the lag reads a few more than the records
//! left to read (1 per partition at rest; while paused, one per transaction written since the
//! committed offset).
//!
//! The bookkeeping is [`Lags`], kept in the member's client context beside its assignment
//! epochs ([`Epochs`]): the statistics callback hands it each report ([`reports`]), the revoke
//! callback forgets what was revoked, and the code that pauses and resumes fetching tells it
//! what is paused. Only assigned topic-partitions have a lag: the statistics' figures for any
//! other are ignored, and a revoke forgets what was kept. Where a lag goes is the member's: a
//! `publish` closure is called, under the lock, with each lag set (so the series a revoke
//! removes cannot come back after it), and [`Lags::total`] sums them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use walrelay_common::sync::lock;

/// How often the lag of paused topic-partitions is taken from the broker (as often as the
/// statistics come).
pub const INTERVAL: Duration = Duration::from_secs(5);

/// How long the broker gets to answer for the end offsets.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// How often a failing query is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Current assignment epoch per assigned partition, by topic (the epoch a member gives each
/// assignment of a partition, so that what belonged to an earlier one is recognised). The
/// topic's name is kept once, shared by everything read from it.
pub type Epochs = HashMap<Arc<str>, HashMap<i32, u64>>;

/// Records `epoch` as the assignment epoch of `topic`'s `partition` (the topic's name is kept
/// once, shared by every partition of it).
pub fn assign_epoch(epochs: &mut Epochs, topic: &str, partition: i32, epoch: u64) {
    match epochs.get_mut(topic) {
        Some(partitions) => {
            partitions.insert(partition, epoch);
        }
        None => {
            epochs.insert(Arc::from(topic), HashMap::from([(partition, epoch)]));
        }
    }
}

/// Paused topic-partitions, with the assignment epoch each was paused under.
pub type Paused = HashMap<(Arc<str>, i32), u64>;

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

/// What one assigned topic-partition's lag is computed from, and its last value.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    /// The group's committed offset, as the last statistics reported it.
    committed: Option<i64>,
    /// The assignment epoch under which fetching it was paused; `None` while fetched.
    paused: Option<u64>,
    /// The last lag set (from the statistics, or from the broker while paused).
    lag: Option<i64>,
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

/// The figures of every partition in a statistics report, for [`Lags::statistics`].
pub fn reports(statistics: &Statistics) -> impl Iterator<Item = Reported<'_>> {
    statistics.topics.values().flat_map(|t| {
        t.partitions.iter().map(|(id, p)| Reported {
            topic: &t.topic,
            partition: *id,
            committed: p.committed_offset,
            lag: p.consumer_lag,
        })
    })
}

/// Per assigned topic-partition: the committed offset from the statistics, whether fetching
/// it is paused, and its last lag. Shared by librdkafka's callbacks, the code that pauses and
/// the lag refresh; taken after the member's epochs where both are held.
#[derive(Default)]
pub struct Lags(Mutex<HashMap<Arc<str>, HashMap<i32, Tracked>>>);

impl Lags {
    /// Takes a statistics report: keeps the committed offsets of the assigned topic-partitions
    /// and sets the lag of those being fetched (a paused one's is the broker's), calling
    /// `publish(topic, partition, lag)` for each.
    pub fn statistics<'a>(
        &self,
        reports: impl IntoIterator<Item = Reported<'a>>,
        epochs: &Epochs,
        mut publish: impl FnMut(&str, i32, i64),
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
                t.lag = Some(r.lag);
                publish(r.topic, r.partition, r.lag);
            }
        }
    }

    /// Fetching is now paused for exactly `paused` (each with the assignment epoch it was
    /// paused under); one paused under an assignment that is not current any more is ignored.
    pub fn paused(&self, paused: &Paused, epochs: &Epochs) {
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

    /// Forgets a revoked topic-partition (the caller removes whatever it published for it).
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

    /// Sets the lag of `probe` from the end offset the broker gave (calling `publish` under the
    /// lock, so a revoke's removal comes after it), unless it was resumed or revoked meanwhile
    /// (a revoked series must not come back). Whether it was set.
    pub fn answered(&self, probe: &Probe, end: i64, publish: impl FnOnce(&str, i32, i64)) -> bool {
        let mut tracked = lock(&self.0);
        let Some(t) = tracked
            .get_mut(&probe.topic)
            .and_then(|partitions| partitions.get_mut(&probe.partition))
        else {
            return false;
        };
        match (t.paused, t.committed) {
            (Some(epoch), Some(committed)) if epoch == probe.epoch => {
                let lag = (end - committed).max(0);
                t.lag = Some(lag);
                publish(&probe.topic, probe.partition, lag);
                true
            }
            _ => false,
        }
    }

    /// The sum of the assigned topic-partitions' last lags (those with none yet count 0).
    pub fn total(&self) -> i64 {
        lock(&self.0)
            .values()
            .flat_map(HashMap::values)
            .filter_map(|t| t.lag)
            .sum()
    }
}

/// Takes the lag of the `probes` (paused topic-partitions: [`Lags::probes`]) from the broker
/// through `consumer` and sets it in `lags` ([`Lags::answered`], with `publish`); how many were
/// set. Blocking (ListOffsets, one request per leader, [`TIMEOUT`]): run it on a blocking
/// thread. An error names the first topic-partition that got no end offset; the others were
/// set all the same.
pub fn refresh_paused<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    lags: &Lags,
    probes: &[Probe],
    mut publish: impl FnMut(&str, i32, i64),
) -> Result<usize, LagError> {
    if probes.is_empty() {
        return Ok(0);
    }
    let ends = end_offsets(consumer, probes)?;
    let mut refreshed = 0;
    let mut first_failure: Option<LagError> = None;
    for (probe, end) in probes.iter().zip(ends) {
        match (end, &mut first_failure) {
            (Ok(end), _) => {
                refreshed += usize::from(lags.answered(probe, end, &mut publish));
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
}

/// The end offset of each probed topic-partition (blocking: ListOffsets for the latest offset,
/// one request per leader), or why the broker gave none.
fn end_offsets<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
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

/// Lets a failing refresh be logged once a minute at most, however many refresh.
#[derive(Default)]
pub struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    /// Whether to log a failure now (then not again for a minute).
    pub fn due(&self) -> bool {
        let mut last = lock(&self.0);
        if last.is_some_and(|t| t.elapsed() <= WARN_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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

    /// What was published, as a metric would hold it: the last lag per topic-partition.
    #[derive(Default)]
    struct Published(BTreeMap<(String, i32), i64>);

    impl Published {
        fn sink(&mut self) -> impl FnMut(&str, i32, i64) + '_ {
            move |topic, partition, lag| {
                self.0.insert((topic.to_string(), partition), lag);
            }
        }

        fn lag(&self, topic: &str, partition: i32) -> Option<i64> {
            self.0.get(&(topic.to_string(), partition)).copied()
        }
    }

    fn paused(list: &[(&str, i32, u64)]) -> Paused {
        list.iter()
            .map(|(t, p, e)| ((Arc::from(*t), *p), *e))
            .collect()
    }

    #[test]
    fn statistics_set_the_lag_of_fetched_partitions_only() {
        let mut m = Published::default();
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 1), ("t", 1, 2)]);
        lags.statistics([report("t", 0, 10, 5), report("t", 1, 20, 7)], &e, m.sink());
        assert_eq!(m.lag("t", 0), Some(5));
        assert_eq!(m.lag("t", 1), Some(7));
        assert_eq!(lags.total(), 12);

        // Paused: the statistics' frozen figure does not overwrite the broker's.
        lags.paused(&paused(&[("t", 1, 2)]), &e);
        let probes = lags.probes();
        assert_eq!(probes.len(), 1);
        assert!(lags.answered(&probes[0], 120, m.sink()));
        assert_eq!(m.lag("t", 1), Some(100));
        assert_eq!(lags.total(), 105);
        lags.statistics([report("t", 0, 10, 6), report("t", 1, 30, 7)], &e, m.sink());
        assert_eq!(m.lag("t", 0), Some(6));
        assert_eq!(m.lag("t", 1), Some(100));
        assert_eq!(lags.total(), 106);
        // The committed offset still follows the statistics while paused.
        assert!(lags.answered(&probes[0], 130, m.sink()));
        assert_eq!(m.lag("t", 1), Some(100));

        // Resumed: the statistics take over; a late answer is dropped.
        lags.paused(&Paused::new(), &e);
        assert!(!lags.answered(&probes[0], 999, m.sink()));
        assert_eq!(m.lag("t", 1), Some(100));
        lags.statistics([report("t", 1, 40, 3)], &e, m.sink());
        assert_eq!(m.lag("t", 1), Some(3));
        assert_eq!(lags.total(), 9);
    }

    #[test]
    fn unassigned_partitions_and_stale_epochs_get_no_lag() {
        let mut m = Published::default();
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 3)]);
        lags.statistics(
            [
                report("t", 1, 10, 5),
                report("u", 0, 10, 5),
                report("t", -1, 0, 1),
            ],
            &e,
            m.sink(),
        );
        assert!(m.0.is_empty(), "{:?}", m.0);
        assert_eq!(lags.total(), 0);

        // Paused under an older assignment: not tracked as paused.
        lags.statistics([report("t", 0, 10, 5)], &e, m.sink());
        lags.paused(&paused(&[("t", 0, 2)]), &e);
        assert!(lags.probes().is_empty());
    }

    #[test]
    fn a_revoke_wins_over_a_late_answer_and_an_unknown_commit_is_not_probed() {
        let mut m = Published::default();
        let lags = Lags::default();
        let e = epochs(&[("t", 0, 1), ("t", 1, 1)]);
        // Partition 1 has no committed offset yet: nothing to compute.
        lags.statistics(
            [report("t", 0, 10, 5), report("t", 1, -1001, -1)],
            &e,
            m.sink(),
        );
        lags.paused(&paused(&[("t", 0, 1), ("t", 1, 1)]), &e);
        let probes = lags.probes();
        assert_eq!(probes.len(), 1, "{probes:?}");
        lags.revoked("t", 0);
        m.0.clear();
        assert!(!lags.answered(&probes[0], 50, m.sink()));
        assert_eq!(m.lag("t", 0), None);
        assert_eq!(lags.total(), 0, "a revoked partition's lag is forgotten");
    }

    #[test]
    fn failures_are_logged_once_a_minute() {
        let t = Throttle::default();
        assert!(t.due());
        assert!(!t.due());
    }
}
