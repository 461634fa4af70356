//! The dead-letter topic: events a sink rejected definitively, or that could not be decoded,
//! copied byte for byte with their origin and the error in headers.
//!
//! Headers: `walrelay.dlq.topic`, `walrelay.dlq.partition`, `walrelay.dlq.offset` (where the
//! event was: with `--topic-pattern`, the topic each event was read from), `walrelay.dlq.reason` (`decode` or `rejected`), `walrelay.dlq.error` (why),
//! `walrelay.dlq.sink` and `walrelay.dlq.group`. Nothing is skipped silently: the batch's
//! offsets are stored only after the dead-letter topic acknowledged every copy.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;
use walrelay_common::kafka::{self, QuietContext};
use walrelay_common::retry::Backoff;

use crate::config::RuntimeSettings;

/// A failure to dead-letter an event.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The producer could not be created. Definite.
    #[error("dead-letter producer: {0}")]
    Client(String),
    /// Kafka refused the copy for good (too large, not authorised). Definite: stopping is the
    /// only way not to lose the event.
    #[error(
        "dead-letter topic {topic} refused an event from {source_topic}/{partition} offset {offset}: {message}"
    )]
    Refused {
        /// Dead-letter topic.
        topic: String,
        /// Topic of the original.
        source_topic: String,
        /// Partition of the original.
        partition: i32,
        /// Offset of the original.
        offset: i64,
        /// What Kafka said.
        message: String,
    },
    /// Shutdown came while retrying; the batch is not committed.
    #[error("interrupted while writing dead letters")]
    Interrupted,
    /// Shutdown came before the dead-letter topic could be created or found (Kafka
    /// unreachable since the start); nothing was read.
    #[error(
        "interrupted before the dead-letter topic was ready (Kafka unreachable since the start)"
    )]
    NotReady,
}

/// One event to dead-letter.
pub struct DeadLetter<'a> {
    /// Topic of the original.
    pub topic: &'a str,
    /// Partition of the original.
    pub partition: i32,
    /// Offset of the original.
    pub offset: i64,
    /// Key of the original.
    pub key: Option<&'a [u8]>,
    /// Value of the original, unchanged.
    pub payload: &'a [u8],
    /// `decode` or `rejected`.
    pub reason: &'static str,
    /// Why.
    pub message: String,
    /// The sink that rejected it.
    pub sink: &'static str,
    /// More headers.
    pub headers: Vec<(&'static str, String)>,
}

/// Writes dead letters.
pub struct DeadLetters {
    producer: FutureProducer<QuietContext>,
    topic: String,
    group: String,
}

impl DeadLetters {
    /// A producer for the dead-letter topic, which is created when missing.
    ///
    /// Kafka may be unreachable when the consumer starts (a rolling restart of the cluster, a
    /// network blackout): creating the topic is retried with the shared backoff (1 s doubling
    /// to 30 s, a warning per attempt) until it succeeds or `shutdown` fires. Giving up after a
    /// few attempts would turn an outage the rest of the consumer rides out into an exit.
    pub async fn new(
        settings: &RuntimeSettings,
        group: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, DeadLetterError> {
        let cfg = kafka::client_config(
            [
                ("bootstrap.servers", settings.kafka_brokers.clone()),
                ("client.id", "walrelay-consumer-dlq".into()),
                ("enable.idempotence", "true".into()),
                ("acks", "all".into()),
                ("message.timeout.ms", "30000".into()),
            ],
            &settings.kafka_properties,
        );
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let mut attempts = 0u32;
        loop {
            let created = tokio::select! {
                () = shutdown.cancelled() => return Err(DeadLetterError::NotReady),
                r = kafka::ensure_topic(&cfg, &settings.dead_letter_topic, 1) => r,
            };
            match created {
                Ok(()) => break,
                Err(e) => {
                    attempts += 1;
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        error = %e,
                        attempts,
                        retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                        "Could not create or find the dead-letter topic (is Kafka reachable?); retrying until it is, or until a shutdown."
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(DeadLetterError::NotReady),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let producer = cfg
            .create_with_context(QuietContext)
            .map_err(|e| DeadLetterError::Client(e.to_string()))?;
        Ok(Self {
            producer,
            topic: settings.dead_letter_topic.clone(),
            group: group.to_string(),
        })
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes every letter and waits for Kafka's acknowledgements, retrying transient
    /// failures until `shutdown`. The letters are handed to the producer in order, all at once
    /// (a batch's letters are in memory already), and their acknowledgements awaited together:
    /// a batch that dead-letters every event for a parked webhook subscription takes one round
    /// trip, not one per letter.
    pub async fn send(
        &self,
        letters: &[DeadLetter<'_>],
        shutdown: &CancellationToken,
    ) -> Result<(), DeadLetterError> {
        let sent =
            futures_util::future::join_all(letters.iter().map(|l| self.send_one(l, shutdown)))
                .await;
        sent.into_iter().collect()
    }

    /// Writes one letter and waits for its acknowledgement, retrying transient failures.
    async fn send_one(
        &self,
        letter: &DeadLetter<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), DeadLetterError> {
        {
            let partition = letter.partition.to_string();
            let offset = letter.offset.to_string();
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "walrelay.dlq.topic",
                        value: Some(letter.topic),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.partition",
                        value: Some(&partition),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.offset",
                        value: Some(&offset),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.reason",
                        value: Some(letter.reason),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.error",
                        value: Some(&letter.message),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.sink",
                        value: Some(letter.sink),
                    })
                    .insert(Header {
                        key: "walrelay.dlq.group",
                        value: Some(&self.group),
                    });
                let headers = letter.headers.iter().fold(headers, |h, (k, v)| {
                    h.insert(Header {
                        key: k,
                        value: Some(v.as_str()),
                    })
                });
                let mut record = FutureRecord::to(&self.topic)
                    .payload(letter.payload)
                    .headers(headers);
                if let Some(k) = letter.key {
                    record = record.key(k);
                }
                let sent = tokio::select! {
                    () = shutdown.cancelled() => return Err(DeadLetterError::Interrupted),
                    r = self.producer.send(record, Timeout::After(Duration::from_secs(30))) => r,
                };
                match sent {
                    Ok(_) => break,
                    Err((e, _)) => {
                        use rdkafka::error::RDKafkaErrorCode as C;
                        let definite = matches!(
                            e.rdkafka_error_code(),
                            Some(
                                C::MessageSizeTooLarge
                                    | C::TopicAuthorizationFailed
                                    | C::ClusterAuthorizationFailed
                                    | C::InvalidRecord
                            )
                        );
                        if definite {
                            return Err(DeadLetterError::Refused {
                                topic: self.topic.clone(),
                                source_topic: letter.topic.to_string(),
                                partition: letter.partition,
                                offset: letter.offset,
                                message: e.to_string(),
                            });
                        }
                        tracing::warn!(error = %e, "Dead-letter write failed; retrying.");
                        tokio::select! {
                            () = shutdown.cancelled() => return Err(DeadLetterError::Interrupted),
                            () = tokio::time::sleep(backoff.next_wait()) => {}
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
