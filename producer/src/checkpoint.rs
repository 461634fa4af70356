//! The checkpointer: which LSN may be confirmed to Postgres.
//!
//! Postgres never re-sends a transaction whose commit is at or below the slot's
//! `confirmed_flush_lsn`, so confirming too early is the one way this design can lose data.
//! The rule kept here:
//!
//! > The confirmed LSN is the end LSN of the newest transaction T such that every event of T
//! > and of every transaction before T (in stream order) has been acknowledged by Kafka.
//!
//! Kafka acknowledges out of order across partitions, so this is a low watermark over the
//! contiguous prefix of complete transactions, not "the last ack seen":
//!
//! ```text
//!   stream order ─▶   T1 (3 ev)     T2 (0 ev)     T3 (2 ev)      T4 (open)
//!   acked              3/3           -             1/2            ...
//!   committed          yes           yes           yes            no
//!                      └──── complete prefix ────┘
//!   confirmed = end_lsn(T2)     (T3 waits for its last ack; T4 for its commit)
//! ```
//!
//! The listener (one task) calls [`Checkpointer::begin`] at a transaction's Begin and
//! [`Checkpointer::commit`] at its Commit with the number of events it handed to Kafka; the
//! Kafka delivery callback (another thread) calls [`Checkpointer::acked`] once per
//! acknowledged event. Acks may arrive before the commit is registered. A failed delivery is
//! never acked, so the watermark stops below it until the pipeline is restarted from the slot.
//!
//! When nothing is open or in flight, a keepalive's server position may be confirmed
//! ([`Checkpointer::idle`]): every transaction committed below it has already been received
//! and was either empty for us or complete, and a transaction still running at that position
//! commits later, above it, so it will be decoded again after a restart. This keeps an idle or
//! filtered database from pinning WAL.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Identifies a transaction inside one streaming session.
pub type TxnId = u64;

#[derive(Debug)]
struct Txn {
    acked: u64,
    /// Events sent, known once committed.
    sent: Option<u64>,
    end_lsn: u64,
    /// Commit time, µs since the Unix epoch (0 when unknown).
    commit_us: i64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Id of `txns[0]`.
    base: TxnId,
    txns: VecDeque<Txn>,
    confirmed: u64,
}

impl Inner {
    fn advance(&mut self, latency: Option<&prometheus::Histogram>) {
        while let Some(front) = self.txns.front() {
            if front.sent != Some(front.acked) {
                break;
            }
            if let (Some(h), true) = (latency, front.commit_us > 0 && front.sent != Some(0)) {
                h.observe((walrelay_common::clock::now_us() - front.commit_us).max(0) as f64 / 1e6);
            }
            self.confirmed = self.confirmed.max(front.end_lsn);
            self.txns.pop_front();
            self.base += 1;
        }
    }

    fn get(&mut self, id: TxnId) -> Option<&mut Txn> {
        let idx = id.checked_sub(self.base)?;
        self.txns.get_mut(usize::try_from(idx).ok()?)
    }
}

/// Tracks transactions from Begin to their last Kafka acknowledgement.
#[derive(Debug, Default)]
pub struct Checkpointer {
    inner: Mutex<Inner>,
    /// Commit → last acknowledgement of each transaction that had events.
    latency: Option<prometheus::Histogram>,
}

impl Checkpointer {
    /// A tracker whose confirmed position starts at `confirmed`.
    pub fn new(confirmed: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                confirmed,
                ..Inner::default()
            }),
            latency: None,
        }
    }

    /// Observes each transaction's commit-to-acknowledgement time in `histogram`.
    pub fn with_latency(mut self, histogram: prometheus::Histogram) -> Self {
        self.latency = Some(histogram);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent (each method is a
        // few integer updates), so a poisoned lock is still usable.
        walrelay_common::sync::lock(&self.inner)
    }

    /// A transaction began; returns its id.
    pub fn begin(&self) -> TxnId {
        let mut inner = self.lock();
        let id = inner.base + inner.txns.len() as u64;
        inner.txns.push_back(Txn {
            acked: 0,
            sent: None,
            end_lsn: 0,
            commit_us: 0,
        });
        id
    }

    /// The transaction committed at `end_lsn` after `sent` events were handed to Kafka.
    pub fn commit(&self, id: TxnId, end_lsn: u64, sent: u64) {
        self.commit_at(id, end_lsn, sent, 0);
    }

    /// Like [`commit`](Self::commit), with the commit time (µs since the Unix epoch) for the
    /// latency histogram.
    pub fn commit_at(&self, id: TxnId, end_lsn: u64, sent: u64, commit_us: i64) {
        let mut inner = self.lock();
        if let Some(t) = inner.get(id) {
            t.sent = Some(sent);
            t.end_lsn = end_lsn;
            t.commit_us = commit_us;
        }
        inner.advance(self.latency.as_ref());
    }

    /// Kafka acknowledged one event of transaction `id`.
    pub fn acked(&self, id: TxnId) {
        let mut inner = self.lock();
        if let Some(t) = inner.get(id) {
            t.acked += 1;
        }
        inner.advance(self.latency.as_ref());
    }

    /// A keepalive reported the server at `server_lsn`: confirm it if nothing is open or in
    /// flight. Returns whether it was taken.
    pub fn idle(&self, server_lsn: u64) -> bool {
        let mut inner = self.lock();
        if inner.txns.is_empty() {
            inner.confirmed = inner.confirmed.max(server_lsn);
            true
        } else {
            false
        }
    }

    /// The LSN that may be confirmed to Postgres.
    pub fn confirmed(&self) -> u64 {
        self.lock().confirmed
    }

    /// Whether every transaction begun so far is committed and fully acknowledged.
    pub fn drained(&self) -> bool {
        self.lock().txns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_transactions_confirm_at_once() {
        let c = Checkpointer::new(5);
        let t = c.begin();
        c.commit(t, 10, 0);
        assert_eq!(c.confirmed(), 10);
        assert!(c.drained());
    }

    #[test]
    fn a_later_complete_transaction_waits_for_an_earlier_one() {
        let c = Checkpointer::new(0);
        let a = c.begin();
        c.commit(a, 100, 2);
        let b = c.begin();
        c.commit(b, 200, 1);
        c.acked(b);
        c.acked(a);
        assert_eq!(c.confirmed(), 0, "a still has an unacked event");
        c.acked(a);
        assert_eq!(c.confirmed(), 200);
    }

    #[test]
    fn idle_only_when_nothing_open() {
        let c = Checkpointer::new(0);
        let a = c.begin();
        assert!(!c.idle(500), "a transaction is open");
        c.commit(a, 100, 1);
        assert!(!c.idle(500), "an event is in flight");
        c.acked(a);
        assert!(c.idle(500));
        assert_eq!(c.confirmed(), 500);
        assert!(c.idle(400));
        assert_eq!(c.confirmed(), 500, "never moves back");
    }

    #[derive(Debug, Clone)]
    enum Step {
        Begin(usize),
        Send(usize),
        Commit(usize),
        Ack(usize),
    }

    /// Program order of the listener plus acks placed at random points after their send.
    fn schedule(sizes: &[usize], ack_slots: &[usize]) -> Vec<Step> {
        let mut main = Vec::new();
        for (t, n) in sizes.iter().enumerate() {
            main.push(Step::Begin(t));
            for _ in 0..*n {
                main.push(Step::Send(t));
            }
            main.push(Step::Commit(t));
        }
        // Each send gets an ack inserted somewhere after it.
        let mut placed: Vec<(usize, usize, Step)> = main
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, s)| (i * 2, 0, s))
            .collect();
        let total = main.len() * 2;
        let mut k = 0;
        for (i, s) in main.iter().enumerate() {
            if let Step::Send(t) = s {
                let slot = ack_slots.get(k).copied().unwrap_or(0);
                k += 1;
                let lo = i * 2 + 1;
                let at = lo + slot % (total - lo + 1);
                placed.push((at, 1 + k, Step::Ack(*t)));
            }
        }
        placed.sort_by_key(|(at, tie, _)| (*at, *tie));
        placed.into_iter().map(|(_, _, s)| s).collect()
    }

    proptest! {
        #[test]
        fn out_of_order_acks_never_pass_an_unacked_event(
            sizes in proptest::collection::vec(0usize..5, 1..10),
            ack_slots in proptest::collection::vec(any::<usize>(), 0..50),
        ) {
            let c = Checkpointer::new(0);
            let end = |t: usize| (t as u64 + 1) * 100;
            let mut ids = vec![0; sizes.len()];
            let mut sent = vec![0u64; sizes.len()];
            let mut acked = vec![0u64; sizes.len()];
            let mut committed = vec![false; sizes.len()];
            for step in schedule(&sizes, &ack_slots) {
                match step {
                    Step::Begin(t) => ids[t] = c.begin(),
                    Step::Send(t) => sent[t] += 1,
                    Step::Commit(t) => { committed[t] = true; c.commit(ids[t], end(t), sent[t]) }
                    Step::Ack(t) => { acked[t] += 1; c.acked(ids[t]) }
                }
                // The first transaction that is not complete bounds what may be confirmed.
                let first_incomplete = (0..sizes.len())
                    .find(|&t| !(committed[t] && acked[t] == sizes[t] as u64));
                let bound = match first_incomplete { Some(t) => end(t) - 1, None => u64::MAX };
                prop_assert!(c.confirmed() <= bound,
                    "confirmed {} passes incomplete txn {:?}", c.confirmed(), first_incomplete);
                // And it is not lazier than the model.
                let expect = match first_incomplete { Some(0) => 0, Some(t) => end(t - 1), None => end(sizes.len() - 1) };
                prop_assert_eq!(c.confirmed(), expect);
            }
            prop_assert!(c.drained());
        }
    }
}
