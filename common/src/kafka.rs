//! Kafka plumbing every binary needs: a client context that keeps librdkafka's connection
//! chatter at `debug`, and topic creation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryResult, ProducerContext};

use crate::telemetry::Readiness;

/// The one way walrelay builds a librdkafka client: its `defaults` for that client, then the
/// user's properties (`--kafka-property`, checked by [`crate::options::kafka_properties`]) on
/// top, so security settings (`security.protocol`, `sasl.*`, `ssl.*`) reach every client of
/// every binary.
pub fn client_config<'a>(
    defaults: impl IntoIterator<Item = (&'a str, String)>,
    properties: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    for (k, v) in defaults {
        cfg.set(k, v);
    }
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg
}

/// librdkafka logs every failed connection attempt; while a broker is away that is many lines
/// a second. Its own lines go to `debug` (critical ones to `error`); the binaries log state
/// changes once themselves.
pub fn quiet_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", fac, message)
        }
        _ => tracing::debug!(target: "librdkafka", fac, message),
    }
}

/// Whether the brokers answer, as seen by a client context: the `kafka` readiness condition,
/// with one log line per change instead of one per failed connection.
pub struct Reachability {
    up: AtomicBool,
    readiness: Readiness,
}

impl Reachability {
    /// Starts as reachable; `readiness` gets the `kafka` condition.
    pub fn new(readiness: Readiness) -> Self {
        Self {
            up: AtomicBool::new(true),
            readiness,
        }
    }

    /// Feeds a client error; returns true when it says every broker is down.
    pub fn on_error(&self, error: &KafkaError, reason: &str, consequence: &str) -> bool {
        if !matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            tracing::debug!(%error, reason, "Kafka client error.");
            return false;
        }
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(reason, "Kafka is unreachable; {consequence}.");
        }
        self.readiness.set("kafka", false);
        true
    }

    /// A broker answered (a delivery report, a fetched message).
    pub fn answered(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::info!("Kafka answers again.");
            self.readiness.set("kafka", true);
        }
    }
}

/// Context of short-lived clients (topic creation, metadata and offset queries).
pub struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        quiet_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka client error.");
    }

    // librdkafka's statistics (when `statistics.interval.ms` is set) are not for the log; the
    // default implementation prints each one as an INFO line.
    fn stats(&self, _: rdkafka::Statistics) {}
}

impl ProducerContext for QuietContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

impl ConsumerContext for QuietContext {}

/// A failure to create a topic. Always worth a retry: the broker may be starting.
#[derive(Debug, Clone, thiserror::Error)]
#[error("topic {topic}: {message}")]
pub struct TopicError {
    /// The topic.
    pub topic: String,
    /// What went wrong.
    pub message: String,
}

/// Creates `topic` with `partitions` if it does not exist, with unlimited retention (so
/// consumers can replay it from offset zero); an existing topic is used as it is.
pub async fn ensure_topic(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
) -> Result<(), TopicError> {
    ensure_topic_with(config, topic, partitions, &[]).await
}

/// Which configuration to read with [`config_value`].
#[derive(Debug, Clone, Copy)]
pub enum ConfigOf<'a> {
    /// A topic's (its own setting, else the broker's default for it).
    Topic(&'a str),
    /// A broker's, by node id.
    Broker(i32),
}

/// The effective value of configuration `name` of a topic or broker (`None` when the broker
/// does not report it, e.g. without DescribeConfigs permission: callers fall back to their own
/// assumption and say so).
pub async fn config_value(
    config: &ClientConfig,
    of: ConfigOf<'_>,
    name: &str,
) -> Result<Option<String>, TopicError> {
    use rdkafka::admin::ResourceSpecifier;
    let label = match of {
        ConfigOf::Topic(t) => t.to_string(),
        ConfigOf::Broker(id) => format!("broker {id}"),
    };
    let fail = |message: String| TopicError {
        topic: label.clone(),
        message,
    };
    let admin: AdminClient<QuietContext> = config
        .create_with_context(QuietContext)
        .map_err(|e| fail(e.to_string()))?;
    let spec = match of {
        ConfigOf::Topic(t) => ResourceSpecifier::Topic(t),
        ConfigOf::Broker(id) => ResourceSpecifier::Broker(id),
    };
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs([&spec], &opts)
        .await
        .map_err(|e| fail(format!("describing its configuration: {e}")))?;
    match results.into_iter().next() {
        Some(Ok(resource)) => Ok(resource.get(name).and_then(|entry| entry.value.clone())),
        Some(Err(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ))
        | None => Ok(None),
        Some(Err(code)) => Err(fail(format!("describing its configuration: {code}"))),
    }
}

/// [`ensure_topic`] with topic settings beyond unlimited retention (a compacted topic, say).
pub async fn ensure_topic_with(
    config: &ClientConfig,
    topic: &str,
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<(), TopicError> {
    let fail = |message: String| TopicError {
        topic: topic.to_string(),
        message,
    };
    let admin: AdminClient<QuietContext> = config
        .create_with_context(QuietContext)
        .map_err(|e| fail(e.to_string()))?;
    // A metadata request blocks its thread: keep it off the runtime's (which may be the only one).
    let lookup = {
        let (config, topic) = (config.clone(), topic.to_string());
        tokio::task::spawn_blocking(move || {
            let client: AdminClient<QuietContext> = config
                .create_with_context(QuietContext)
                .map_err(|e| e.to_string())?;
            let existing = client
                .inner()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| format!("reading metadata: {e}"))?;
            Ok::<bool, String>(
                existing
                    .topics()
                    .first()
                    .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()),
            )
        })
    };
    let exists = lookup
        .await
        .map_err(|e| fail(format!("reading metadata: {e}")))?
        .map_err(fail)?;
    if exists {
        return Ok(());
    }
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("retention.ms", "-1")
        .set("retention.bytes", "-1");
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| fail(format!("creating: {e}")))?;
    for r in results {
        match r {
            Ok(_) => tracing::info!(topic, partitions, "Created the topic."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(fail(format!("creating: {code}"))),
        }
    }
    Ok(())
}
