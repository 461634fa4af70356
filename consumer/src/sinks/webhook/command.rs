//! The webhook sink's two commands: `notify` and `replay-dead-letters`.
//!
//! `notify` loads the subscriptions, keeps them fresh, serves the subscriptions API and runs
//! the webhook sink on the shared runtime until stopped. `replay-dead-letters` reads the
//! dead-letter topic in its own group up to the end it saw at start, delivers each webhook
//! dead letter again to the subscription its `walrelay.dlq.subscription` header names (same
//! `webhook-id` as before), commits what it delivered, and exits; it stops at the first
//! letter that fails again, so a rerun resumes there.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use walrelay_common::retry::Backoff;
use walrelay_common::telemetry::Readiness;

use super::api::{self, Api};
use super::config::WebhookSettings;
use super::server;
use super::sink::{WebhookSink, redeliver};
use super::subscriptions::{Store, StoreError};
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError, consumer_config};

/// Why the notifier stopped.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The API could not listen, or the HTTP client could not be built.
    #[error("{0}")]
    Setup(String),
    /// The subscriptions database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The runtime stopped.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Kafka (replay).
    #[error("Kafka: {0}")]
    Kafka(String),
    /// A dead letter failed again (replay); a rerun resumes at it.
    #[error("dead letter at offset {offset} failed again: {message}")]
    Redelivery {
        /// Its offset in the dead-letter topic.
        offset: i64,
        /// Why.
        message: String,
    },
}

async fn open_store(
    n: &WebhookSettings,
    shutdown: &CancellationToken,
) -> Result<Arc<Store>, WebhookError> {
    let store = Arc::new(Store::new(n.postgres.clone()));
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match store.refresh().await {
            Ok(count) => {
                tracing::info!(subscriptions = count, "Subscriptions loaded.");
                return Ok(store);
            }
            Err(e @ StoreError::Unreachable(_)) => {
                tracing::warn!(error = %e, "Subscriptions database not reachable yet; retrying.");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(e.into()),
                    () = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `notify`: serves the subscriptions API and delivers events until `shutdown`.
pub async fn notify(
    runtime: &RuntimeSettings,
    n: &WebhookSettings,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let store = open_store(n, &shutdown).await?;
    tokio::spawn(Arc::clone(&store).keep_fresh(n.subscriptions_refresh, shutdown.clone()));
    let guard = Arc::new(n.guard.clone());
    let mut sink = WebhookSink::new(
        n.delivery.clone(),
        Arc::clone(&guard),
        Arc::clone(&store),
        Arc::clone(&metrics),
    )
    .map_err(|e| WebhookError::Setup(format!("HTTP client: {e}")))?;
    tokio::spawn(sink.probe_parked(shutdown.clone()));
    let app = api::router(Api {
        store: Arc::clone(&store),
        guard,
        token: Arc::from(n.api_token.0.as_str()),
        max_subscriptions: n.max_subscriptions,
        parking: sink.parking(),
    });
    let listener = tokio::net::TcpListener::bind(n.api_addr)
        .await
        .map_err(|e| WebhookError::Setup(format!("--api-addr {}: {e}", n.api_addr)))?;
    tracing::info!(
        addr = %n.api_addr,
        scheme = if n.api_tls.is_some() { "https" } else { "http" },
        "Subscriptions API listening."
    );
    tokio::spawn(server::serve(
        listener,
        app,
        n.api_tls.as_ref().map(|t| Arc::clone(&t.0)),
        shutdown.clone(),
    ));
    let consumer = Runtime::new(runtime, &runtime.group, metrics, readiness, &shutdown)
        .await
        .map_err(WebhookError::Runtime)?;
    consumer.run(&mut sink, &shutdown).await?;
    Ok(())
}

/// `replay-dead-letters`; returns how many letters were delivered.
pub async fn replay(
    runtime: &RuntimeSettings,
    n: &WebhookSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<u64, WebhookError> {
    let store = open_store(n, &shutdown).await?;
    let sink = WebhookSink::new(
        n.delivery.clone(),
        Arc::new(n.guard.clone()),
        store,
        metrics,
    )
    .map_err(|e| WebhookError::Setup(format!("HTTP client: {e}")))?;
    let topic = runtime.dead_letter_topic.clone();
    let mut cfg = consumer_config(runtime, &runtime.group);
    cfg.set("enable.auto.commit", "false");
    let consumer: BaseConsumer = cfg
        .create()
        .map_err(|e| WebhookError::Kafka(e.to_string()))?;
    let md = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .map_err(|e| WebhookError::Kafka(e.to_string()))?;
    let partitions = md
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    let mut ends = std::collections::BTreeMap::new();
    let committed = consumer
        .committed(Duration::from_secs(10))
        .map_err(|e| WebhookError::Kafka(e.to_string()))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, hi) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(10))
            .map_err(|e| WebhookError::Kafka(e.to_string()))?;
        let from = committed
            .find_partition(&topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(0);
        if from < hi {
            ends.insert(p, hi);
            tpl.add_partition_offset(&topic, p, Offset::Offset(from))
                .map_err(|e| WebhookError::Kafka(e.to_string()))?;
        }
    }
    if ends.is_empty() {
        tracing::info!(%topic, "No dead letters to replay.");
        return Ok(0);
    }
    consumer
        .assign(&tpl)
        .map_err(|e| WebhookError::Kafka(e.to_string()))?;
    let (mut delivered, mut skipped) = (0u64, 0u64);
    while !ends.is_empty() {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let msg = msg.map_err(|e| WebhookError::Kafka(e.to_string()))?;
        let (p, offset) = (msg.partition(), msg.offset());
        let subscription = msg.headers().and_then(|h| {
            h.iter()
                .find(|x| x.key == "walrelay.dlq.subscription")
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        match subscription {
            None => skipped += 1,
            Some(sub) => {
                let payload = msg.payload().unwrap_or_default();
                match redeliver(&sink, &sub, payload, &shutdown).await {
                    Ok(true) => delivered += 1,
                    Ok(false) => {
                        tracing::warn!(subscription = %sub, offset, "The subscription no longer exists or is disabled; skipping its dead letter.");
                        skipped += 1;
                    }
                    Err(message) => return Err(WebhookError::Redelivery { offset, message }),
                }
            }
        }
        let mut done = TopicPartitionList::new();
        done.add_partition_offset(&topic, p, Offset::Offset(offset + 1))
            .map_err(|e| WebhookError::Kafka(e.to_string()))?;
        consumer
            .commit(&done, CommitMode::Sync)
            .map_err(|e| WebhookError::Kafka(e.to_string()))?;
        if ends.get(&p).is_some_and(|hi| offset + 1 >= *hi) {
            ends.remove(&p);
        }
    }
    tracing::info!(delivered, skipped, %topic, "Dead letters replayed.");
    Ok(delivered)
}
