//! One WebSocket connection: its Kafka group member, the loop that reads records, sends
//! frames and applies acks, and how it ends. The rules are the module's essay
//! ([`crate::stream`]); the bookkeeping is [`Tracker`].
//!
//! One task runs the loop; the member's rebalance callbacks run inside its poll, so a revoke is
//! seen before the next record is handled. Each pass:
//!
//! 1. follows an assignment change: drops the bookkeeping and the queued records of partitions
//!    no longer ours (their unacknowledged events go to the next owner) and asks where new
//!    partitions start (for `caught_up`);
//! 2. sends queued records while fewer than `--max-unacked` are in flight (decoding each with
//!    the shared codec; skipping those no `tables` pattern matches, tombstones and undecodable
//!    records), then `caught_up` once it is due;
//! 3. pauses the member's partitions while the queue holds `--max-queued-bytes` (resumes when
//!    it is half empty), so memory stays bounded and polling (hence rebalances) goes on. A
//!    paused partition's lag is not librdkafka's: its statistics hold it at its value when the
//!    pause began, flat exactly while the client falls behind. So the member is told what is
//!    paused ([`kafka::MemberContext::paused`]), and while it is, the tick takes the lag from
//!    the broker every 5 s instead (end offsets minus the committed offsets, one query at a
//!    time on a blocking thread: [`crate::lag`]) until the statistics take over again on
//!    resume;
//! 4. waits for the first of: shutdown, a client frame, the 200 ms tick (offsets stored, idle
//!    checks, pings, lag: reported every 5 s, and as soon as the broker answered for paused
//!    partitions), start offsets, a record.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use walrelay_common::codec;

use super::config::StreamSettings;
use super::frames::{self, ClientFrame, Code};
use super::kafka::{self, Member, Tp};
use super::metrics::StreamMetrics;
use super::query::{Query, Start};
use super::tracker::{AckError, Acked, Key, Tracker};
use crate::config::RuntimeSettings;
use crate::lag::{self, LagError};
use crate::topics::Topics;

/// What every connection shares.
pub struct Gateway {
    /// Kafka side: brokers, topics, registry, prefetch.
    pub runtime: RuntimeSettings,
    /// The gateway's own settings.
    pub settings: StreamSettings,
    /// Metrics.
    pub metrics: Arc<StreamMetrics>,
    /// Reads Avro records (`--schema-registry-url`).
    pub avro: Option<Arc<codec::avro::Decoder>>,
    /// Fires on SIGTERM.
    pub shutdown: CancellationToken,
    /// Connection ids (for the lag metric).
    pub next_id: AtomicU64,
    /// Members whose final commit is under way.
    pub closing: AtomicUsize,
    /// Failed lag queries are logged once a minute at most, over every connection.
    pub lag_warnings: lag::Throttle,
}

/// Frames sent per write before the loop looks at Kafka and the client again.
const SEND_BATCH: usize = 256;
/// Records taken from the member per wake-up.
const RECV_BATCH: usize = 512;
/// Refused acks in a row before the connection is closed.
const MAX_ERRORS_IN_ROW: u32 = 100;
/// Housekeeping period.
const TICK: Duration = Duration::from_millis(200);
/// How long a closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A record read and not yet handled.
enum Item {
    Record {
        key: Key,
        epoch: u64,
        offset: i64,
        /// `None`: a tombstone.
        value: Option<Vec<u8>>,
    },
    /// The member reached the end of partition `partition` (of the one topic read).
    End { partition: i32 },
}

impl Item {
    fn bytes(&self) -> usize {
        match self {
            Item::Record { value, .. } => value.as_ref().map_or(0, Vec::len) + 64,
            Item::End { .. } => 16,
        }
    }
}

/// How the loop ended.
enum End {
    /// The client closed, or the socket failed.
    ClientGone,
    /// The gateway closes, with this error frame.
    Close(Code, String),
}

/// Serves one upgraded connection until it ends; `_permit` is its `--max-connections` slot.
pub async fn run(socket: WebSocket, query: Query, gw: Arc<Gateway>, _permit: OwnedSemaphorePermit) {
    let id = gw.next_id.fetch_add(1, Ordering::Relaxed);
    let group_id = format!("{}{}", gw.settings.group_prefix, query.group);
    gw.metrics.connections.inc();
    tracing::info!(conn = id, group = %group_id, from = query.from.reset(), "Stream opened.");
    let (mut tx, rx) = socket.split();
    let (end, unacked) = match open(&gw, &group_id, query.from).await {
        Err(message) => (End::Close(Code::Kafka, message), 0),
        Ok((member, ends)) => {
            let mut s = Session::new(&gw, &member, &query, ends, id);
            let end = s.serve(&mut tx, rx).await;
            // A revoke seen by the last poll: those partitions are not ours to commit.
            let assigned = member.context().assigned();
            let dropped = s
                .tracker
                .retain(|t, p| assigned.get(&(t.to_string(), p)).copied());
            gw.metrics.unacked.sub(dropped as i64);
            let unacked = s.tracker.inflight();
            let last = s.tracker.all_committable();
            let lag_query = s.lag_query.take();
            gw.metrics.report_lag(&query.group, id, None);
            // The final commit covers what was acknowledged (never beyond), then the member
            // leaves the group; in a task of its own so the close frame goes out at once.
            gw.closing.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(leave(Arc::clone(&gw), member, last, lag_query));
            (end, unacked)
        }
    };
    gw.metrics.unacked.sub(unacked as i64);
    gw.metrics.connections.dec();
    match end {
        End::ClientGone => {
            tracing::info!(conn = id, group = %group_id, unacked, "Stream closed by the client.");
        }
        End::Close(code, message) => {
            gw.metrics.errors.with_label_values(&[code.as_str()]).inc();
            tracing::info!(conn = id, group = %group_id, unacked, code = code.as_str(), %message, "Closing a stream.");
            let close = async {
                tx.send(Message::Text(frames::error(code, &message).into()))
                    .await?;
                let reason: String = message.chars().take(100).collect();
                tx.send(Message::Close(Some(CloseFrame {
                    code: code.close().unwrap_or(1000),
                    reason: reason.into(),
                })))
                .await
            };
            let _ = tokio::time::timeout(CLOSE_WAIT, close).await;
        }
    }
}

/// Longest wait for a member to give up its partitions and empty its queue when it leaves.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

/// A query for the lag of paused partitions ([`kafka::refresh_lag`]) under way.
type LagQuery = tokio::task::JoinHandle<Result<usize, LagError>>;

/// Commits `last`, leaves the group, drains what the member had fetched, then destroys it.
///
/// Records librdkafka fetched but nobody polled hold references to their partitions, and
/// through them to the broker connections; `rd_kafka_destroy` waits for those forever (its
/// broker threads never end). So the member unsubscribes and is polled until its assignment is
/// empty and nothing more arrives, and only then dropped (on a thread of its own: the drop
/// blocks until the consumer is closed, and must never hold a runtime thread or the process's
/// exit). The test `a_new_group_gets_the_state…` counts the gateway's librdkafka threads after
/// its connections closed. A lag query still under way holds the member too: it ends first
/// (within its 2 s timeout), so that the member is dropped here and nowhere else.
async fn leave(
    gw: Arc<Gateway>,
    member: Arc<Member>,
    last: Vec<(Key, i64)>,
    lag_query: Option<LagQuery>,
) {
    if let Some(q) = lag_query {
        let _ = q.await;
    }
    let m = Arc::clone(&member);
    let committed = tokio::task::spawn_blocking(move || {
        // Paused partitions are resumed: their fetched records are drained below like the rest.
        if let Ok(assignment) = m.assignment() {
            let _ = m.resume(&assignment);
        }
        let tpl = tpl(&last);
        if tpl.count() > 0 {
            let _ = m.store_offsets(&tpl);
            if let Err(e) = m.commit(&tpl, CommitMode::Sync) {
                tracing::debug!(error = %e, "Final commit of a stream failed (partitions revoked?).");
            }
        }
        m.unsubscribe();
    })
    .await;
    if let Err(e) = committed {
        tracing::warn!(error = %e, "The final commit of a stream did not run.");
    }
    let deadline = Instant::now() + LEAVE_WAIT;
    {
        let mut records = member.stream();
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), records.next()).await {
                // Dropped at once: nothing past the final commit is sent or stored.
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => {
                    if member.assignment().map(|a| a.count() == 0).unwrap_or(true) {
                        break;
                    }
                }
            }
        }
    }
    gw.closing.fetch_sub(1, Ordering::Relaxed);
    let dropped = std::thread::Builder::new()
        .name("stream-close".into())
        .spawn(move || {
            drop(member);
            tracing::debug!("A stream's Kafka member closed.");
        });
    if let Err(e) = dropped {
        tracing::warn!(error = %e, "Could not start a thread to close a stream's member.");
    }
}

/// Creates the member, reads the end offsets and subscribes.
async fn open(
    gw: &Gateway,
    group_id: &str,
    start: Start,
) -> Result<(Arc<Member>, HashMap<Tp, i64>), String> {
    let member = Arc::new(
        kafka::member(&gw.runtime, group_id, start)
            .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?,
    );
    let (m, topics) = (Arc::clone(&member), gw.runtime.topics.clone());
    let ends = tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
        let ends = kafka::ends(&*m, &topics)?;
        match &topics {
            Topics::One(t) => m.subscribe(&[t])?,
            Topics::Pattern(p) => {
                kafka::follow(&*m, p, &mut BTreeSet::new())?;
            }
        }
        Ok(ends)
    })
    .await
    .map_err(|e| format!("reading the end offsets failed: {e}"))?
    .map_err(|e| format!("cannot read the topics' end offsets from Kafka: {e}"))?;
    Ok((member, ends))
}

fn tpl(offsets: &[(Key, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in offsets {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    tpl
}

type Tx = futures_util::stream::SplitSink<WebSocket, Message>;
type Rx = futures_util::stream::SplitStream<WebSocket>;

struct Session<'a> {
    gw: &'a Gateway,
    member: &'a Arc<Member>,
    query: &'a Query,
    id: u64,
    tracker: Tracker,
    ready: VecDeque<Item>,
    ready_bytes: usize,
    topics: HashMap<String, Arc<str>>,
    /// End offsets seen when the connection opened.
    ends: HashMap<Tp, i64>,
    /// Where assigned partitions started (committed offset, or the first or last one).
    starts: HashMap<Tp, i64>,
    /// Partitions whose end was reached (one topic read).
    at_end: HashSet<Tp>,
    caught_up: bool,
    generation: u64,
    paused: bool,
    /// The partitions librdkafka holds paused for this session. librdkafka keeps a pause across
    /// a revoke and a later re-assignment (librdkafka #1849): one that comes back while the
    /// session is not paused is resumed when the assignment changes, or never fetched again.
    held: HashSet<Tp>,
    last_heard: Instant,
    last_progress: Instant,
    last_ping: Instant,
    last_lag: Instant,
    /// The lag query under way while paused (one at a time).
    lag_query: Option<LagQuery>,
    errors_in_row: u32,
    /// Skipped since the last log line: (undecodable count, first error).
    undecodable: (u64, Option<String>),
}

impl<'a> Session<'a> {
    fn new(
        gw: &'a Gateway,
        member: &'a Arc<Member>,
        query: &'a Query,
        ends: HashMap<Tp, i64>,
        id: u64,
    ) -> Self {
        let now = Instant::now();
        Self {
            gw,
            member,
            query,
            id,
            tracker: Tracker::default(),
            ready: VecDeque::new(),
            ready_bytes: 0,
            topics: HashMap::new(),
            ends,
            starts: HashMap::new(),
            at_end: HashSet::new(),
            caught_up: false,
            generation: 0,
            paused: false,
            held: HashSet::new(),
            last_heard: now,
            last_progress: now,
            last_ping: now,
            last_lag: now,
            lag_query: None,
            errors_in_row: 0,
            undecodable: (0, None),
        }
    }

    async fn serve(&mut self, tx: &mut Tx, mut rx: Rx) -> End {
        let member = Arc::clone(self.member);
        let mut records = member.stream();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (starts_tx, mut starts_rx) = tokio::sync::mpsc::channel(4);
        let mut follow_at =
            Instant::now() + crate::topics::refresh_interval(&self.gw.runtime.kafka_properties);
        // What `open` subscribed to, so that an unchanged pattern does not subscribe again.
        let mut subscribed: BTreeSet<String> = member
            .subscription()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| e.topic().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let shutdown = self.gw.shutdown.clone();
        loop {
            self.follow_assignment(&starts_tx);
            if let Err(end) = self.send_ready(tx).await {
                return end;
            }
            self.pace();
            let more =
                self.tracker.inflight() < self.gw.settings.max_unacked && !self.ready.is_empty();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    return End::Close(Code::ShuttingDown, "the gateway is stopping; reconnect to resume after your last ack".into());
                }
                frame = rx.next() => {
                    self.last_heard = Instant::now();
                    match frame {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return End::ClientGone,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Binary(_))) => {
                            return End::Close(Code::Malformed, "binary frames are not part of the protocol; send JSON text frames".into());
                        }
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = self.client_frame(tx, text.as_str()).await {
                                return end;
                            }
                        }
                    }
                }
                _ = tick.tick() => {
                    if let Err(end) = self.housekeeping(tx).await {
                        return end;
                    }
                    if let Topics::Pattern(p) = &self.gw.runtime.topics && Instant::now() >= follow_at {
                        follow_at = Instant::now() + crate::topics::refresh_interval(&self.gw.runtime.kafka_properties);
                        let (m, p) = (Arc::clone(self.member), p.clone());
                        let mut current = std::mem::take(&mut subscribed);
                        // A short blocking metadata request; the loop waits for it.
                        match tokio::task::spawn_blocking(move || kafka::follow(&*m, &p, &mut current).map(|_| current)).await {
                            Ok(Ok(c)) => subscribed = c,
                            Ok(Err(e)) => tracing::debug!(error = %e, "Could not resolve the topic pattern; retrying."),
                            Err(e) => tracing::debug!(error = %e, "The topic pattern lookup failed."),
                        }
                    }
                }
                Some(starts) = starts_rx.recv() => {
                    self.starts.extend(starts);
                }
                record = records.next() => {
                    let Some(first) = record else {
                        return End::Close(Code::Kafka, "the Kafka consumer stopped".into());
                    };
                    self.take(first);
                    while self.ready_bytes < self.gw.runtime.max_queued_bytes && self.ready.len() < RECV_BATCH * 4 {
                        match records.next().now_or_never() {
                            Some(Some(r)) => self.take(r),
                            _ => break,
                        }
                    }
                }
                () = std::future::ready(()), if more => {}
            }
        }
    }

    /// Queues a record (or an end of partition) from the member.
    fn take(&mut self, r: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>) {
        match r {
            Ok(m) => {
                let key = (self.topic(m.topic()), m.partition());
                // A record of a partition revoked since it was fetched: epoch 0 never matches.
                let epoch = self
                    .member
                    .context()
                    .epoch(m.topic(), m.partition())
                    .unwrap_or(0);
                let item = Item::Record {
                    key,
                    epoch,
                    offset: m.offset(),
                    value: m.payload().map(<[u8]>::to_vec),
                };
                self.ready_bytes += item.bytes();
                self.ready.push_back(item);
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                self.ready.push_back(Item::End { partition });
                self.ready_bytes += 16;
            }
            Err(e) => {
                tracing::debug!(error = %e, conn = self.id, "Kafka consumer error; retrying.")
            }
        }
    }

    fn topic(&mut self, name: &str) -> Arc<str> {
        if let Some(t) = self.topics.get(name) {
            return Arc::clone(t);
        }
        let t: Arc<str> = Arc::from(name);
        self.topics.insert(name.to_string(), Arc::clone(&t));
        t
    }

    /// Follows an assignment change (see the session's steps).
    fn follow_assignment(&mut self, starts_tx: &tokio::sync::mpsc::Sender<HashMap<Tp, i64>>) {
        let ctx = self.member.context();
        let generation = ctx.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let assigned = ctx.assigned();
        let current = |t: &str, p: i32| assigned.get(&(t.to_string(), p)).copied();
        let dropped = self.tracker.retain(current);
        let before = self.ready.len();
        self.ready.retain(|item| match item {
            Item::Record { key, epoch, .. } => current(&key.0, key.1) == Some(*epoch),
            Item::End { .. } => true,
        });
        self.ready_bytes = self.ready.iter().map(Item::bytes).sum();
        self.at_end.retain(|tp| assigned.contains_key(tp));
        self.gw.metrics.unacked.sub(dropped as i64);
        let mut parts: Vec<&Tp> = assigned.keys().collect();
        parts.sort();
        tracing::info!(conn = self.id, group = %self.query.group, assigned = ?parts, dropped_in_flight = dropped, dropped_queued = before - self.ready.len(), "Stream assignment changed.");
        if self.paused {
            self.set_paused(true);
        } else {
            self.resume_held(&assigned);
        }
        let need: Vec<Tp> = assigned
            .keys()
            .filter(|tp| !self.starts.contains_key(*tp) && self.ends.contains_key(*tp))
            .cloned()
            .collect();
        if !need.is_empty() && !self.caught_up {
            let (m, tx, start) = (Arc::clone(self.member), starts_tx.clone(), self.query.from);
            tokio::task::spawn_blocking(move || match kafka::starts(&*m, &need, start) {
                Ok(s) => {
                    let _ = tx.blocking_send(s);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "Could not read where partitions start; caught_up waits for records.")
                }
            });
        }
    }

    /// Sends queued records while the in-flight limit allows, then `caught_up` when due.
    async fn send_ready(&mut self, tx: &mut Tx) -> Result<(), End> {
        let max = self.gw.settings.max_unacked;
        let mut out: Vec<Message> = Vec::new();
        let was_idle = self.tracker.inflight() == 0;
        while self.tracker.inflight() < max && out.len() < SEND_BATCH {
            let Some(item) = self.ready.pop_front() else {
                break;
            };
            self.ready_bytes = self.ready_bytes.saturating_sub(item.bytes());
            match item {
                Item::End { partition } => {
                    if let Topics::One(t) = &self.gw.runtime.topics {
                        self.at_end.insert((t.clone(), partition));
                    }
                }
                Item::Record {
                    key,
                    epoch,
                    offset,
                    value,
                } => {
                    let frame = self.frame(&key, offset, value).await;
                    let sent = frame.is_some();
                    if let Some(f) = frame {
                        out.push(Message::Text(f.into()));
                    }
                    self.tracker.handled(&key, epoch, offset, sent);
                }
            }
        }
        let sent = out.len() as u64;
        if !self.caught_up && self.is_caught_up() {
            self.caught_up = true;
            out.push(Message::Text(frames::CAUGHT_UP.into()));
            tracing::info!(conn = self.id, group = %self.query.group, "Stream caught up.");
        }
        if out.is_empty() {
            return Ok(());
        }
        if was_idle && sent > 0 {
            self.last_progress = Instant::now();
        }
        self.gw.metrics.events_sent.inc_by(sent);
        self.gw.metrics.unacked.add(sent as i64);
        self.write(tx, out).await
    }

    /// Writes frames, within `--idle-timeout`.
    async fn write(&mut self, tx: &mut Tx, out: Vec<Message>) -> Result<(), End> {
        let write = async {
            for m in out {
                tx.feed(m).await?;
            }
            tx.flush().await
        };
        match tokio::time::timeout(self.gw.settings.idle_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::ClientGone),
            Err(_) => Err(End::Close(
                Code::SlowClient,
                format!(
                    "the client did not read for {:?}; its partitions are released",
                    self.gw.settings.idle_timeout
                ),
            )),
        }
    }

    /// The event frame of a record, or `None` when it is skipped.
    async fn frame(&mut self, key: &Key, offset: i64, value: Option<Vec<u8>>) -> Option<String> {
        let gw = self.gw;
        let metrics = &gw.metrics;
        let Some(value) = value else {
            metrics.skipped.with_label_values(&["tombstone"]).inc();
            return None;
        };
        let ready = match (codec::is_avro(&value), gw.avro.as_deref()) {
            (true, Some(d)) => match d.unknown_id(&value) {
                Some(id) => {
                    let r = d.ready(id, gw.shutdown.cancelled()).await;
                    // Time spent waiting for the registry is not the client's.
                    self.last_heard = Instant::now();
                    self.last_progress = Instant::now();
                    r
                }
                None => Ok(()),
            },
            _ => Ok(()),
        };
        let decoded = ready.and_then(|()| {
            let (d, avro_json) =
                codec::decode(&value, gw.avro.as_deref()).map_err(|e| e.to_string())?;
            let json = match avro_json {
                Some(j) => j,
                None => value,
            };
            String::from_utf8(json)
                .map(|j| (d, j))
                .map_err(|e| e.to_string())
        });
        match decoded {
            Ok((d, json)) => {
                let source = &d.envelope.source;
                if self.query.tables.matches(&source.schema, &source.table) {
                    Some(frames::event(&key.0, key.1, offset, &json))
                } else {
                    metrics.skipped.with_label_values(&["table"]).inc();
                    None
                }
            }
            Err(e) => {
                metrics.skipped.with_label_values(&["undecodable"]).inc();
                self.undecodable.0 += 1;
                self.undecodable
                    .1
                    .get_or_insert_with(|| format!("{}/{} offset {offset}: {e}", key.0, key.1));
                None
            }
        }
    }

    /// Whether every assigned partition reached the end offset seen at the start, and what
    /// lies before it was sent.
    fn is_caught_up(&self) -> bool {
        if self.ends.is_empty() {
            return true;
        }
        let assigned = self.member.context().assigned();
        if assigned.is_empty() {
            return false;
        }
        let reached = assigned.keys().all(|tp| {
            let Some(&end) = self.ends.get(tp) else {
                return true;
            };
            let at = self
                .tracker
                .next(&tp.0, tp.1)
                .into_iter()
                .chain(self.starts.get(tp).copied())
                .max();
            self.at_end.contains(tp) || at.is_some_and(|at| at >= end)
        });
        reached
            && !self.ready.iter().any(|item| match item {
                Item::Record { key, offset, .. } => self
                    .ends
                    .get(&(key.0.to_string(), key.1))
                    .is_some_and(|end| offset < end),
                Item::End { .. } => false,
            })
    }

    /// Pauses the member while the queue is full, resumes it once half empty (so that the
    /// fetch restarts while there is still something to send).
    fn pace(&mut self) {
        let max = self.gw.runtime.max_queued_bytes;
        if !self.paused && self.ready_bytes >= max {
            self.set_paused(true);
        } else if self.paused && self.ready_bytes < max / 2 {
            self.set_paused(false);
        }
    }

    fn set_paused(&mut self, pause: bool) {
        let Ok(assignment) = self.member.assignment() else {
            return;
        };
        let done = if pause {
            self.member.pause(&assignment)
        } else {
            self.member.resume(&assignment)
        };
        match done {
            Ok(()) => {
                for e in assignment.elements() {
                    let tp = (e.topic().to_string(), e.partition());
                    if pause {
                        self.held.insert(tp);
                    } else {
                        self.held.remove(&tp);
                    }
                }
                self.paused = pause;
                self.member.context().paused(pause);
            }
            Err(e) => {
                tracing::debug!(error = %e, "Could not pause or resume a stream's partitions.")
            }
        }
    }

    /// Resumes the partitions of `assigned` that librdkafka still holds paused from an earlier
    /// assignment (the session is not paused).
    fn resume_held(&mut self, assigned: &HashMap<Tp, u64>) {
        let mut back = TopicPartitionList::new();
        for tp in assigned.keys().filter(|tp| self.held.contains(*tp)) {
            let _ = back.add_partition(&tp.0, tp.1);
        }
        if back.count() == 0 {
            return;
        }
        match self.member.resume(&back) {
            Ok(()) => {
                for e in back.elements() {
                    self.held.remove(&(e.topic().to_string(), e.partition()));
                }
                tracing::debug!(
                    conn = self.id,
                    partitions = back.count(),
                    "Resumed partitions that came back paused."
                );
            }
            Err(e) => {
                tracing::debug!(error = %e, "Could not resume partitions that came back paused.")
            }
        }
    }

    /// Applies a client frame.
    async fn client_frame(&mut self, tx: &mut Tx, text: &str) -> Result<(), End> {
        let ClientFrame::Ack {
            topic,
            partition,
            offset,
        } = frames::parse(text).map_err(|m| End::Close(Code::Malformed, m))?;
        match self.tracker.ack(topic.as_deref(), partition, offset) {
            Ok(acked) => {
                self.errors_in_row = 0;
                self.gw.metrics.acks.inc();
                if let Acked::Freed(n) = acked {
                    self.gw.metrics.unacked.sub(n as i64);
                    if n > 0 {
                        self.last_progress = Instant::now();
                    }
                    self.store();
                }
                Ok(())
            }
            Err(e) => {
                self.errors_in_row += 1;
                if self.errors_in_row > MAX_ERRORS_IN_ROW {
                    return Err(End::Close(
                        Code::TooManyErrors,
                        format!("{MAX_ERRORS_IN_ROW} refused acks in a row"),
                    ));
                }
                let code = match e {
                    AckError::UnknownOffset { .. } => Code::UnknownOffset,
                    AckError::TopicRequired => Code::TopicRequired,
                };
                self.gw
                    .metrics
                    .errors
                    .with_label_values(&[code.as_str()])
                    .inc();
                self.write(
                    tx,
                    vec![Message::Text(frames::error(code, &e.to_string()).into())],
                )
                .await
            }
        }
    }

    /// Hands the offsets that became committable to librdkafka (committed within a second).
    fn store(&mut self) {
        let offsets = self.tracker.committable();
        if offsets.is_empty() {
            return;
        }
        if let Err(e) = self.member.store_offsets(&tpl(&offsets)) {
            tracing::debug!(error = %e, "Could not store a stream's offsets (partition revoked?).");
        }
    }

    /// Every tick: offsets, idle checks, pings, logs and lag.
    async fn housekeeping(&mut self, tx: &mut Tx) -> Result<(), End> {
        self.store();
        let idle = self.gw.settings.idle_timeout;
        if self.last_heard.elapsed() > idle {
            return Err(End::Close(
                Code::IdleTimeout,
                format!("nothing heard from the client for {idle:?} (not even a pong)"),
            ));
        }
        if self.tracker.inflight() > 0 && self.last_progress.elapsed() > idle {
            return Err(End::Close(
                Code::IdleTimeout,
                format!(
                    "no ack for {idle:?} while {} events wait; they will be sent again",
                    self.tracker.inflight()
                ),
            ));
        }
        if self.last_ping.elapsed() > idle / 3 {
            self.last_ping = Instant::now();
            self.write(tx, vec![Message::Ping(Default::default())])
                .await?;
        }
        if let (n @ 1.., Some(first)) = (self.undecodable.0, self.undecodable.1.take()) {
            tracing::warn!(conn = self.id, count = n, first = %first, "Skipped undecodable records (the stream sends only events; the other consumers dead-letter them).");
            self.undecodable.0 = 0;
        }
        self.lag_answered();
        if self.last_lag.elapsed() > lag::INTERVAL {
            self.last_lag = Instant::now();
            self.report_lag();
            // Paused: the statistics' figure is frozen; the broker's end offsets instead.
            if self.paused && self.lag_query.is_none() {
                let m = Arc::clone(self.member);
                self.lag_query = Some(tokio::task::spawn_blocking(move || kafka::refresh_lag(&m)));
            }
        }
        Ok(())
    }

    /// Publishes the member's lag, once known.
    fn report_lag(&self) {
        if let Some(lag) = self.member.context().lag() {
            self.gw
                .metrics
                .report_lag(&self.query.group, self.id, Some(lag));
        }
    }

    /// Takes the outcome of a finished lag query: the new lag is published at once; a failure
    /// keeps the last value (logged once a minute at most, over every connection).
    fn lag_answered(&mut self) {
        let Some(query) = self.lag_query.take_if(|q| q.is_finished()) else {
            return;
        };
        let answer = match query.now_or_never() {
            Some(Ok(answer)) => answer,
            Some(Err(e)) => Err(LagError::Task(e.to_string())),
            None => return,
        };
        match answer {
            Ok(0) => {}
            Ok(_) => self.report_lag(),
            Err(e) => {
                if self.gw.lag_warnings.due() {
                    tracing::warn!(conn = self.id, group = %self.query.group, error = %e, "Could not take a paused stream's lag from the broker; the last value stays.");
                }
            }
        }
    }
}
