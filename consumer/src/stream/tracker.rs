//! What one connection sent and what its client acknowledged, per topic-partition, and so
//! which offset may be committed: the rule of the module's essay, without Kafka or sockets (unit
//! tested here).
//!
//! Per topic-partition it keeps the offsets sent and not yet acknowledged (8 bytes each, at
//! most `--max-unacked` in all), the highest acknowledged one, and `next`, one past the last
//! record handled (sent or skipped). The committable offset is the oldest unacknowledged one,
//! or `next` when nothing is in flight: skipped records are covered by the next ack, and by
//! nothing at all when nothing is in flight, so skipped records never hold the group back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A topic-partition.
pub type Key = (Arc<str>, i32);

#[derive(Debug)]
struct Part {
    /// Assignment epoch the records were read under.
    epoch: u64,
    sent: VecDeque<i64>,
    /// Highest offset sent and acknowledged (-1: none).
    acked: i64,
    /// One past the last record handled.
    next: i64,
    /// The offset last handed to Kafka as committable.
    stored: i64,
}

/// The connection's bookkeeping.
#[derive(Debug, Default)]
pub struct Tracker {
    parts: HashMap<Key, Part>,
    /// Partitions taken away (revoked) with the highest offset sent on them: a late ack for
    /// one of those is ignored, not refused. Bounded by the partitions read.
    gone: HashMap<Key, i64>,
    inflight: usize,
}

/// What an ack did.
#[derive(Debug, PartialEq, Eq)]
pub enum Acked {
    /// Freed this many in-flight events.
    Freed(usize),
    /// Nothing new (already acknowledged, or a partition taken away since).
    Nothing,
}

/// Why an ack was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Never sent on this connection.
    #[error("offset {offset} of partition {partition}{topic} was never sent on this connection")]
    UnknownOffset {
        /// As given.
        topic: String,
        /// As given.
        partition: i32,
        /// As given.
        offset: i64,
    },
    /// Several topics have that partition.
    #[error("several topics are read: add \"topic\" to the ack (the event frame's \"topic\")")]
    TopicRequired,
}

impl Tracker {
    /// Events sent and not acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// One past the last record handled on `key`, if any was.
    pub fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        self.parts
            .iter()
            .find(|((t, p), _)| &**t == topic && *p == partition)
            .map(|(_, part)| part.next)
    }

    /// Records that the record at `offset` of `key`, read under `epoch`, was handled: `sent`
    /// to the client, or skipped.
    pub fn handled(&mut self, key: &Key, epoch: u64, offset: i64, sent: bool) {
        if self.parts.get(key).is_some_and(|p| p.epoch != epoch) {
            self.forget(key);
        }
        let part = self.parts.entry(key.clone()).or_insert(Part {
            epoch,
            sent: VecDeque::new(),
            acked: -1,
            next: offset,
            stored: -1,
        });
        part.next = offset + 1;
        if sent {
            part.sent.push_back(offset);
            self.inflight += 1;
        }
    }

    /// Drops a partition's bookkeeping (revoked): its in-flight events go to its next owner.
    fn forget(&mut self, key: &Key) {
        if let Some(part) = self.parts.remove(key) {
            self.inflight -= part.sent.len();
            let last = part.sent.back().copied().unwrap_or(part.acked);
            let e = self.gone.entry(key.clone()).or_insert(last);
            *e = (*e).max(last);
        }
    }

    /// Keeps the partitions `current` says are still assigned under the same epoch; how many
    /// in-flight events were dropped.
    pub fn retain(&mut self, current: impl Fn(&str, i32) -> Option<u64>) -> usize {
        let before = self.inflight;
        let drop: Vec<Key> = self
            .parts
            .iter()
            .filter(|((t, p), part)| current(t, *p) != Some(part.epoch))
            .map(|(k, _)| k.clone())
            .collect();
        for k in drop {
            self.forget(&k);
        }
        before - self.inflight
    }

    /// Applies an ack of everything up to `offset` on `partition` (of `topic`, required when
    /// several topics have that partition).
    pub fn ack(
        &mut self,
        topic: Option<&str>,
        partition: i32,
        offset: i64,
    ) -> Result<Acked, AckError> {
        let unknown = || AckError::UnknownOffset {
            topic: topic.map(|t| format!(" of {t}")).unwrap_or_default(),
            partition,
            offset,
        };
        let mut candidates = self
            .parts
            .keys()
            .chain(self.gone.keys())
            .filter(|(t, p)| *p == partition && topic.is_none_or(|want| &**t == want));
        let Some(key) = candidates.next().cloned() else {
            return Err(unknown());
        };
        if candidates.any(|k| k.0 != key.0) {
            return Err(AckError::TopicRequired);
        }
        let Some(part) = self.parts.get_mut(&key) else {
            // Taken away: the new owner has these events; a late ack changes nothing.
            return match self.gone.get(&key) {
                Some(&last) if offset <= last => Ok(Acked::Nothing),
                _ => Err(unknown()),
            };
        };
        if offset <= part.acked {
            return Ok(Acked::Nothing);
        }
        if part.sent.binary_search(&offset).is_err() {
            return match self.gone.get(&key) {
                Some(&last) if offset <= last => Ok(Acked::Nothing),
                _ => Err(unknown()),
            };
        }
        let mut freed = 0;
        while part.sent.front().is_some_and(|&o| o <= offset) {
            part.sent.pop_front();
            freed += 1;
        }
        part.acked = offset;
        self.inflight -= freed;
        Ok(Acked::Freed(freed))
    }

    /// The offsets that became committable since the last call: per partition, the oldest
    /// unacknowledged offset, or one past the last record handled when nothing is in flight.
    pub fn committable(&mut self) -> Vec<(Key, i64)> {
        let mut out = Vec::new();
        for (k, part) in &mut self.parts {
            let c = part.sent.front().copied().unwrap_or(part.next);
            if c > part.stored {
                part.stored = c;
                out.push((k.clone(), c));
            }
        }
        out
    }

    /// Every partition's committable offset (for the final commit), stored or not.
    pub fn all_committable(&self) -> Vec<(Key, i64)> {
        self.parts
            .iter()
            .map(|(k, part)| (k.clone(), part.sent.front().copied().unwrap_or(part.next)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, p: i32) -> Key {
        (Arc::from(t), p)
    }

    #[test]
    fn commits_stop_at_the_oldest_unacked_and_cover_skipped_records() {
        let mut t = Tracker::default();
        let a = key("t", 0);
        t.handled(&a, 1, 10, true);
        t.handled(&a, 1, 11, false); // skipped
        t.handled(&a, 1, 12, true);
        assert_eq!(t.inflight(), 2);
        assert_eq!(t.committable(), vec![(a.clone(), 10)]);
        assert_eq!(t.ack(None, 0, 10), Ok(Acked::Freed(1)));
        assert_eq!(
            t.committable(),
            vec![(a.clone(), 12)],
            "past the skipped 11"
        );
        assert_eq!(t.ack(None, 0, 12), Ok(Acked::Freed(1)));
        assert_eq!(t.committable(), vec![(a.clone(), 13)]);
        // Only skipped records for a while: still committable.
        t.handled(&a, 1, 13, false);
        t.handled(&a, 1, 14, false);
        assert_eq!(t.committable(), vec![(a.clone(), 15)]);
        assert_eq!(t.committable(), vec![], "nothing new");
        // A repeated ack is harmless; an offset never sent is refused, a skipped one too.
        assert_eq!(t.ack(None, 0, 12), Ok(Acked::Nothing));
        assert!(matches!(
            t.ack(None, 0, 99),
            Err(AckError::UnknownOffset { .. })
        ));
        assert!(matches!(
            t.ack(None, 0, 14),
            Err(AckError::UnknownOffset { .. })
        ));
        assert!(matches!(
            t.ack(None, 5, 1),
            Err(AckError::UnknownOffset { .. })
        ));
    }

    #[test]
    fn an_ack_covers_everything_before_it_and_a_revoke_drops_in_flight() {
        let mut t = Tracker::default();
        let (a, b) = (key("t", 0), key("t", 1));
        for o in 0..5 {
            t.handled(&a, 1, o, true);
            t.handled(&b, 2, o, true);
        }
        assert_eq!(t.ack(None, 0, 3), Ok(Acked::Freed(4)));
        assert_eq!(t.inflight(), 6);
        // Partition 1 is revoked: its five events go to the next owner, uncommitted.
        assert_eq!(t.retain(|_, p| (p == 0).then_some(1)), 5);
        assert_eq!(t.inflight(), 1);
        let c = t.committable();
        assert_eq!(c, vec![(a.clone(), 4)]);
        // A late ack of the revoked partition changes nothing, and is no error.
        assert_eq!(t.ack(None, 1, 4), Ok(Acked::Nothing));
        // Assigned again under a new epoch: read again from the committed offset.
        t.handled(&b, 3, 0, true);
        assert_eq!(t.inflight(), 2);
        assert_eq!(t.ack(None, 1, 0), Ok(Acked::Freed(1)));
    }

    #[test]
    fn several_topics_need_the_topic() {
        let mut t = Tracker::default();
        t.handled(&key("x", 0), 1, 5, true);
        t.handled(&key("y", 0), 2, 5, true);
        assert_eq!(t.ack(None, 0, 5), Err(AckError::TopicRequired));
        assert_eq!(t.ack(Some("y"), 0, 5), Ok(Acked::Freed(1)));
        assert!(matches!(
            t.ack(Some("z"), 0, 5),
            Err(AckError::UnknownOffset { .. })
        ));
    }
}
