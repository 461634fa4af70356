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

use crate::checkpoint::{Checkpointer, TxnId};
use crate::metrics::Metrics;

/// Bytes counted per event beyond its key and value (headers, framing).
const EVENT_OVERHEAD_BYTES: usize = 64;

/// Once the budget is spent, a sender waits until this fraction of it (1/8) is free again,
/// not just its own event's bytes: see "A spent budget" in the module essay.
const REFILL_DIVISOR: usize = 8;

/// A failure to hand events to Kafka.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// An event is larger than Kafka (or the buffer) accepts. Definite: it would fail again.
    #[error(
        "an event of {table} is {bytes} bytes, over the limit of {limit} bytes ({which}); \
         raise it (kafka property message.max.bytes and the topic's max.message.bytes, or \
         --max-buffer-bytes) and restart: nothing after it was confirmed"
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
}

impl WriteError {
    /// Whether restarting from the slot may help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            WriteError::Delivery {
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
    /// librdkafka properties given by the user; they win over walrelay's defaults.
    pub properties: BTreeMap<String, String>,
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
        ] {
            cfg.set(k, v);
        }
        for (k, v) in &self.properties {
            cfg.set(k, v);
        }
        cfg
    }

    fn max_message_bytes(&self) -> usize {
        self.properties
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    }
}

/// What travels with an event through librdkafka to its delivery report.
pub struct Token {
    txn: TxnId,
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
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
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
                self.checkpointer.acked(token.txn);
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
                let mut failure = walrelay_common::sync::lock(&self.failure);
                if failure.is_none() {
                    *failure = Some(WriteError::Delivery {
                        message: error.to_string(),
                        transient,
                    });
                    self.has_failed.store(true, Ordering::Release);
                }
                drop(failure);
                self.failed.notify_waiters();
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
        })
    }

    fn ctx(&self) -> &DeliveryContext {
        self.producer.context()
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
        if let Some(f) = self.failure() {
            return Err(f);
        }
        let message_bytes = key.len() + value.len();
        if message_bytes > self.max_message_bytes {
            return Err(WriteError::TooLarge {
                table: table.to_string(),
                bytes: message_bytes,
                limit: self.max_message_bytes,
                which: "message.max.bytes",
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
        self.ctx().metrics.buffer_bytes.add(i64::from(n));
        let mut token = Box::new(Token {
            txn,
            bytes: n,
            queued: Instant::now(),
        });
        loop {
            let mut record = BaseRecord::with_opaque_to(&self.topic, token)
                .key(key)
                .payload(value);
            if let Some(p) = partition {
                record = record.partition(p);
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
                        Some(RDKafkaErrorCode::MessageSizeTooLarge) => WriteError::TooLarge {
                            table: table.to_string(),
                            bytes: message_bytes,
                            limit: self.max_message_bytes,
                            which: "message.max.bytes",
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
        let fetch = || {
            self.producer
                .client()
                .fetch_metadata(Some(&self.topic), timeout)
                .map_err(|e| WriteError::Delivery {
                    message: format!("reading metadata of topic {}: {e}", self.topic),
                    transient: true,
                })
        };
        let first = fetch()?;
        let md = fetch().unwrap_or(first);
        let n = md.topics().first().map_or(0, |t| t.partitions().len());
        if n == 0 {
            return Err(WriteError::Delivery {
                message: format!("topic {} has no partitions yet", self.topic),
                transient: true,
            });
        }
        Ok(i32::try_from(n).unwrap_or(i32::MAX))
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
    kafka::ensure_topic(&options.client_config(), &options.topic, partitions)
        .await
        .map_err(|e| WriteError::Delivery {
            message: e.to_string(),
            transient: true,
        })
}

/// Whether the brokers answer a metadata request within `timeout`.
pub fn broker_reachable(options: &WriterOptions, timeout: Duration) -> Result<usize, String> {
    let producer: ThreadedProducer<QuietContext> = options
        .client_config()
        .create_with_context(QuietContext)
        .map_err(|e| e.to_string())?;
    let md = producer
        .client()
        .fetch_metadata(None, timeout)
        .map_err(|e| e.to_string())?;
    Ok(md.brokers().len())
}
