//! Exactly once into Kafka (`--delivery exactly-once`).
//!
//! Under at-least-once, a crash re-sends everything after the slot's confirmed position, and a
//! consumer may see part of a Postgres transaction (the events Kafka acknowledged before the
//! crash) followed later by all of it. Under exactly-once the producer writes through Kafka
//! transactions, and the rule kept here is:
//!
//! > Every Kafka transaction holds whole Postgres transactions (one or more, in commit order)
//! > and, as its last record, a progress record in `<topic>.progress` naming the end LSN of
//! > the last of them. The slot's confirmed LSN moves only to a position whose Kafka
//! > transaction has committed.
//!
//! ```text
//!   Postgres:   T1 ─ T2 ─ T3 ─ T4 ─ T5 ─ ...            (commit order from the slot)
//!   Kafka txn:  [ T1 T2 T3 | progress=end(T3) ] commit  [ T4 T5 | progress=end(T5) ] ...
//!   confirmed:                               end(T3) ─────────────────────────▶ end(T5)
//!   crash here ─────────────────────────────────────────▲  (T4 half written, open)
//!   restart:  init_transactions fences the old instance and aborts its open transaction,
//!             progress read back = end(T3); the slot re-sends from ≤ end(T3):
//!             transactions ending at or below it are decoded but not written (muted).
//! ```
//!
//! So a `read_committed` consumer sees each Postgres transaction once, and whole: the aborted
//! half of T4 is never visible, and T1–T3 are not written twice although the slot (which was
//! confirmed later than Kafka committed, or not at all) sends them again.
//!
//! # Why a progress topic
//!
//! The slot's confirmed position cannot be moved in the same atomic step as a Kafka commit, so
//! after a crash between the two Kafka knows more than Postgres. The progress record is written
//! inside the Kafka transaction it describes: it is committed exactly when the events are, and
//! read back (with `read_committed`, after `init_transactions` has settled the previous
//! instance's transaction) it is exactly what Kafka holds. `<topic>.progress` is compacted and
//! keyed by the transactional id, so it stays one record per producer. A record names the
//! slot's incarnation (consistent point and creation time): a slot dropped and created again
//! (a new snapshot, or another database with the same names) starts from nothing instead of
//! skipping its first transactions by a stale position.
//!
//! # Fencing
//!
//! The transactional id is stable per slot (`walrelay.<topic>.<database>.<slot>` unless
//! `--transactional-id` says otherwise). A producer starts its transactions only after it holds
//! the slot, so two producers never stream the same slot at once; a frozen producer whose
//! replication connection was dropped can still wake up with an open Kafka transaction, and
//! the new instance's `init_transactions` fences it: its next send or commit fails with a
//! fatal error, and it stops (`WriteError::Fenced`, definite) instead of interleaving.
//!
//! # Batching and its cost
//!
//! A Kafka commit is a flush of the transaction's events plus a round trip to the
//! transaction coordinator, and nothing can be sent while it runs. The listener commits as
//! soon as the stream pauses between Postgres transactions (the replication channel has
//! nothing ready), and on a busy stream at the first Postgres commit once the Kafka
//! transaction is `--transaction-interval` old (10 ms by default): commits batch themselves
//! under load and wait for nothing when it is light. A Postgres transaction is never split: a very large
//! one keeps its Kafka transaction open until its Commit (its events still flow to the broker
//! and free the byte budget as they are acknowledged; `transaction.timeout.ms` is 15 minutes
//! by default, the broker's usual ceiling). The snapshot is written in Kafka transactions of
//! one interval each; a snapshot attempt that fails half-way leaves a committed part, which
//! the snapshot framing (`snapshot_start`/`snapshot_end` and the attempt id) lets consumers
//! retire.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use serde::{Deserialize, Serialize};
use walrelay_common::kafka::QuietContext;

use super::WriteError;

/// What exactly-once needs to know.
#[derive(Debug, Clone)]
pub struct TransactionOptions {
    /// Kafka transactional id (also the progress record's key).
    pub id: String,
    /// The compacted topic of progress records.
    pub progress_topic: String,
    /// How long a Kafka transaction gathers Postgres transactions before it commits.
    pub interval: Duration,
}

/// The progress record: what the last committed Kafka transaction of a producer contains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The slot it streams.
    pub slot: String,
    /// The slot's incarnation: its consistent point and creation time.
    pub incarnation: String,
    /// End LSN of the last Postgres transaction in the committed Kafka transaction.
    pub commit_lsn: u64,
}

/// The state of the open Kafka transaction, shared by the listener and the snapshot workers.
#[derive(Debug, Default)]
pub(super) struct Open {
    /// When the current Kafka transaction began (its first event).
    pub opened_at: Option<Instant>,
    /// End LSN of the last whole Postgres transaction in it (0: none yet).
    pub last_lsn: u64,
}

/// Exactly-once state of a writer.
pub(super) struct Transactions {
    pub options: TransactionOptions,
    /// Sends hold it shared; a commit holds it alone (librdkafka refuses a send during one).
    pub gate: tokio::sync::RwLock<()>,
    pub open: Mutex<Open>,
    /// Whether a Kafka transaction is open (mirrors `open.opened_at`, read without the lock).
    pub is_open: AtomicBool,
    /// End LSN covered by the last committed Kafka transaction.
    pub committed_lsn: AtomicU64,
    /// Set by the listener for Postgres transactions Kafka already holds: nothing is written.
    pub muted: AtomicBool,
    /// Slot and incarnation written in progress records.
    pub identity: Mutex<(String, String)>,
    /// A client config for reading progress back (the writer's, with consumer settings).
    pub reader_config: ClientConfig,
}

impl Transactions {
    pub fn new(options: TransactionOptions, reader_config: ClientConfig) -> Self {
        Self {
            options,
            gate: tokio::sync::RwLock::new(()),
            open: Mutex::new(Open::default()),
            is_open: AtomicBool::new(false),
            committed_lsn: AtomicU64::new(0),
            muted: AtomicBool::new(false),
            identity: Mutex::new((String::new(), String::new())),
            reader_config,
        }
    }

    /// The position that may be confirmed to Postgres, given the checkpointer's (every event
    /// of every transaction up to it acknowledged): capped by the last committed Kafka
    /// transaction while one is open. The checkpointer is read first: a transaction opened
    /// after that read cannot have raised it.
    pub fn confirmable(&self, acked: u64) -> u64 {
        if self.is_open.load(Ordering::Acquire) {
            acked.min(self.committed_lsn.load(Ordering::Acquire))
        } else {
            acked
        }
    }
}

/// Classifies a librdkafka transaction error: fenced (definite), one that needs an abort
/// (transient: the session restarts from the slot), retriable, or fatal.
pub(super) enum TxnFailure {
    Fenced(String),
    Abort(String),
    Retry(String),
    Fatal(String),
}

pub(super) fn classify(e: &KafkaError) -> TxnFailure {
    match e {
        KafkaError::Transaction(r) => {
            let text = r.to_string();
            let fenced = matches!(
                r.code(),
                rdkafka::types::RDKafkaErrorCode::Fenced
                    | rdkafka::types::RDKafkaErrorCode::ProducerFenced
                    | rdkafka::types::RDKafkaErrorCode::InvalidProducerEpoch
            );
            if fenced {
                TxnFailure::Fenced(text)
            } else if r.is_fatal() {
                TxnFailure::Fatal(text)
            } else if r.txn_requires_abort() {
                TxnFailure::Abort(text)
            } else {
                TxnFailure::Retry(text)
            }
        }
        other => TxnFailure::Retry(other.to_string()),
    }
}

/// How long the end of the progress topic must stay put, short of its high watermark, before
/// it is taken as the end.
const SETTLE: Duration = Duration::from_millis(300);

/// Reads the last committed progress record keyed `id` from `topic` (partition 0), or `None`
/// when there is none. Blocking: run it off the runtime thread.
pub(super) fn read_progress(
    config: &ClientConfig,
    topic: &str,
    id: &str,
    timeout: Duration,
) -> Result<Option<Progress>, WriteError> {
    let fail = |m: String| WriteError::Delivery {
        message: format!("reading progress from {topic}: {m}"),
        transient: true,
    };
    let consumer: BaseConsumer<QuietContext> = config
        .create_with_context(QuietContext)
        .map_err(|e| fail(e.to_string()))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, timeout)
        .map_err(|e| fail(e.to_string()))?;
    if high <= low {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| fail(e.to_string()))?;
    consumer.assign(&tpl).map_err(|e| fail(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut last = None;
    let mut eof_since: Option<(Instant, Option<Offset>)> = None;
    loop {
        if Instant::now() >= deadline {
            return Err(fail(format!(
                "did not reach its end (offset {high}) within {} s",
                timeout.as_secs()
            )));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if m.key() == Some(id.as_bytes())
                    && let Some(payload) = m.payload()
                {
                    let p: Progress = serde_json::from_slice(payload).map_err(|e| {
                        fail(format!(
                            "a progress record at offset {} is not valid: {e}",
                            m.offset()
                        ))
                    })?;
                    last = Some(p);
                }
                if m.offset() + 1 >= high {
                    return Ok(last);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {
                // With read_committed the end is the last stable offset: our own earlier
                // transactions are settled (init_transactions ran first), so a position short
                // of the high watermark is either a commit marker librdkafka skipped or another
                // producer's open transaction. Wait briefly for the latter to settle.
                let position = consumer
                    .position()
                    .ok()
                    .and_then(|p| p.find_partition(topic, 0).map(|e| e.offset()));
                if matches!(position, Some(Offset::Offset(o)) if o >= high) {
                    return Ok(last);
                }
                let now = Instant::now();
                match eof_since {
                    Some((at, seen)) if seen == position && now.duration_since(at) >= SETTLE => {
                        return Ok(last);
                    }
                    Some((_, seen)) if seen == position => {}
                    _ => eof_since = Some((now, position)),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(Err(e)) => return Err(fail(e.to_string())),
            None => {}
        }
    }
}
