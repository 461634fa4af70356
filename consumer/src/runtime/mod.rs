//! The consumer runtime every sink shares: a Kafka consumer group, batches, the dead-letter
//! topic and offset progress.
//!
//! # Topics
//!
//! The group reads one topic (`--topic`) or every topic a pattern selects (`--topic-pattern`,
//! e.g. the producer's per-table topics; [`crate::topics`]), so a batch may hold records of
//! several topics, interleaved. Everything below is per **topic-partition**, the unit Kafka
//! orders, assigns and commits: each [`Event`] carries its topic, and assignment epochs, stored
//! offsets, revokes, dead letters (`walrelay.dlq.topic` names the record's own topic) and the
//! lag metric are keyed by (topic, partition). Events of different topics have no order
//! relative to each other, as events of different partitions of one topic never had.
//!
//! # Offset progress
//!
//! ```text
//!  Kafka ─fetch─▶ librdkafka queue ─recv─▶ Batch ─write─▶ Sink ─verdicts─▶ dead letters (acked)
//!   ▲   (≤ --max-queued-bytes)        (≤ events, bytes, wait)                   │
//!   └─ auto-commit (1 s, on revoke, on close) ◀─ store offset+1 per topic-partition ◀┘
//! ```
//!
//! An offset is stored, and so becomes eligible for commit, only after the sink returned a
//! verdict for every event of the batch and every rejected or undecodable event of it was
//! acknowledged by the dead-letter topic. A batch holds a prefix-closed run of each
//! topic-partition (events are fetched in order), so storing `last offset + 1` of a
//! topic-partition never covers an unfinished event. librdkafka commits stored offsets every
//! second, before a partition is revoked, and on close; nothing else commits.
//!
//! A revoke can happen while a batch fills (rebalances run inside `recv`; with a pattern, also
//! when a topic comes or goes and the subscription changes). Events fetched under an
//! assignment of their topic-partition that was revoked since are dropped before the sink sees
//! them: its next owner (maybe us again) reads them from the committed offset; the other
//! topic-partitions of the batch are unaffected. A revoke during the sink write is harmless:
//! the write finishes, storing the offset fails quietly, and the new owner re-applies events
//! the sink tolerates as duplicates.
//!
//! A sink may answer for an event it still owes (the webhook sink's events held for a parked
//! subscription): it reports them as its [`Backlog`], and no offset past the oldest of them is
//! stored; the writer looks again every second and stores what the backlog no longer holds
//! back.
//!
//! Reading and writing overlap: one task fetches and cuts batches, a blocking thread decodes
//! the next batch while the writer applies one, in fetch order.
//!
//! # Polling never stops
//!
//! The consumer is polled all the time, however long the sink takes, so it never leaves the
//! group for not polling (`max.poll.interval.ms`). When a cut batch has waited a second for the
//! writer, fetching of every assigned topic-partition is **paused** (librdkafka drops what it
//! prefetched for them and fetches it again on resume) while polling goes on (rebalances and
//! heartbeats are served); fetching resumes as soon as the batch is taken. The topic-partitions
//! of a full sink backlog ([`Backlog::full`]) are paused likewise until it is not.
//!
//! librdkafka learns a partition's end only from fetching it, so its statistics would hold a
//! paused topic-partition's lag at its value when the pause began, flat while the stalled sink
//! falls behind. The reader tells the group what it pauses and resumes, and a paused
//! topic-partition's `walrelay_consumer_lag_messages` is taken from the broker instead (its end
//! offset, asked every 5 s off the poll loop, minus the group's committed offset) until fetching
//! resumes and the statistics take over again ([`crate::lag`]).
//!
//! # Memory
//!
//! Bounded by configuration, whatever the backlog:
//!
//! - librdkafka's queue: at most `--max-queued-bytes` of messages, overshot by one fetch
//!   response once decompressed (`fetch.max.bytes` counts compressed bytes, so it is kept at an
//!   eighth of the queue, 1 MiB at least), plus librdkafka's bookkeeping per message;
//! - four batches of at most `--batch-max-events` records and `--batch-max-bytes` of keys and
//!   values: the one filling, the one decoding or waiting, the one being written, and an
//!   emptied one kept for reuse. The reader cuts a batch only when the writer has taken the
//!   previous one, so at most two are decoded at a time; a decoded event takes about 1 KiB
//!   (the envelope's fields) plus a copy of its `after` image;
//! - the sink's bulk request for the batch being written (about the batch's bytes again);
//! - what the sink holds in its [`Backlog`] (bounded by the sink; the webhook sink's
//!   `--max-held-bytes`), and the few records that arrive between a pause and its effect,
//!   which join the waiting batch.
//!
//! A batch's records, bytes and events sit in three vectors that are emptied and reused
//! (`Spares`) rather than allocated per batch. With the defaults (8 MiB queue, 2000 events)
//! the benchmark's consumer peaks at about 60 MiB resident (README, "Consumer benchmark").
//!
//! On shutdown (SIGTERM) the batches already read are written, dead letters are flushed and
//! offsets are committed synchronously before the consumer leaves the group; a sink still
//! retrying 30 s after the signal is interrupted and its batch is not committed.

mod dead_letter;
mod group;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use walrelay_common::codec;
use walrelay_common::event::{Envelope, Op};
use walrelay_common::telemetry::Readiness;

use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::topics::Topics;

pub use dead_letter::DeadLetterError;
use dead_letter::{DeadLetter, DeadLetters};
use group::Group;
pub use group::{GroupError, consumer_config};

/// One decoded change event and where it came from.
#[derive(Debug, Clone)]
pub struct Event {
    /// The topic it was read from (shared by the events of that topic: cheap to clone).
    pub topic: Arc<str>,
    /// Partition of the topic.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// The decoded envelope, except `after`, which is left `None`: see [`Event::after_json`].
    pub envelope: Envelope,
    /// The `after` image as it arrived (JSON text), so a sink that only forwards it need not
    /// build a map of it.
    pub after_json: Option<Box<RawValue>>,
    /// The record's value as JSON, for sinks that forward it whole ([`Sink::wants_raw`]): a
    /// JSON record as it arrived, an Avro record as the envelope it decodes to; `None`
    /// otherwise.
    pub raw: Option<Vec<u8>>,
}

/// What a sink did with one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied, or found already applied.
    Applied,
    /// The sink holds a newer version; nothing was written (a stale or repeated event).
    Stale,
    /// Definitively refused (bad document, mapping conflict, no key): dead-lettered with the
    /// reason.
    Rejected(String),
    /// Done, except for these copies to dead-letter (one per failed destination, each with
    /// its own reason and headers).
    DeadLetters(Vec<Letter>),
}

/// One dead-letter copy of an event, for [`Verdict::DeadLetters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// The `walrelay.dlq.reason` header and metric label.
    pub reason: &'static str,
    /// The `walrelay.dlq.error` header.
    pub message: String,
    /// More headers (`walrelay.dlq.subscription`, ...).
    pub headers: Vec<(&'static str, String)>,
}

/// What a sink still owes after `write` answered for it: events it keeps for a destination that
/// is down (the webhook sink's parked subscriptions in strict mode), by topic-partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// The oldest offset still owed, per (topic, partition): no offset past it is stored.
    pub oldest: BTreeMap<(Arc<str>, i32), i64>,
    /// The backlog reached the sink's bound: fetching the topic-partitions of `oldest` is
    /// paused (the consumer keeps polling) until it is below it again.
    pub full: bool,
}

/// Why a sink could not finish a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Shutdown interrupted retries; the batch is not committed and will be read again.
    #[error("interrupted while retrying")]
    Interrupted,
    /// A failure that retrying will not fix (credentials, permissions, configuration): the
    /// process stops so that nothing is skipped.
    #[error("{0}")]
    Definite(String),
}

/// A destination for change events.
///
/// # Contract
///
/// - **Call order.** `write` is called with batches in fetch order; within a batch, the events
///   of one topic-partition ([`Event::topic`], [`Event::partition`]) are in offset order.
///   Events of different partitions, or of different topics under `--topic-pattern`, may
///   interleave and have no order relative to each other.
/// - **Concurrency.** One call at a time per process (`&mut self`). Several processes of one
///   group write concurrently, each for its own topic-partitions; a row's changes are always
///   in one partition of one topic (its table's, with per-table topics), so concurrent writers
///   never race on one row's order.
/// - **Duplicates.** At-least-once: after a crash, a rebalance or a re-index, any event may be
///   delivered again, before or after newer events of the same row. A sink must make a
///   repeated or older event a no-op (the search sink uses external versions) and answer
///   [`Verdict::Stale`] or [`Verdict::Applied`] for it.
/// - **Table-wide events.** Schema events (`Op::Ddl`) and snapshot markers
///   (`Op::SnapshotStart`, `Op::SnapshotEnd`) carry no row and are written to every partition
///   (of the table's topic, with per-table topics), so each arrives once per partition. A
///   sink that keeps rows may use a table's end marker to drop what the latest complete
///   snapshot no longer has (the search sink does); any other sink answers
///   [`Verdict::Applied`] for markers.
/// - **Images.** `after` arrives as JSON text in [`Event::after_json`] (`envelope.after` is
///   `None`), so a sink that forwards it needs no map of it. The sink may take images out of
///   the events; the runtime reads only `op`, `source` and `ts_ms` afterwards.
/// - **Result.** One verdict per event, in order. A transient failure (throttling, 5xx, a
///   connection error) is the sink's to retry, with backoff, until it succeeds or `shutdown`
///   fires ([`SinkError::Interrupted`]). [`Verdict::Rejected`] only for events that would fail
///   again in the same way; they go to the dead-letter topic and the stream moves on.
/// - **Backlog.** A sink may answer for an event it still has to deliver later (it keeps it
///   in memory); it then reports it in [`Sink::backlog`], and the runtime stores no offset
///   past it until it is gone from there.
pub trait Sink: Send {
    /// Short name for metrics and logs.
    fn name(&self) -> &'static str;

    /// Whether events should carry the record's value as it arrived ([`Event::raw`]): a JSON
    /// record's bytes, or for an Avro record the JSON envelope it decodes to (so a sink that
    /// forwards events sends JSON whatever the topic's format).
    fn wants_raw(&self) -> bool {
        false
    }

    /// Applies `events`; see the trait's contract.
    fn write(
        &mut self,
        events: &mut [Event],
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<Vec<Verdict>, SinkError>> + Send;

    /// What the sink still owes for events it answered (see [`Backlog`]); asked after every
    /// `write` and every second. Nothing by default.
    fn backlog(&self) -> Backlog {
        Backlog::default()
    }

    /// Called after the last `write`'s dead letters were acknowledged and its offsets stored:
    /// the place for side effects that must not happen before then.
    fn settled(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called about every second between batches (before [`Sink::backlog`] is asked): the
    /// place to finish work a quiet stream would otherwise leave pending (the Postgres target
    /// commits a transaction it held open for the rest of a source transaction). An error
    /// stops the runtime as a failed `write` does. Nothing by default.
    fn tick(
        &mut self,
        _shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }
}

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Kafka client set-up or subscription failed.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// The dead-letter topic could not take an event.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    /// The sink failed definitively.
    #[error("sink {sink}: {error}")]
    Sink {
        /// Which sink.
        sink: &'static str,
        /// What it said.
        error: SinkError,
    },
    /// The schema registry options cannot make a client.
    #[error("schema registry: {0}")]
    Registry(String),
}

/// How long the final batch may take after a shutdown request before it is abandoned.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// How often a sink's backlog is looked at between batches.
const BACKLOG_TICK: Duration = Duration::from_secs(1);

/// How long a cut batch may wait for the writer before fetching pauses (while polling goes on).
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// A fetched record in a batch, with what the runtime needs beyond the sink's view.
struct Pending {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    /// Where the record's key is in the batch's `bytes`.
    key: Option<Range<usize>>,
    /// Where the record's value is in the batch's `bytes` (empty for a tombstone).
    value: Range<usize>,
    decode_error: Option<String>,
}

/// A batch: the fetched records, their keys and values copied into one buffer, and once
/// decoded the events of the records that decoded, in the same order (a record with a
/// `decode_error` has no event).
///
/// The three vectors are the big allocations of a batch; a written batch is emptied and handed
/// back to the reader ([`Spares`]), so they are allocated once and reused instead of at the
/// batch rate, and a record costs no allocation of its own.
#[derive(Default)]
struct Batch {
    records: Vec<Pending>,
    bytes: Vec<u8>,
    events: Vec<Event>,
}

impl Batch {
    fn is_full(&self, settings: &RuntimeSettings) -> bool {
        self.records.len() >= settings.batch_max_events
            || self.bytes.len() >= settings.batch_max_bytes
    }
}

/// Emptied batches waiting to be filled again (at most [`Spares::KEEP`]).
#[derive(Default)]
struct Spares(std::sync::Mutex<Vec<Batch>>);

impl Spares {
    /// The writer hands back one batch per batch the reader starts: one spare is enough.
    const KEEP: usize = 1;

    fn take(&self) -> Batch {
        walrelay_common::sync::lock(&self.0)
            .pop()
            .unwrap_or_default()
    }

    /// Empties `batch` (its events are dropped here) and keeps its buffers unless they grew
    /// far beyond the limits (a single huge record, say).
    fn give(&self, mut batch: Batch, settings: &RuntimeSettings) {
        batch.records.clear();
        batch.bytes.clear();
        batch.events.clear();
        if batch.bytes.capacity() > settings.batch_max_bytes.saturating_mul(2) {
            batch.bytes = Vec::new();
        }
        let mut spares = walrelay_common::sync::lock(&self.0);
        if spares.len() < Self::KEEP {
            spares.push(batch);
        }
    }
}

/// A consumer group member feeding one sink.
pub struct Runtime {
    group: Arc<Group>,
    dead_letters: DeadLetters,
    settings: RuntimeSettings,
    metrics: Arc<Metrics>,
    /// Keeps a `--topic-pattern` subscription current ([`group::follow`]).
    follower: Option<tokio::task::JoinHandle<()>>,
    /// Takes the lag of paused topic-partitions from the broker ([`group::refresh_lag`]).
    lag_refresher: tokio::task::JoinHandle<()>,
    /// Reads Avro records (`--schema-registry-url`).
    avro: Option<Arc<codec::avro::Decoder>>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        self.lag_refresher.abort();
    }
}

impl Runtime {
    /// Joins `group_id` on the configured topics and prepares the dead-letter topic (waiting
    /// for Kafka until `shutdown` when it is unreachable).
    pub async fn new(
        settings: &RuntimeSettings,
        group_id: &str,
        metrics: Arc<Metrics>,
        readiness: Readiness,
        shutdown: &CancellationToken,
    ) -> Result<Self, RuntimeError> {
        let group = Arc::new(Group::join(
            settings,
            group_id,
            Arc::clone(&metrics),
            readiness,
        )?);
        let dead_letters = DeadLetters::new(settings, group_id, shutdown).await?;
        let follower = match &settings.topics {
            Topics::One(_) => None,
            Topics::Pattern(pattern) => Some(tokio::spawn(group::follow(
                Arc::downgrade(&group),
                pattern.clone(),
                group::follow_interval(settings),
            ))),
        };
        let lag_refresher = tokio::spawn(group::refresh_lag(Arc::downgrade(&group)));
        let avro = match &settings.registry {
            Some(options) => Some(Arc::new(codec::avro::Decoder::new(Arc::new(
                walrelay_common::registry::Registry::new(options)
                    .map_err(|e| RuntimeError::Registry(e.to_string()))?,
            )))),
            None => None,
        };
        Ok(Self {
            group,
            dead_letters,
            settings: settings.clone(),
            metrics,
            follower,
            lag_refresher,
            avro,
        })
    }

    /// Reads, batches and writes until `shutdown`, then drains and commits.
    ///
    /// Reading and writing overlap: while the sink writes one batch, the next is decoded and
    /// the one after it fetched (see the module's "Memory").
    pub async fn run<S: Sink>(
        &self,
        sink: &mut S,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        // Retries go on after a shutdown request for at most DRAIN_DEADLINE.
        let drain = CancellationToken::new();
        let deadline_guard = {
            let (drain, shutdown) = (drain.clone(), shutdown.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(DRAIN_DEADLINE).await;
                drain.cancel();
            })
        };
        // Batches decode on blocking threads; the writer takes them in order. The reader sends a
        // batch (and starts decoding it) only when the channel is empty: while the writer
        // writes one, the next waits in the channel and the reader fills the one after it.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Decoding>(1);
        let spares = Arc::new(Spares::default());
        let paused = Arc::new(BacklogPause::default());
        let writer = async {
            let mut idle_since = Instant::now();
            let mut progress = Progress::default();
            let mut tick = tokio::time::interval(BACKLOG_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let decoding = tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => d,
                        None => break,
                    },
                    _ = tick.tick() => {
                        if let Err(error) = sink.tick(&drain).await {
                            rx.close();
                            return Err(RuntimeError::Sink { sink: sink.name(), error });
                        }
                        // A backlog shrinks between batches too (a parked endpoint is back).
                        let backlog = sink.backlog();
                        progress.restore(self, &backlog);
                        paused.set(&backlog);
                        continue;
                    }
                };
                let Ok(mut batch) = decoding.await else {
                    rx.close();
                    return Err(RuntimeError::Sink {
                        sink: sink.name(),
                        error: SinkError::Definite("a decoding task failed".into()),
                    });
                };
                let waited = idle_since.elapsed();
                if let Err(e) = flush(self, &self.metrics, sink, &mut batch, &drain).await {
                    // Stop reading; the batches after this one are not committed.
                    rx.close();
                    return Err(e);
                }
                progress.record(&batch.records);
                paused.set(&sink.backlog());
                spares.give(batch, &self.settings);
                tracing::trace!(
                    waited_ms = waited.as_millis() as u64,
                    "Writer waited for the batch."
                );
                idle_since = Instant::now();
            }
            Ok(())
        };
        // The reader runs as its own task, so decoding uses another core than the writer.
        let reader = tokio::spawn(read(
            Arc::clone(&self.group),
            self.settings.clone(),
            self.avro.clone(),
            tx,
            Arc::clone(&spares),
            Arc::clone(&paused),
            shutdown.clone(),
        ));
        let written = writer.await;
        if let Err(e) = reader.await {
            tracing::error!(error = %e, "The reader task failed.");
        }
        deadline_guard.abort();
        // No more subscription changes (a rejoin) while leaving.
        if let Some(f) = &self.follower {
            f.abort();
        }
        self.lag_refresher.abort();
        if let Err(e) = self
            .group
            .consumer()
            .commit_consumer_state(CommitMode::Sync)
        {
            tracing::debug!(error = %e, "Final commit had nothing to commit or failed.");
        }
        tracing::info!("Drained and committed; leaving the consumer group.");
        written
    }
}

/// What writing a batch does to Kafka besides reading: the group's assignment epochs, the
/// stored offsets and the dead-letter topic. [`Runtime`] is the Kafka implementation; the unit
/// tests use a recorder, so the offset rule is tested without a broker.
trait Effects {
    /// The current assignment epoch of `topic`'s `partition`, `None` when it is not assigned.
    fn epoch(&self, topic: &str, partition: i32) -> Option<u64>;
    /// Stores `next` offsets ((topic, partition) → offset of the next record to read).
    fn store_offsets(&self, next: &BTreeMap<(&str, i32), i64>);
    /// Writes dead letters and waits for the topic's acknowledgement.
    fn dead_letter(
        &self,
        letters: &[DeadLetter<'_>],
        shutdown: &CancellationToken,
    ) -> impl Future<Output = Result<(), DeadLetterError>> + Send;
    /// The dead-letter topic (for logs).
    fn dead_letter_topic(&self) -> &str;
}

impl Effects for Runtime {
    fn epoch(&self, topic: &str, partition: i32) -> Option<u64> {
        self.group.epoch(topic, partition)
    }

    fn store_offsets(&self, next: &BTreeMap<(&str, i32), i64>) {
        let mut tpl = TopicPartitionList::new();
        for (&(topic, partition), &offset) in next {
            if tpl
                .add_partition_offset(topic, partition, Offset::Offset(offset))
                .is_err()
            {
                continue;
            }
        }
        if let Err(e) = self.group.consumer().store_offsets(&tpl) {
            // A partition revoked during the write: its next owner re-applies the events.
            tracing::debug!(error = %e, "Could not store offsets (partition revoked?).");
        }
    }

    async fn dead_letter(
        &self,
        letters: &[DeadLetter<'_>],
        shutdown: &CancellationToken,
    ) -> Result<(), DeadLetterError> {
        self.dead_letters.send(letters, shutdown).await
    }

    fn dead_letter_topic(&self) -> &str {
        self.dead_letters.topic()
    }
}

/// Writes one batch: drops what a revoke took away, hands the events to the sink, dead-letters
/// what it refused, and only then stores the offsets (see "Offset progress" above).
async fn flush<S: Sink, E: Effects>(
    fx: &E,
    metrics: &Metrics,
    sink: &mut S,
    batch: &mut Batch,
    shutdown: &CancellationToken,
) -> Result<(), RuntimeError> {
    let started = Instant::now();
    let Batch {
        records: batch,
        bytes,
        events,
    } = batch;
    // Drop what was fetched under an assignment revoked since.
    let fetched = batch.len();
    drop_revoked(fx, batch, events);
    if batch.len() < fetched {
        tracing::debug!(
            dropped = fetched - batch.len(),
            "Dropped events fetched under a revoked assignment."
        );
    }
    if batch.is_empty() {
        return Ok(());
    }
    if sink.wants_raw() {
        // JSON records as they arrived; Avro records as the JSON envelope decoding gave.
        let decoded = batch.iter().filter(|p| p.decode_error.is_none());
        for (e, p) in events.iter_mut().zip(decoded) {
            if e.raw.is_none() {
                e.raw = Some(bytes[p.value.clone()].to_vec());
            }
        }
    } else {
        for e in events.iter_mut() {
            e.raw = None;
        }
    }
    let verdicts = if events.is_empty() {
        Vec::new()
    } else {
        sink.write(events, shutdown)
            .await
            .map_err(|error| RuntimeError::Sink {
                sink: sink.name(),
                error,
            })?
    };
    if verdicts.len() != events.len() {
        return Err(RuntimeError::Sink {
            sink: sink.name(),
            error: SinkError::Definite(format!(
                "returned {} verdicts for {} events (a sink bug)",
                verdicts.len(),
                events.len()
            )),
        });
    }
    let mut verdicts = verdicts.into_iter().zip(events.iter());
    let mut dead = Vec::new();
    let now_ms = walrelay_common::clock::now_ms();
    // Counted per batch: one label lookup per (op, table), not per event.
    let mut counts: HashMap<(Op, &str, &str), u64> = HashMap::new();
    let mut stale = 0u64;
    for p in batch.iter() {
        let key = p.key.clone().map(|k| &bytes[k]);
        let payload = &bytes[p.value.clone()];
        let (reason, message) = match &p.decode_error {
            Some(err) => ("decode", err.clone()),
            None => match verdicts.next() {
                Some((Verdict::Rejected(why), _)) => ("rejected", why),
                Some((Verdict::DeadLetters(letters), _)) => {
                    for l in letters {
                        dead.push(DeadLetter {
                            topic: &p.topic,
                            partition: p.partition,
                            offset: p.offset,
                            key,
                            payload,
                            reason: l.reason,
                            message: l.message,
                            sink: sink.name(),
                            headers: l.headers,
                        });
                    }
                    continue;
                }
                Some((v, event)) => {
                    stale += u64::from(v == Verdict::Stale);
                    let env = &event.envelope;
                    *counts
                        .entry((env.op, &env.source.schema, &env.source.table))
                        .or_default() += 1;
                    let age_ms = now_ms.saturating_sub(env.ts_ms);
                    metrics
                        .end_to_end_seconds
                        .observe(age_ms.max(0) as f64 / 1000.0);
                    continue;
                }
                None => continue,
            },
        };
        dead.push(DeadLetter {
            topic: &p.topic,
            partition: p.partition,
            offset: p.offset,
            key,
            payload,
            reason,
            message,
            sink: sink.name(),
            headers: Vec::new(),
        });
    }
    metrics.version_conflicts.inc_by(stale);
    for ((op, schema, table), n) in counts {
        metrics
            .events
            .with_label_values(&[op.code(), &format!("{schema}.{table}")])
            .inc_by(n);
    }
    if !dead.is_empty() {
        fx.dead_letter(&dead, shutdown).await?;
        for d in &dead {
            metrics.dead_letters.with_label_values(&[d.reason]).inc();
        }
        tracing::warn!(
            count = dead.len(),
            topic = %fx.dead_letter_topic(),
            first_topic = %dead[0].topic,
            first_partition = dead[0].partition,
            first_offset = dead[0].offset,
            first_error = %dead[0].message,
            "Dead-lettered events."
        );
    }
    store_offsets(fx, batch, &sink.backlog());
    sink.settled().await;
    metrics
        .batch_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_events.observe(batch.len() as f64);
    tracing::debug!(
        events = batch.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Batch applied."
    );
    Ok(())
}

/// Removes the records (and their events) fetched under an assignment revoked since; moves
/// nothing when every partition is still ours (the usual case).
fn drop_revoked<E: Effects>(fx: &E, batch: &mut Vec<Pending>, events: &mut Vec<Event>) {
    // One epoch lookup per topic-partition, not per record.
    let mut current: HashMap<(&str, i32), Option<u64>> = HashMap::new();
    let keep: Vec<bool> = batch
        .iter()
        .map(|p| {
            *current
                .entry((&p.topic, p.partition))
                .or_insert_with(|| fx.epoch(&p.topic, p.partition))
                == Some(p.epoch)
        })
        .collect();
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut event_kept = batch
        .iter()
        .zip(&keep)
        .filter(|(p, _)| p.decode_error.is_none())
        .map(|(_, k)| *k);
    events.retain(|_| event_kept.next().unwrap_or(false));
    let mut record_kept = keep.iter();
    batch.retain(|_| record_kept.next().copied().unwrap_or(false));
}

/// Stores `last offset + 1` of every topic-partition in the batch, or the oldest offset the
/// sink still owes there ([`Sink::backlog`]) when that is lower.
fn store_offsets<E: Effects>(fx: &E, batch: &[Pending], backlog: &Backlog) {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for p in batch {
        let e = next.entry((&p.topic, p.partition)).or_insert(0);
        *e = (*e).max(p.offset + 1);
    }
    if !backlog.oldest.is_empty() {
        for (&(topic, partition), offset) in next.iter_mut() {
            if let Some(oldest) = backlog.oldest.get(&(Arc::from(topic), partition)) {
                *offset = (*offset).min(*oldest);
            }
        }
    }
    fx.store_offsets(&next);
}

/// The offsets written so far per topic-partition (with the assignment they were read under),
/// so that they can be stored again as a sink's [`Backlog`] shrinks between batches.
#[derive(Default)]
struct Progress {
    done: HashMap<(Arc<str>, i32), (u64, i64)>,
    /// The backlog was not empty when last looked at.
    owed: bool,
}

impl Progress {
    /// Records a written batch.
    fn record(&mut self, batch: &[Pending]) {
        for p in batch {
            let e = self
                .done
                .entry((Arc::clone(&p.topic), p.partition))
                .or_insert((p.epoch, 0));
            if e.0 != p.epoch {
                *e = (p.epoch, 0);
            }
            e.1 = e.1.max(p.offset + 1);
        }
    }

    /// Stores again what was written, capped by `backlog`, for the topic-partitions still held
    /// under the same assignment; only while a backlog exists or just emptied.
    fn restore<E: Effects>(&mut self, fx: &E, backlog: &Backlog) {
        let owed = !backlog.oldest.is_empty();
        if !owed && !self.owed {
            return;
        }
        self.owed = owed;
        self.done
            .retain(|(topic, partition), (epoch, _)| fx.epoch(topic, *partition) == Some(*epoch));
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for ((topic, partition), (_, offset)) in &self.done {
            let cap = backlog
                .oldest
                .get(&(Arc::clone(topic), *partition))
                .copied()
                .unwrap_or(i64::MAX);
            next.insert((&**topic, *partition), (*offset).min(cap));
        }
        if !next.is_empty() {
            fx.store_offsets(&next);
        }
    }
}

/// Topic-partitions, by shared topic name.
type TopicPartitions = BTreeSet<(Arc<str>, i32)>;

/// The topic-partitions a full sink backlog pauses (with a generation that changes with them),
/// set by the writer and applied by the reader.
#[derive(Default)]
struct BacklogPause(std::sync::Mutex<(u64, TopicPartitions)>);

impl BacklogPause {
    fn set(&self, backlog: &Backlog) {
        let wanted: TopicPartitions = if backlog.full {
            backlog.oldest.keys().cloned().collect()
        } else {
            BTreeSet::new()
        };
        let mut state = walrelay_common::sync::lock(&self.0);
        if state.1 != wanted {
            state.0 += 1;
            state.1 = wanted;
        }
    }

    fn get(&self) -> (u64, TopicPartitions) {
        walrelay_common::sync::lock(&self.0).clone()
    }
}

/// Which topic-partitions the reader has paused, and why. The group is told of every change
/// (their lag comes from the broker while paused).
///
/// librdkafka keeps an application's pause on a topic-partition across its revoke and a later
/// re-assignment (librdkafka #1849), while the runtime's reasons to pause start afresh with
/// each assignment. So the record of a pause outlives its assignment: a topic-partition that
/// comes back paused and is not wanted paused any more is resumed here, or it would never be
/// fetched again.
///
/// ```text
///   paused ──revoke──▶ (not assigned, librdkafka still holds the pause) ──assign──▶ wanted? ─no─▶ resume
///                                                                          └─yes─▶ stays paused
/// ```
#[derive(Default)]
struct Pauser {
    /// Every topic-partition librdkafka holds paused for the runtime, with the assignment epoch
    /// it was last seen paused under.
    held: group::Paused,
    /// The assigned topic-partitions paused under their current assignment, as last told to
    /// the group.
    told: group::Paused,
    /// (everything, backlog generation) at the last look, and when.
    last: Option<(bool, u64, Instant)>,
}

impl Pauser {
    /// Pauses what must not be fetched now (every assigned topic-partition when `all`, else
    /// those of a full backlog) and resumes the rest; looks again at most every 200 ms unless
    /// the reason changed.
    fn apply(&mut self, group: &Group, all: bool, backlog: &BacklogPause, metrics: &Metrics) {
        let (generation, held) = backlog.get();
        if self.last.is_some_and(|(a, g, t)| {
            a == all && g == generation && t.elapsed() < Duration::from_millis(200)
        }) {
            return;
        }
        self.last = Some((all, generation, Instant::now()));
        let assigned = group.assigned();
        let (pause, resume) = self.decide(&assigned, |key| all || held.contains(key));
        let consumer = group.consumer();
        if pause.count() > 0 {
            if let Err(e) = consumer.pause(&pause) {
                tracing::debug!(error = %e, "Could not pause fetching (partition revoked?).");
            }
            tracing::debug!(
                partitions = pause.count(),
                everything = all,
                "Fetching paused; polling goes on."
            );
        }
        if resume.count() > 0 {
            if let Err(e) = consumer.resume(&resume) {
                tracing::debug!(error = %e, "Could not resume fetching (partition revoked?).");
            }
            tracing::debug!(partitions = resume.count(), "Fetching resumed.");
        }
        let now: group::Paused = self
            .held
            .iter()
            .filter(|((topic, partition), epoch)| {
                assigned
                    .iter()
                    .any(|(t, p, e)| t == topic && p == partition && e == *epoch)
            })
            .map(|(key, epoch)| (key.clone(), *epoch))
            .collect();
        if now != self.told {
            // A paused topic-partition's lag is the broker's until it resumes.
            group.paused(&now);
            self.told = now;
        }
        metrics.paused_partitions.set(self.told.len() as i64);
    }

    /// What to pause and what to resume among `assigned` (topic, partition, epoch), given which
    /// are `wanted` paused; records the outcome in `held`.
    fn decide(
        &mut self,
        assigned: &[(Arc<str>, i32, u64)],
        wanted: impl Fn(&(Arc<str>, i32)) -> bool,
    ) -> (TopicPartitionList, TopicPartitionList) {
        let mut pause = TopicPartitionList::new();
        let mut resume = TopicPartitionList::new();
        for (topic, partition, epoch) in assigned {
            let key = (Arc::clone(topic), *partition);
            let want = wanted(&key);
            match self.held.get_mut(&key) {
                None if want => {
                    let _ = pause.add_partition(topic, *partition);
                    self.held.insert(key, *epoch);
                }
                Some(_) if !want => {
                    let _ = resume.add_partition(topic, *partition);
                    self.held.remove(&key);
                }
                // Still held by librdkafka, now under this assignment.
                Some(held_under) => *held_under = *epoch,
                None => {}
            }
        }
        (pause, resume)
    }
}

/// Fetches, decodes and cuts batches until `shutdown` (then hands over the partial batch)
/// or until the writer stops.
///
/// The consumer is polled all the time, so it never leaves the group for not polling
/// (`max.poll.interval.ms`), however long the sink takes: when a cut batch has waited
/// [`PAUSE_AFTER`] for the writer, fetching of every assigned topic-partition is paused
/// (librdkafka drops what it prefetched and fetches it again on resume) and polling goes on;
/// the few records already on their way then join the waiting batch. The topic-partitions of a
/// full sink backlog are paused likewise.
async fn read(
    group: Arc<Group>,
    settings: RuntimeSettings,
    avro: Option<Arc<codec::avro::Decoder>>,
    tx: tokio::sync::mpsc::Sender<Decoding>,
    spares: Arc<Spares>,
    backlog: Arc<BacklogPause>,
    shutdown: CancellationToken,
) {
    let metrics = group.metrics();
    let mut pauser = Pauser::default();
    let mut batch = spares.take();
    let mut started: Option<Instant> = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let deadline = started.map(|t| t + settings.batch_max_wait);
        let now = Instant::now();
        let ready = !batch.records.is_empty()
            && (batch.is_full(&settings) || deadline.is_some_and(|d| now >= d));
        if !ready {
            waiting_since = None;
        }
        let stalled = ready && now >= *waiting_since.get_or_insert(now) + PAUSE_AFTER;
        pauser.apply(&group, stalled, &backlog, &metrics);
        let received = if ready {
            // Decoding starts only once the channel has room for the batch: at most two
            // decoded batches exist (the one being written and the next).
            let until = waiting_since.unwrap_or(now) + PAUSE_AFTER;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = tx.reserve() => {
                    let Ok(permit) = permit else {
                        return;
                    };
                    permit.send(decoding(
                        std::mem::replace(&mut batch, spares.take()),
                        avro.clone(),
                    ));
                    started = None;
                    continue;
                }
                r = group.recv(Some(now + Duration::from_millis(200)), &mut batch.bytes), if stalled => r,
                () = tokio::time::sleep_until(until.into()), if !stalled => continue,
            }
        } else {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = tx.closed() => return,
                r = group.recv(deadline, &mut batch.bytes) => r,
            }
        };
        // Take what is already fetched without a timer per message.
        let mut next = received;
        while let Some(p) = next {
            started.get_or_insert_with(Instant::now);
            batch.records.push(p);
            if batch.is_full(&settings) {
                break;
            }
            next = group.try_recv(&mut batch.bytes);
        }
    }
    if !batch.records.is_empty() {
        let _ = tx.send(decoding(batch, avro)).await;
    }
}

/// A batch being decoded.
type Decoding = tokio::task::JoinHandle<Batch>;

/// Decodes `batch` off the runtime's threads. Avro records whose schema is not cached yet
/// have it fetched first; while the registry is unavailable this waits and retries (the batch
/// is not written, nothing is committed), like a sink retrying.
fn decoding(mut batch: Batch, avro: Option<Arc<codec::avro::Decoder>>) -> Decoding {
    tokio::spawn(async move {
        if let Some(d) = &avro {
            fetch_schemas(d, &mut batch).await;
        }
        tokio::task::spawn_blocking(move || {
            decode(&mut batch, avro.as_deref());
            batch
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    })
}

async fn fetch_schemas(d: &codec::avro::Decoder, batch: &mut Batch) {
    for i in 0..batch.records.len() {
        let p = &batch.records[i];
        if p.decode_error.is_some() {
            continue;
        }
        let Some(id) = d.unknown_id(&batch.bytes[p.value.clone()]) else {
            continue;
        };
        if let Err(e) = d.ready(id, std::future::pending()).await {
            batch.records[i].decode_error = Some(e);
        }
    }
}

/// Builds a batch entry from a fetched message of `topic` (its shared name), copying its key and
/// value to the end of the batch's `bytes`; [`decode`] comes later, off the fetching task.
fn pending<M: Message>(m: &M, topic: Arc<str>, epoch: u64, bytes: &mut Vec<u8>) -> Pending {
    let mut append = |data: &[u8]| {
        let start = bytes.len();
        bytes.extend_from_slice(data);
        start..bytes.len()
    };
    let key = m.key().map(&mut append);
    let payload = m.payload();
    Pending {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        epoch,
        key,
        value: append(payload.unwrap_or_default()),
        decode_error: payload
            .is_none()
            .then(|| "record has no value (a tombstone is not a walrelay event)".to_string()),
    }
}

/// Decodes every record of a batch into its events, in order; the others get their error.
fn decode(batch: &mut Batch, avro: Option<&codec::avro::Decoder>) {
    let Batch {
        records,
        bytes,
        events,
    } = batch;
    events.reserve(records.len());
    for p in records.iter_mut() {
        if p.decode_error.is_some() {
            continue;
        }
        // An Avro record keeps the JSON envelope it equals, for sinks that forward records whole.
        let decoded = codec::decode(&bytes[p.value.clone()], avro);
        match decoded {
            Ok((d, json)) => {
                events.push(Event {
                    topic: Arc::clone(&p.topic),
                    partition: p.partition,
                    offset: p.offset,
                    envelope: d.envelope,
                    after_json: d.after,
                    raw: json,
                });
            }
            Err(e) => p.decode_error = Some(e.to_string()),
        }
    }
}
