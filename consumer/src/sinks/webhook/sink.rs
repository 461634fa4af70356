//! The webhook sink itself: a batch's events delivered to every matching subscription, in
//! order per row and subscription, in parallel otherwise (see the module documentation of
//! [`super`] for the order, retry and progress rules).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use walrelay_common::sync::lock;

use super::client::{Failure, WebhookClient};
use super::config::{DeliverySettings, OnFailure};
use super::encode::{gone_letter, letter, message_id, row_of};
use super::subscriptions::{Store, Subscription};
use crate::http::guard::Guard;
use crate::metrics::Metrics;
use crate::runtime::{Event, Letter, Sink, SinkError, Verdict};

/// The webhook sink.
pub struct WebhookSink {
    client: WebhookClient,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Subscriptions that answered 410 in the batch being written: disabled once the runtime
    /// has dead-lettered the batch ([`Sink::settled`]); a crash in between repeats the 410
    /// instead of losing its dead letter.
    gone: Mutex<Vec<String>>,
}

impl WebhookSink {
    /// A sink delivering to `store`'s subscriptions.
    pub fn new(
        settings: DeliverySettings,
        guard: Arc<Guard>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let client = WebhookClient::new(settings, guard, Arc::clone(&metrics))?;
        metrics
            .sink_errors
            .with_label_values(&["webhook", "definite"]);
        Ok(Self {
            client,
            store,
            metrics,
            gone: Mutex::default(),
        })
    }

    fn is_gone(&self, id: &str) -> bool {
        lock(&self.gone).iter().any(|g| g == id)
    }

    /// Disables the subscriptions that answered 410 in earlier batches.
    async fn disable_gone(&self) {
        let gone = std::mem::take(&mut *lock(&self.gone));
        for id in gone {
            match self.store.disable(&id, "410 Gone").await {
                Ok(()) => {
                    self.metrics.webhook_disabled.inc();
                    tracing::warn!(subscription = %id, "Disabled the subscription (its endpoint answered 410 Gone).");
                }
                Err(e) => {
                    tracing::warn!(error = %e, subscription = %id, "Could not disable the subscription yet; retrying with the next batch.");
                    lock(&self.gone).push(id);
                }
            }
        }
    }

    /// Delivers a chain of events (one row's, in order) to `sub`; records letters per event.
    async fn run_chain(
        &self,
        sub: &Subscription,
        chain: &[usize],
        events: &[Event],
        limit: &Semaphore,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Letter)>, SinkError> {
        let mut letters = Vec::new();
        for &i in chain {
            if self.is_gone(&sub.id) {
                // Answered 410 earlier in this batch: not sent again, dead-lettered alike.
                letters.push((i, gone_letter(sub)));
                continue;
            }
            let body = events[i].raw.as_deref().unwrap_or_default();
            let id = message_id(&sub.id, body);
            let Ok(_permit) = limit.acquire().await else {
                return Err(SinkError::Interrupted);
            };
            match self.client.deliver(sub, &id, body, shutdown).await {
                Ok(()) => {}
                Err(Failure::Interrupted) => return Err(SinkError::Interrupted),
                Err(Failure::Gone) => {
                    tracing::warn!(subscription = %sub.id, url = %walrelay_common::options::without_userinfo(&sub.url), "The endpoint answered 410 Gone: the subscription is disabled after this batch.");
                    let mut gone = lock(&self.gone);
                    if !gone.contains(&sub.id) {
                        gone.push(sub.id.clone());
                    }
                    drop(gone);
                    letters.push((i, gone_letter(sub)));
                }
                Err(Failure::Failed { status, message }) => {
                    if self.client.settings().on_failure == OnFailure::Stop {
                        return Err(SinkError::Definite(format!(
                            "delivery to subscription {} ({}) failed: {message} (--on-delivery-failure stop)",
                            sub.id, sub.url
                        )));
                    }
                    letters.push((i, letter(sub, status, message, "delivery_failed")));
                }
            }
        }
        Ok(letters)
    }

    /// Delivers every matching event of the batch to `sub`, phase by phase.
    /// `rows[i]` is event `i`'s order chain ([`row_of`]), computed once per batch.
    async fn run_subscription(
        &self,
        sub: &Subscription,
        events: &[Event],
        rows: &[Option<String>],
        limit: &Semaphore,
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Letter)>, SinkError> {
        let mut letters = Vec::new();
        let mut phase: Vec<(String, Vec<usize>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let flush = async |phase: &mut Vec<(String, Vec<usize>)>,
                           letters: &mut Vec<(usize, Letter)>| {
            let chains = std::mem::take(phase);
            let results = join_all(
                chains
                    .iter()
                    .map(|(_, chain)| self.run_chain(sub, chain, events, limit, shutdown)),
            )
            .await;
            for r in results {
                letters.extend(r?);
            }
            Ok::<(), SinkError>(())
        };
        for (i, e) in events.iter().enumerate() {
            let env = &e.envelope;
            // Snapshot markers frame the producer's snapshot attempts for sinks that keep
            // state; they are no change to notify anyone of, and are never delivered.
            if env.op.is_snapshot_marker()
                || !sub.matches(env.op, &env.source.schema, &env.source.table)
            {
                continue;
            }
            match &rows[i] {
                Some(row) => {
                    let at = *index.entry(row.clone()).or_insert_with(|| {
                        phase.push((row.clone(), Vec::new()));
                        phase.len() - 1
                    });
                    phase[at].1.push(i);
                }
                None => {
                    flush(&mut phase, &mut letters).await?;
                    index.clear();
                    let barrier = vec![i];
                    letters.extend(
                        self.run_chain(sub, &barrier, events, limit, shutdown)
                            .await?,
                    );
                }
            }
        }
        flush(&mut phase, &mut letters).await?;
        Ok(letters)
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn wants_raw(&self) -> bool {
        true
    }

    async fn settled(&mut self) {
        // This batch's 410 events are dead-lettered now: the subscriptions may go.
        self.disable_gone().await;
    }

    async fn write(
        &mut self,
        events: &mut [Event],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, SinkError> {
        let subs = self.store.current();
        let active: Vec<&Subscription> = subs.iter().filter(|s| s.disabled.is_none()).collect();
        // Each event's chain once, not once per subscription (it parses the row image).
        let rows: Vec<Option<String>> = if active.is_empty() {
            Vec::new()
        } else {
            events
                .iter()
                .map(|e| row_of(&e.envelope, e.after_json.as_ref().map(|a| a.get())))
                .collect()
        };
        let limit = Semaphore::new(self.client.settings().max_concurrent_deliveries);
        let this = &*self;
        let events_ref: &[Event] = events;
        let results = join_all(
            active
                .iter()
                .map(|sub| this.run_subscription(sub, events_ref, &rows, &limit, shutdown)),
        )
        .await;
        let mut per_event: Vec<Vec<Letter>> = vec![Vec::new(); events.len()];
        for r in results {
            for (i, l) in r? {
                per_event[i].push(l);
            }
        }
        Ok(per_event
            .into_iter()
            .map(|l| {
                if l.is_empty() {
                    Verdict::Applied
                } else {
                    Verdict::DeadLetters(l)
                }
            })
            .collect())
    }
}

/// Delivers one dead letter again to the subscription its headers name (the
/// `replay-dead-letters` command); `Ok(false)` when that subscription no longer exists or is
/// disabled (its endpoint answered 410 Gone: it asked for nothing more).
pub async fn redeliver(
    sink: &WebhookSink,
    subscription: &str,
    record: &[u8],
    shutdown: &CancellationToken,
) -> Result<bool, String> {
    let found = sink.store.get(subscription);
    let Some(sub) = found.filter(|s| s.disabled.is_none()) else {
        return Ok(false);
    };
    let id = message_id(&sub.id, record);
    match sink.client.deliver(&sub, &id, record, shutdown).await {
        Ok(()) => Ok(true),
        Err(Failure::Gone) => {
            sink.store
                .disable(&sub.id, "410 Gone")
                .await
                .map_err(|e| e.to_string())?;
            Ok(false)
        }
        Err(Failure::Interrupted) => Err("interrupted".into()),
        Err(Failure::Failed { message, .. }) => Err(message),
    }
}
