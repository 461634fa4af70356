use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::{Notify, Semaphore, TryAcquireError};
use walrelay_common::kafka::{self, QuietContext, Reachability, quiet_log};
use walrelay_common::telemetry::Readiness;

use super::transaction::{self, Progress, TransactionOptions, Transactions, TxnFailure};
use crate::checkpoint::{Checkpointer, TxnId};
use crate::metrics::Metrics;

/// Bytes counted per event beyond its key and value (headers, framing).
const EVENT_OVERHEAD_BYTES: usize = 64;

/// What a record may hold beyond `--max-event-bytes` (the key, record and batch framing): the
/// client's message.max.bytes and the created topics' max.message.bytes are the event limit
/// plus this.
pub const RECORD_MARGIN_BYTES: usize = 64 << 10;

/// Once the budget is spent, a sender waits until this fraction of it (1/8) is free again,
/// not just its own event's bytes: see "A spent budget" in the module essay.
const REFILL_DIVISOR: usize = 8;

/// A failure to hand events to Kafka.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// An event is larger than Kafka (or the buffer) accepts. Definite: it would fail again.
    #[error(
        "an event of {table} is {bytes} bytes, over the limit of {limit} bytes ({which}) and \
         not a row that can be split; raise --max-event-bytes (it sets the client's \
         message.max.bytes and the topics' max.message.bytes walrelay creates; a topic that \
         existed keeps its own) and restart: nothing after it was confirmed"
    )]
    TooLarge {
        /// Table of the event.
        table: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        limit: usize,
        /// Which limit.
        which: &'static str,
    },
    /// Kafka reported a delivery failure.
    #[error("Kafka did not accept an event: {message}")]
    Delivery {
        /// What librdkafka said.
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// The client could not be created or configured.
    #[error("Kafka client: {0}")]
    Client(String),
    /// Another producer with the same transactional id took over (definite: this instance
    /// must not write again; see `kafka::transaction`).
    #[error(
        "fenced: another producer started with transactional id {id:?} and took over ({message}); \
         this one stops so the two never interleave"
    )]
    Fenced {
        /// The transactional id.
        id: String,
        /// What librdkafka said.
        message: String,
    },
    /// A Kafka transaction could not be committed or begun.
    #[error("Kafka transaction: {message}")]
    Transaction {
        /// What librdkafka said, and what happens next.
        message: String,
        /// Whether a new session may succeed.
        transient: bool,
    },
}

impl WriteError {
    /// Whether restarting from the slot may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WriteError::Delivery {
                transient: true,
                ..
            } | WriteError::Transaction {
                transient: true,
                ..
            }
        )
    }

    /// A short label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::TooLarge { .. } => "event_too_large",
            WriteError::Delivery { .. } => "kafka_delivery",
            WriteError::Client(_) => "kafka_client",
            WriteError::Fenced { .. } => "kafka_fenced",
            WriteError::Transaction { .. } => "kafka_transaction",
        }
    }
}

/// Options of the writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// Byte budget of unacknowledged events.
    pub max_buffer_bytes: usize,
    /// Largest event written whole (`--max-event-bytes`).
    pub max_event_bytes: usize,
    /// librdkafka properties given by the user; they win over walrelay's defaults.
    pub properties: BTreeMap<String, String>,
    /// Kafka transactions (`--delivery exactly-once`), or none.
    pub transactions: Option<TransactionOptions>,
}

impl WriterOptions {
    /// The librdkafka configuration: walrelay's defaults, then the user's properties.
    pub fn client_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        let kbytes = self.max_buffer_bytes.div_ceil(1024).max(1) + 64;
        let messages = (self.max_buffer_bytes / EVENT_OVERHEAD_BYTES).clamp(1000, 10_000_000);
        for (k, v) in [
            ("bootstrap.servers", self.brokers.clone()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("compression.type", "lz4".into()),
            ("linger.ms", "5".into()),
            // Never expire: an unreachable broker fills the budget and pauses the slot instead.
            ("message.timeout.ms", "0".into()),
            ("partitioner", "murmur2_random".into()),
            // Sized so librdkafka never refuses what the budget admits.
            ("queue.buffering.max.kbytes", kbytes.to_string()),
            ("queue.buffering.max.messages", messages.to_string()),
            ("client.id", "walrelay-producer".into()),
            ("message.max.bytes", self.record_limit().to_string()),
        ] {
            cfg.set(k, v);
        }
        if let Some(t) = &self.transactions {
            cfg.set("transactional.id", &t.id);
            // The broker's usual ceiling (transaction.max.timeout.ms): a Postgres transaction
            // is never split, so a large one keeps its Kafka transaction open this long at most.
            cfg.set("transaction.timeout.ms", "900000");
        }
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    /// The configuration of a `read_committed` reader with the same connection settings.
    fn reader_config(&self) -> ClientConfig {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            // Only connection and security settings apply to a reader.
            if k.starts_with("security.")
                || k.starts_with("ssl.")
                || k.starts_with("sasl.")
                || k.starts_with("socket.")
                || k == "client.dns.lookup"
            {
                cfg.set(k, v);
            }
        }
        cfg.set("group.id", "walrelay-producer-progress")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("client.id", "walrelay-producer-progress");
        cfg
    }

    /// The client's message.max.bytes and the created topics' max.message.bytes.
    pub fn record_limit(&self) -> usize {
        self.max_event_bytes + RECORD_MARGIN_BYTES
    }

    /// What every topic walrelay creates is created with, beyond unlimited retention.
    pub fn topic_settings(&self) -> [(&'static str, String); 1] {
        [("max.message.bytes", self.record_limit().to_string())]
    }

    fn max_message_bytes(&self) -> usize {
        self.record_limit()
    }
}

/// What travels with an event through librdkafka to its delivery report.
pub struct Token {
    /// The Postgres transaction of the event; `None` for a progress record.
    txn: Option<TxnId>,
    bytes: u32,
    queued: Instant,
}

/// Shared with librdkafka's delivery thread.
pub struct DeliveryContext {
    checkpointer: Arc<Checkpointer>,
    budget: Semaphore,
    metrics: Arc<Metrics>,
    reachability: Reachability,
    failure: Mutex<Option<WriteError>>,
    /// Set once `failure` holds an error: the per-event check is one atomic load.
    has_failed: AtomicBool,
    failed: Notify,
    /// The transactional id under exactly-once (to name it when fenced).
    transactional_id: Option<String>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // A fatal error (a fenced transactional producer) arrives here, not always with a
        // delivery report: the instance is unusable, so the session must end with it.
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            let failure = match &self.transactional_id {
                Some(id) if reason.contains("fenced") => WriteError::Fenced {
                    id: id.clone(),
                    message: reason.to_string(),
                },
                _ => WriteError::Transaction {
                    message: format!("fatal error of the Kafka producer: {reason}"),
                    transient: false,
                },
            };
            self.fail(failure);
            return;
        }
        if self
            .reachability
            .on_error(&error, reason, "events wait in the buffer")
        {
            self.metrics
                .errors
                .with_label_values(&["kafka_unreachable"])
                .inc();
        }
    }
}

impl DeliveryContext {
    /// Records the first failure (a definite one wins over a transient one: a fenced producer's
    /// queued events are purged, and their reports can come before the fatal error) and wakes
    /// whoever waits on it.
    fn fail(&self, failure: WriteError) {
        let mut slot = walrelay_common::sync::lock(&self.failure);
        let replace = match slot.as_ref() {
            None => true,
            Some(old) => old.is_transient() && !failure.is_transient(),
        };
        if replace {
            *slot = Some(failure);
            self.has_failed.store(true, Ordering::Release);
        }
        drop(slot);
        self.failed.notify_waiters();
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Token>;

    fn delivery(&self, result: &DeliveryResult<'_>, token: Box<Token>) {
        self.budget.add_permits(token.bytes as usize);
        self.metrics.buffer_bytes.sub(i64::from(token.bytes));
        match result {
            Ok(_) => {
                self.metrics
                    .delivery_seconds
                    .observe(token.queued.elapsed().as_secs_f64());
                if let Some(txn) = token.txn {
                    self.checkpointer.acked(txn);
                }
                self.reachability.answered();
            }
            Err((error, _)) => {
                let transient = !matches!(
                    error.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::MessageSizeTooLarge
                            | RDKafkaErrorCode::TopicAuthorizationFailed
                            | RDKafkaErrorCode::ClusterAuthorizationFailed
                            | RDKafkaErrorCode::InvalidRecord
                            | RDKafkaErrorCode::UnknownTopicOrPartition
                    )
                );
                self.metrics
                    .errors
                    .with_label_values(&["kafka_delivery"])
                    .inc();
                let fenced = matches!(
                    error.rdkafka_error_code(),
                    Some(
                        RDKafkaErrorCode::Fenced
                            | RDKafkaErrorCode::ProducerFenced
                            | RDKafkaErrorCode::InvalidProducerEpoch
                    )
                );
                self.fail(match &self.transactional_id {
                    Some(id) if fenced => WriteError::Fenced {
                        id: id.clone(),
                        message: error.to_string(),
                    },
                    _ => WriteError::Delivery {
                        message: error.to_string(),
                        transient,
                    },
                });
            }
        }
    }
}

/// Hands events to Kafka within the byte budget.
pub struct Writer {
    producer: ThreadedProducer<DeliveryContext>,
    topic: String,
    capacity: usize,
    /// What a sender waits for once the budget is spent (`capacity / REFILL_DIVISOR`).
    refill: u32,
    max_message_bytes: usize,
    /// Exactly-once state; `None` under at-least-once.
    txns: Option<Transactions>,
    /// The client configuration, for creating topics (`--topic-routing per-table`).
    config: ClientConfig,
    /// `--max-event-bytes`.
    max_event_bytes: usize,
    /// The created topics' settings.
    topic_settings: Vec<(&'static str, String)>,
    /// The event limit of each topic written to (see [`Writer::event_limit`]).
    limits: Mutex<std::collections::HashMap<String, usize>>,
}

impl Writer {
    /// A writer whose acknowledgements feed `checkpointer`.
    pub fn new(
        options: &WriterOptions,
        checkpointer: Arc<Checkpointer>,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> Result<Self, WriteError> {
        let capacity = options.max_buffer_bytes;
        metrics.buffer_capacity_bytes.set(capacity as i64);
        metrics.buffer_bytes.set(0);
        let ctx = DeliveryContext {
            checkpointer,
            budget: Semaphore::new(capacity),
            metrics,
            reachability: Reachability::new(readiness),
            failure: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            failed: Notify::new(),
            transactional_id: options.transactions.as_ref().map(|t| t.id.clone()),
        };
        let producer = options
            .client_config()
            .create_with_context(ctx)
            .map_err(|e| WriteError::Client(e.to_string()))?;
        Ok(Self {
            producer,
            topic: options.topic.clone(),
            capacity,
            refill: u32::try_from(capacity / REFILL_DIVISOR).unwrap_or(u32::MAX),
            max_message_bytes: options.max_message_bytes(),
            txns: options
                .transactions
                .clone()
                .map(|t| Transactions::new(t, options.reader_config())),
            config: options.client_config(),
            max_event_bytes: options.max_event_bytes,
            topic_settings: options.topic_settings().to_vec(),
            limits: Mutex::new(std::collections::HashMap::new()),
        })
    }

    fn ctx(&self) -> &DeliveryContext {
        self.producer.context()
    }

    /// The main topic (`--topic`).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// `--max-event-bytes`.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// The largest event written whole to `topic`: `--max-event-bytes`, or less when the topic
    /// existed with a smaller max.message.bytes (it is read once per topic; a topic whose
    /// configuration cannot be read counts as allowing `--max-event-bytes`, with a warning).
    /// A larger event goes to the chunk topic (see `walrelay_common::oversized`).
    pub async fn event_limit(&self, topic: &str) -> usize {
        if let Some(l) = walrelay_common::sync::lock(&self.limits).get(topic) {
            return *l;
        }
        let limit = match kafka::config_value(
            &self.config,
            kafka::ConfigOf::Topic(topic),
            "max.message.bytes",
        )
        .await
        {
            Ok(Some(v)) => match v.parse::<usize>() {
                Ok(n) if n < self.max_event_bytes + RECORD_MARGIN_BYTES => {
                    let limit = n.saturating_sub(RECORD_MARGIN_BYTES.min(n / 2));
                    tracing::warn!(
                        topic,
                        max_message_bytes = n,
                        max_event_bytes = self.max_event_bytes,
                        "The topic's max.message.bytes is below --max-event-bytes: larger events \
                         go to its .oversized topic in chunks. Raise the topic's \
                         max.message.bytes to keep them whole."
                    );
                    limit
                }
                _ => self.max_event_bytes,
            },
            Ok(None) => self.max_event_bytes,
            Err(e) => {
                tracing::warn!(topic, error = %e, "Could not read the topic's max.message.bytes: assuming --max-event-bytes.");
                self.max_event_bytes
            }
        };
        walrelay_common::sync::lock(&self.limits).insert(topic.to_string(), limit);
        limit
    }

    /// The first delivery failure, if any.
    pub fn failure(&self) -> Option<WriteError> {
        if !self.ctx().has_failed.load(Ordering::Acquire) {
            return None;
        }
        walrelay_common::sync::lock(&self.ctx().failure).clone()
    }

    /// Resolves when a delivery fails.
    pub async fn failed(&self) -> WriteError {
        loop {
            let notified = self.ctx().failed.notified();
            if let Some(f) = self.failure() {
                return f;
            }
            notified.await;
        }
    }

    /// Hands one event to Kafka, waiting while the budget is spent. `table` names the event
    /// in errors. `on_wait` runs every 200 ms of waiting (the listener pushes progress there).
    pub async fn send_to<F: FnMut()>(
        &self,
        table: &str,
        key: &[u8],
        value: &[u8],
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), WriteError> {
        self.send_record(
            &self.topic,
            table,
            (key, value),
            None,
            txn,
            partition,
            on_wait,
        )
        .await
    }

    /// Like [`Writer::send_to`], to `topic` (a table's own topic, `<topic>.schema-changes`).
    /// An empty `key` writes a record without a key.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_routed<F: FnMut()>(
        &self,
        topic: &str,
        table: &str,
        key: &[u8],
        value: &[u8],
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), WriteError> {
        self.send_record(topic, table, (key, value), None, txn, partition, on_wait)
            .await
    }

    /// Creates `topic` with `partitions` unless it exists (unlimited retention, as the main
    /// topic), and returns how many partitions it has.
    pub async fn ensure_topic(
        self: &Arc<Self>,
        topic: &str,
        partitions: i32,
    ) -> Result<i32, WriteError> {
        let settings: Vec<(&str, &str)> = self
            .topic_settings
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        kafka::ensure_topic_with(&self.config, topic, partitions, &settings)
            .await
            .map_err(|e| WriteError::Delivery {
                message: e.to_string(),
                transient: true,
            })?;
        let (this, topic) = (Arc::clone(self), topic.to_string());
        tokio::task::spawn_blocking(move || {
            this.fetch_partitions_of(&topic, Duration::from_secs(10))
        })
        .await
        .map_err(|e| WriteError::Client(format!("reading topic metadata: {e}")))?
    }

    /// Like [`Writer::send_to`], to another topic (`<topic>.transactions`).
    pub async fn send_to_topic<F: FnMut()>(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), WriteError> {
        self.send_record(topic, topic, (key, value), None, txn, partition, on_wait)
            .await
    }

    /// Like [`Writer::send_routed`], with one record header.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_with_header<F: FnMut()>(
        &self,
        topic: &str,
        table: &str,
        (key, value): (&[u8], &[u8]),
        header: (&str, &[u8]),
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), WriteError> {
        self.send_record(
            topic,
            table,
            (key, value),
            Some(header),
            txn,
            partition,
            on_wait,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_record<F: FnMut()>(
        &self,
        topic: &str,
        table: &str,
        (key, value): (&[u8], &[u8]),
        header: Option<(&str, &[u8])>,
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), WriteError> {
        if let Some(f) = self.failure() {
            return Err(f);
        }
        let message_bytes = key.len() + value.len() + header.map_or(0, |(n, v)| n.len() + v.len());
        if message_bytes > self.max_message_bytes {
            return Err(WriteError::TooLarge {
                table: table.to_string(),
                bytes: message_bytes,
                limit: self.max_message_bytes,
                which: "--max-event-bytes + 64KiB: message.max.bytes",
            });
        }
        let bytes = message_bytes + EVENT_OVERHEAD_BYTES;
        if bytes > self.capacity {
            return Err(WriteError::TooLarge {
                table: table.to_string(),
                bytes,
                limit: self.capacity,
                which: "--max-buffer-bytes",
            });
        }
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.reserve(n, on_wait).await?;
        // Under exactly-once, a send holds the gate shared (a commit holds it alone) and opens
        // a Kafka transaction when none is open.
        let _gate = match &self.txns {
            Some(t) => {
                let gate = t.gate.read().await;
                if let Err(e) = self.begin_if_closed(t) {
                    self.ctx().budget.add_permits(n as usize);
                    return Err(e);
                }
                Some(gate)
            }
            None => None,
        };
        self.ctx().metrics.buffer_bytes.add(i64::from(n));
        let mut token = Box::new(Token {
            txn: Some(txn),
            bytes: n,
            queued: Instant::now(),
        });
        loop {
            let mut record = BaseRecord::with_opaque_to(topic, token).payload(value);
            if !key.is_empty() {
                record = record.key(key);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some((name, v)) = header {
                record = record.headers(rdkafka::message::OwnedHeaders::new().insert(
                    rdkafka::message::Header {
                        key: name,
                        value: Some(v),
                    },
                ));
            }
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    token = rec.delivery_opaque;
                    on_wait();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, rec)) => {
                    let bytes = rec.delivery_opaque.bytes;
                    self.ctx().budget.add_permits(bytes as usize);
                    self.ctx().metrics.buffer_bytes.sub(i64::from(bytes));
                    return Err(match e.rdkafka_error_code() {
                        Some(
                            RDKafkaErrorCode::Fenced
                            | RDKafkaErrorCode::ProducerFenced
                            | RDKafkaErrorCode::InvalidProducerEpoch,
                        ) if self.txns.is_some() => WriteError::Fenced {
                            id: self.ctx().transactional_id.clone().unwrap_or_default(),
                            message: e.to_string(),
                        },
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => WriteError::TooLarge {
                            table: table.to_string(),
                            bytes: message_bytes,
                            limit: self.max_message_bytes,
                            which: "--max-event-bytes + 64KiB: message.max.bytes",
                        },
                        _ => WriteError::Delivery {
                            message: e.to_string(),
                            transient: true,
                        },
                    });
                }
            }
        }
    }

    /// Takes `n` bytes of the budget. While it is spent, waits until a refill (`n`, and at
    /// least 1/8 of the budget) is free, takes it and gives back what this event does not use:
    /// the next events then find their bytes without waiting. `on_wait` runs every 200 ms of
    /// waiting.
    async fn reserve<F: FnMut()>(&self, n: u32, on_wait: &mut F) -> Result<(), WriteError> {
        let budget = &self.ctx().budget;
        match budget.try_acquire_many(n) {
            Ok(permit) => {
                permit.forget();
                return Ok(());
            }
            Err(TryAcquireError::Closed) => return Err(WriteError::Client("budget closed".into())),
            Err(TryAcquireError::NoPermits) => {}
        }
        // n <= capacity (checked by the caller) and refill <= capacity, so this can be met.
        let want = n.max(self.refill);
        loop {
            match tokio::time::timeout(Duration::from_millis(200), budget.acquire_many(want)).await
            {
                Ok(Ok(permit)) => {
                    permit.forget();
                    budget.add_permits((want - n) as usize);
                    return Ok(());
                }
                Ok(Err(_)) => return Err(WriteError::Client("budget closed".into())),
                Err(_) => {
                    on_wait();
                    if let Some(f) = self.failure() {
                        return Err(f);
                    }
                }
            }
        }
    }

    /// Number of partitions of the topic.
    ///
    /// Asks twice. librdkafka retires the bootstrap connection once the first answer names the
    /// brokers, and its idempotent producer looks for a connected broker to get its producer
    /// id only at such answers and on a 500 ms retry timer; nothing is sent before it has one.
    /// The second request goes over the new connection, and its answer lets the producer id be
    /// acquired at once instead of half a second into the stream (which used to fill the
    /// budget at every start).
    /// Runs on a blocking thread: the runtime is a single thread (see the crate's `main`).
    pub async fn partitions(self: &Arc<Self>, timeout: Duration) -> Result<i32, WriteError> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.fetch_partitions(timeout))
            .await
            .map_err(|e| WriteError::Client(format!("reading topic metadata: {e}")))?
    }

    fn fetch_partitions(&self, timeout: Duration) -> Result<i32, WriteError> {
        self.fetch_partitions_of(&self.topic, timeout)
    }

    fn fetch_partitions_of(&self, topic: &str, timeout: Duration) -> Result<i32, WriteError> {
        let fetch = || {
            self.producer
                .client()
                .fetch_metadata(Some(topic), timeout)
                .map_err(|e| WriteError::Delivery {
                    message: format!("reading metadata of topic {topic}: {e}"),
                    transient: true,
                })
        };
        let first = fetch()?;
        let md = fetch().unwrap_or(first);
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        if n == 0 {
            return Err(WriteError::Delivery {
                message: format!("topic {topic} has no partitions yet"),
                transient: true,
            });
        }
        Ok(i32::try_from(n).unwrap_or(i32::MAX))
    }

    /// Whether events go through Kafka transactions (`--delivery exactly-once`).
    pub fn exactly_once(&self) -> bool {
        self.txns.is_some()
    }

    /// Under exactly-once, for the Postgres transactions Kafka already holds (at or below the
    /// progress read back at start): events handed over while muted are not written.
    pub fn set_muted(&self, muted: bool) {
        if let Some(t) = &self.txns {
            t.muted.store(muted, Ordering::Relaxed);
        }
    }

    /// Whether events are currently not written (see [`Writer::set_muted`]).
    pub fn is_muted(&self) -> bool {
        self.txns
            .as_ref()
            .is_some_and(|t| t.muted.load(Ordering::Relaxed))
    }

    fn txn_error(&self, e: &KafkaError, doing: &str) -> WriteError {
        let id = self
            .txns
            .as_ref()
            .map(|t| t.options.id.clone())
            .unwrap_or_default();
        match transaction::classify(e) {
            TxnFailure::Fenced(message) => WriteError::Fenced { id, message },
            TxnFailure::Fatal(m) => WriteError::Transaction {
                message: format!("{doing}: {m} (fatal for this producer instance)"),
                transient: false,
            },
            TxnFailure::Abort(m) | TxnFailure::Retry(m) => WriteError::Transaction {
                message: format!("{doing}: {m}"),
                transient: true,
            },
        }
    }

    fn begin_if_closed(&self, t: &Transactions) -> Result<(), WriteError> {
        if t.is_open.load(Ordering::Acquire) {
            return Ok(());
        }
        self.producer
            .begin_transaction()
            .map_err(|e| self.txn_error(&e, "beginning a Kafka transaction"))?;
        walrelay_common::sync::lock(&t.open).opened_at = Some(Instant::now());
        t.is_open.store(true, Ordering::Release);
        Ok(())
    }

    /// Under exactly-once: registers this producer with the transaction coordinator (fencing
    /// any earlier instance with the same transactional id and settling its open transaction),
    /// then reads back the last committed progress of `slot`'s `incarnation`. Returns the end
    /// LSN Kafka already holds (transactions at or below it must not be written again), or 0.
    /// Once per writer: librdkafka refuses a second `init_transactions`.
    pub async fn start_transactions(
        self: &Arc<Self>,
        slot: &str,
        incarnation: &str,
    ) -> Result<u64, WriteError> {
        let Some(t) = &self.txns else {
            return Ok(0);
        };
        *walrelay_common::sync::lock(&t.identity) = (slot.to_string(), incarnation.to_string());
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.start_transactions_blocking())
            .await
            .map_err(|e| WriteError::Client(format!("starting transactions: {e}")))?
    }

    fn start_transactions_blocking(&self) -> Result<u64, WriteError> {
        let Some(t) = &self.txns else {
            return Ok(0);
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.producer.init_transactions(Duration::from_secs(15)) {
                Ok(()) => break,
                Err(e) => {
                    let err = self.txn_error(&e, "registering the transactional id");
                    if !err.is_transient() || Instant::now() >= deadline {
                        return Err(err);
                    }
                    tracing::warn!(error = %err, "Kafka transactions not ready yet; retrying.");
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        let (slot, incarnation) = walrelay_common::sync::lock(&t.identity).clone();
        let progress = transaction::read_progress(
            &t.reader_config,
            &t.options.progress_topic,
            &t.options.id,
            Duration::from_secs(30),
        )?;
        let lsn = match progress {
            Some(p) if p.slot == slot && p.incarnation == incarnation => p.commit_lsn,
            Some(p) => {
                tracing::info!(recorded_slot = %p.slot, recorded_incarnation = %p.incarnation, %incarnation,
                    "The progress recorded in Kafka is of another slot or incarnation; starting from the slot's position.");
                0
            }
            None => 0,
        };
        t.committed_lsn.store(lsn, Ordering::Release);
        Ok(lsn)
    }

    /// A whole Postgres transaction ending at `end_lsn` was handed over: under exactly-once,
    /// the open Kafka transaction (if any) may now commit up to it.
    pub fn transaction_ended(&self, end_lsn: u64) {
        if let Some(t) = &self.txns
            && t.is_open.load(Ordering::Acquire)
        {
            walrelay_common::sync::lock(&t.open).last_lsn = end_lsn;
        }
    }

    /// Whether a Kafka transaction is open (under exactly-once).
    pub fn transaction_open(&self) -> bool {
        self.txns
            .as_ref()
            .is_some_and(|t| t.is_open.load(Ordering::Acquire))
    }

    /// When the open Kafka transaction should commit, if one is open.
    pub fn commit_due(&self) -> Option<Instant> {
        let t = self.txns.as_ref()?;
        if !t.is_open.load(Ordering::Acquire) {
            return None;
        }
        let open = walrelay_common::sync::lock(&t.open);
        open.opened_at.map(|at| at + t.options.interval)
    }

    /// The position that may be confirmed to Postgres, given the checkpointer's.
    pub fn confirmable(&self, acked: u64) -> u64 {
        match &self.txns {
            Some(t) => t.confirmable(acked),
            None => acked,
        }
    }

    /// Commits the open Kafka transaction, with a progress record when it holds whole Postgres
    /// transactions. The caller makes sure no Postgres transaction is half in it (the listener
    /// commits between transactions; the snapshot holds none). Retries what librdkafka says
    /// may be retried (a broker away); a transaction that must be aborted is, and the session
    /// restarts from the slot (transient); fenced is definite.
    pub async fn commit(self: &Arc<Self>) -> Result<(), WriteError> {
        let Some(t) = &self.txns else {
            return Ok(());
        };
        let _gate = t.gate.write().await;
        if !t.is_open.load(Ordering::Acquire) {
            return Ok(());
        }
        let last_lsn = walrelay_common::sync::lock(&t.open).last_lsn;
        if last_lsn > t.committed_lsn.load(Ordering::Acquire) {
            let (slot, incarnation) = walrelay_common::sync::lock(&t.identity).clone();
            let record = Progress {
                slot,
                incarnation,
                commit_lsn: last_lsn,
            };
            let value = serde_json::to_vec(&record)
                .map_err(|e| WriteError::Client(format!("encoding progress: {e}")))?;
            self.send_progress(&t.options.progress_topic, t.options.id.as_bytes(), &value)
                .await?;
        }
        let started = Instant::now();
        // The events are flushed here first: rdkafka's commit_transaction flushes by polling
        // the event queue in 100 ms waits, which the delivery-report thread of the threaded
        // producer empties first, so every commit took ~100 ms. With nothing outstanding,
        // its flush returns at once and the commit is one round trip to the coordinator.
        while self.producer.flush(Duration::ZERO).is_err() {
            if let Some(f) = self.failure() {
                let err = f.clone();
                self.abort_locked(t).await;
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        loop {
            let this = Arc::clone(self);
            let result = tokio::task::spawn_blocking(move || {
                this.producer.commit_transaction(Duration::from_secs(30))
            })
            .await
            .map_err(|e| WriteError::Client(format!("committing: {e}")))?;
            match result {
                Ok(()) => break,
                Err(e) => match transaction::classify(&e) {
                    TxnFailure::Retry(m) => {
                        tracing::warn!(error = %m, "Kafka transaction commit not done yet; retrying.");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    TxnFailure::Abort(_) => {
                        let err = self.txn_error(&e, "committing a Kafka transaction");
                        self.abort_locked(t).await;
                        return Err(err);
                    }
                    TxnFailure::Fenced(_) | TxnFailure::Fatal(_) => {
                        return Err(self.txn_error(&e, "committing a Kafka transaction"));
                    }
                },
            }
        }
        let metrics = &self.ctx().metrics;
        metrics
            .kafka_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics
            .kafka_transactions
            .with_label_values(&["committed"])
            .inc();
        *walrelay_common::sync::lock(&t.open) = transaction::Open::default();
        if last_lsn > 0 {
            t.committed_lsn.fetch_max(last_lsn, Ordering::AcqRel);
        }
        t.is_open.store(false, Ordering::Release);
        Ok(())
    }

    /// Aborts the open Kafka transaction (at a stop inside a Postgres transaction): nothing of
    /// it becomes visible, and the slot sends it again next time.
    pub async fn abort(self: &Arc<Self>) {
        if let Some(t) = &self.txns {
            let _gate = t.gate.write().await;
            self.abort_locked(t).await;
        }
    }

    async fn abort_locked(self: &Arc<Self>, t: &Transactions) {
        if !t.is_open.load(Ordering::Acquire) {
            return;
        }
        let this = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || {
            this.producer.abort_transaction(Duration::from_secs(30))
        })
        .await;
        match result {
            Ok(Ok(())) => tracing::info!("Aborted the open Kafka transaction."),
            Ok(Err(e)) => {
                let err = self.txn_error(&e, "aborting a Kafka transaction");
                if matches!(err, WriteError::Fenced { .. }) {
                    self.ctx().fail(err);
                } else {
                    tracing::warn!(error = %err, "Aborting the Kafka transaction failed; the next instance's start aborts it.");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Aborting the Kafka transaction failed."),
        }
        self.ctx()
            .metrics
            .kafka_transactions
            .with_label_values(&["aborted"])
            .inc();
        *walrelay_common::sync::lock(&t.open) = transaction::Open::default();
        t.is_open.store(false, Ordering::Release);
    }

    /// The progress record, inside the open transaction (the gate is held alone).
    async fn send_progress(&self, topic: &str, key: &[u8], value: &[u8]) -> Result<(), WriteError> {
        let mut token = Box::new(Token {
            txn: None,
            bytes: 0,
            queued: Instant::now(),
        });
        loop {
            let record = BaseRecord::with_opaque_to(topic, token)
                .key(key)
                .payload(value)
                .partition(0);
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), rec)) => {
                    token = rec.delivery_opaque;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(WriteError::Delivery {
                        message: format!("writing progress to {topic}: {e}"),
                        transient: true,
                    });
                }
            }
        }
    }

    /// Events handed over and not yet reported.
    pub fn in_flight(&self) -> i32 {
        self.producer.in_flight_count()
    }

    /// Waits up to `timeout` for every event to be reported, without blocking the runtime:
    /// each round asks librdkafka to send what lingers (a zero-timeout flush) and sleeps.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.producer.flush(Duration::ZERO).is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Creates the topic with `partitions` if it does not exist (unlimited retention, so
/// consumers can replay from offset zero); an existing topic is used as it is.
pub async fn ensure_topic(options: &WriterOptions, partitions: i32) -> Result<(), WriteError> {
    let settings = options.topic_settings();
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    kafka::ensure_topic_with(
        &options.client_config(),
        &options.topic,
        partitions,
        &settings,
    )
    .await
    .map_err(|e| WriteError::Delivery {
        message: e.to_string(),
        transient: true,
    })
}

/// Creates `topic` with one partition if it does not exist (`<topic>.transactions`).
pub async fn ensure_single_partition_topic(
    options: &WriterOptions,
    topic: &str,
) -> Result<(), WriteError> {
    let settings = options.topic_settings();
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    kafka::ensure_topic_with(&options.client_config(), topic, 1, &settings)
        .await
        .map_err(|e| WriteError::Delivery {
            message: e.to_string(),
            transient: true,
        })
}

/// Creates the compacted progress topic of exactly-once delivery if it does not exist.
pub async fn ensure_progress_topic(options: &WriterOptions) -> Result<(), WriteError> {
    let Some(t) = &options.transactions else {
        return Ok(());
    };
    kafka::ensure_topic_with(
        &options.client_config(),
        &t.progress_topic,
        1,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", &options.record_limit().to_string()),
        ],
    )
    .await
    .map_err(|e| WriteError::Delivery {
        message: e.to_string(),
        transient: true,
    })
}

/// Whether the brokers answer a metadata request within `timeout`.
pub fn broker_reachable(options: &WriterOptions, timeout: Duration) -> Result<Vec<i32>, String> {
    let producer: ThreadedProducer<QuietContext> = options
        .client_config()
        .create_with_context(QuietContext)
        .map_err(|e| e.to_string())?;
    let md = producer
        .client()
        .fetch_metadata(None, timeout)
        .map_err(|e| e.to_string())?;
    Ok(md.brokers().iter().map(|b| b.id()).collect())
}
