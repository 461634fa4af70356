//! Parked subscriptions: those whose endpoint kept failing or could not keep up, taken out of
//! the batches so that they delay no one (see the sink's module documentation of [`super`]
//! for when a subscription is parked and what that bounds).
//!
//! While parked, a subscription gets no delivery from the batches. What happens to its events:
//!
//! - **Lenient** (`--on-delivery-failure dead-letter`): they are dead-lettered at once (reason
//!   `parked`); the newest of them is kept as the **probe**, sent once (one attempt) every
//!   `--park-after`. Any answer from the endpoint (a success, or a definite refusal) resumes
//!   the subscription with the next batch. The probe event stays dead-lettered: a replay sends
//!   it again, with the same `webhook-id`.
//! - **Strict** (`--on-delivery-failure stop`): they are **held** here, in delivery order (per
//!   row, and phase by phase), and reported to the runtime as the sink's
//!   [`Backlog`]: no offset past the oldest held event is stored.
//!   The oldest held event is the probe (one attempt every `--park-after`); once it is
//!   delivered the rest follow one by one, in order, and the subscription resumes when none
//!   is left. At `--max-held-bytes` the backlog is full: the runtime pauses fetching the
//!   partitions it holds events of (polling goes on). A definite refusal or a 410 of a held
//!   event stops the notifier with the next batch (nothing is committed past it, so a restart
//!   delivers it again through the batches).
//!
//! Parking is this process's memory (shown by `GET /v1/subscriptions/{id}`, counted by
//! `walrelay_consumer_webhook_subscriptions_parked`); a restart starts every subscription
//! active, and a subscription deleted or disabled meanwhile is forgotten with what it held.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use walrelay_common::sync::lock;

use super::client::{Failure, Gate, WebhookClient};
use super::encode::message_id;
use super::subscriptions::Store;
use crate::metrics::Metrics;
use crate::runtime::Backlog;

/// One event held for a parked subscription (strict mode).
pub struct HeldEvent {
    /// Its topic.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The record as delivered.
    pub body: Vec<u8>,
}

/// A parked subscription.
struct Parked {
    since_ms: i64,
    last_error: String,
    held: VecDeque<HeldEvent>,
    /// Lenient mode: the newest event dead-lettered while parked.
    probe: Option<Vec<u8>>,
    next_probe: Instant,
    probing: bool,
}

#[derive(Default)]
struct State {
    parked: HashMap<String, Parked>,
    held_bytes: usize,
    held_events: usize,
    /// A held event refused for good (strict): the next batch stops the notifier.
    fatal: Option<String>,
}

/// The parked subscriptions of this notifier.
pub struct Parking {
    park_after: Duration,
    max_held_bytes: usize,
    strict: bool,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

impl Parking {
    /// No subscription parked yet.
    pub fn new(
        park_after: Duration,
        max_held_bytes: usize,
        strict: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.webhook_parked.set(0);
        Self {
            park_after,
            max_held_bytes,
            strict,
            state: Mutex::default(),
            metrics,
        }
    }

    /// Strict mode: a parked subscription's events are held, not dead-lettered.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// `--park-after`.
    pub fn park_after(&self) -> Duration {
        self.park_after
    }

    /// Whether `id` is parked.
    pub fn is_parked(&self, id: &str) -> bool {
        lock(&self.state).parked.contains_key(id)
    }

    /// The error of a held event refused for good, if any (strict mode).
    pub fn fatal(&self) -> Option<String> {
        lock(&self.state).fatal.clone()
    }

    fn gauges(&self, st: &State) {
        self.metrics.webhook_parked.set(st.parked.len() as i64);
        self.metrics.webhook_held_events.set(st.held_events as i64);
        self.metrics.webhook_held_bytes.set(st.held_bytes as i64);
    }

    fn enter<'a>(&self, st: &'a mut State, id: &str, error: &str) -> &'a mut Parked {
        st.parked.entry(id.to_string()).or_insert_with(|| {
            tracing::warn!(subscription = %id, error = %error, strict = self.strict, "Subscription parked: its deliveries leave the batches until its endpoint answers a probe.");
            Parked {
                since_ms: walrelay_common::clock::now_ms(),
                last_error: error.to_string(),
                held: VecDeque::new(),
                probe: None,
                next_probe: Instant::now() + self.park_after,
                probing: false,
            }
        })
    }

    /// Parks `id` (or records the newer error of a parked one).
    pub fn park(&self, id: &str, error: &str) {
        let mut st = lock(&self.state);
        let p = self.enter(&mut st, id, error);
        p.last_error = error.to_string();
        self.gauges(&st);
    }

    /// Holds an event for `id` (strict mode), parking it if it is not (a batch that found it
    /// parked may end after a probe resumed it: the event then waits for the next probe).
    pub fn hold(&self, id: &str, event: HeldEvent) {
        let mut st = lock(&self.state);
        let bytes = event.body.len();
        self.enter(&mut st, id, "held behind earlier events")
            .held
            .push_back(event);
        st.held_bytes += bytes;
        st.held_events += 1;
        self.gauges(&st);
    }

    /// Lenient mode: `body` was dead-lettered for the parked `id`; it becomes the probe.
    pub fn dead_lettered(&self, id: &str, body: &[u8]) {
        if let Some(p) = lock(&self.state).parked.get_mut(id) {
            p.probe = Some(body.to_vec());
        }
    }

    /// The last error of a parked `id`.
    pub fn last_error(&self, id: &str) -> Option<String> {
        lock(&self.state)
            .parked
            .get(id)
            .map(|p| p.last_error.clone())
    }

    /// What is held, for the runtime: the oldest held offset per topic-partition, and whether
    /// `--max-held-bytes` is reached.
    pub fn backlog(&self) -> Backlog {
        let st = lock(&self.state);
        let mut oldest: BTreeMap<(Arc<str>, i32), i64> = BTreeMap::new();
        for p in st.parked.values() {
            for e in &p.held {
                let o = oldest
                    .entry((Arc::clone(&e.topic), e.partition))
                    .or_insert(e.offset);
                *o = (*o).min(e.offset);
            }
        }
        Backlog {
            oldest,
            full: st.held_bytes >= self.max_held_bytes,
        }
    }

    /// The parking fields of `id` for the API: `state`, and for a parked one `parked_since_ms`,
    /// `last_error` and `held_events`.
    pub fn view(&self, id: &str, disabled: bool) -> Value {
        if disabled {
            return json!({"state": "disabled"});
        }
        match lock(&self.state).parked.get(id) {
            None => json!({"state": "active"}),
            Some(p) => json!({
                "state": "parked",
                "parked_since_ms": p.since_ms,
                "last_error": p.last_error,
                "held_events": p.held.len(),
            }),
        }
    }

    /// Resumes `id`, dropping what it still holds (it is resumed once nothing is left, or
    /// forgotten).
    fn resume(&self, st: &mut State, id: &str, why: &str) {
        if let Some(p) = st.parked.remove(id) {
            let bytes: usize = p.held.iter().map(|e| e.body.len()).sum();
            st.held_bytes -= bytes;
            st.held_events -= p.held.len();
            tracing::info!(subscription = %id, dropped = p.held.len(), "Subscription resumed: {why}.");
        }
        self.gauges(st);
    }

    /// Probes the parked subscriptions every `--park-after` until `shutdown`.
    pub async fn probe_all(
        self: Arc<Self>,
        client: Arc<WebhookClient>,
        store: Arc<Store>,
        limit: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let tick =
            (self.park_after / 10).clamp(Duration::from_millis(20), Duration::from_millis(500));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
            let due: Vec<String> = {
                let mut st = lock(&self.state);
                let now = Instant::now();
                st.parked
                    .iter_mut()
                    .filter(|(_, p)| {
                        !p.probing
                            && p.next_probe <= now
                            && (p.probe.is_some() || !p.held.is_empty())
                    })
                    .map(|(id, p)| {
                        p.probing = true;
                        id.clone()
                    })
                    .collect()
            };
            for id in due {
                tokio::spawn(Arc::clone(&self).probe(
                    id,
                    Arc::clone(&client),
                    Arc::clone(&store),
                    Arc::clone(&limit),
                    shutdown.clone(),
                ));
            }
        }
    }

    /// One probe of `id`; in strict mode, on success, the delivery of everything it holds.
    async fn probe(
        self: Arc<Self>,
        id: String,
        client: Arc<WebhookClient>,
        store: Arc<Store>,
        limit: Arc<Semaphore>,
        shutdown: CancellationToken,
    ) {
        let Some(sub) = store.get(&id).filter(|s| s.disabled.is_none()) else {
            self.resume(
                &mut lock(&self.state),
                &id,
                "the subscription was deleted or disabled",
            );
            return;
        };
        let mut delivered = 0u64;
        loop {
            let (body, held) = {
                let mut st = lock(&self.state);
                let Some(p) = st.parked.get_mut(&id) else {
                    return;
                };
                if let Some(front) = p.held.front() {
                    (front.body.clone(), true)
                } else if let Some(b) = p.probe.take() {
                    (b, false)
                } else {
                    // Everything held was delivered.
                    self.resume(
                        &mut st,
                        &id,
                        "its endpoint is back and its held events were delivered",
                    );
                    return;
                }
            };
            let mid = message_id(&sub.id, &body);
            let gate = Gate {
                limit: &limit,
                share: None,
                stop: &shutdown,
                attempts: 1,
                report: &|_| {},
            };
            let result = client.deliver(&sub, &mid, &body, &gate).await;
            let mut st = lock(&self.state);
            match result {
                Ok(()) if held => {
                    if let Some(p) = st.parked.get_mut(&id)
                        && let Some(e) = p.held.pop_front()
                    {
                        st.held_bytes -= e.body.len();
                        st.held_events -= 1;
                    }
                    delivered += 1;
                    if delivered.is_power_of_two() {
                        tracing::info!(subscription = %id, delivered, "Delivering the events held for a parked subscription.");
                    }
                    self.gauges(&st);
                }
                Ok(())
                | Err(Failure::Failed {
                    exhausted: false, ..
                }) if !self.strict => {
                    self.resume(&mut st, &id, "its endpoint answered a probe");
                    return;
                }
                Err(Failure::Interrupted) => return,
                Err(Failure::Failed {
                    message,
                    exhausted: true,
                    ..
                }) => {
                    if let Some(p) = st.parked.get_mut(&id) {
                        p.last_error = message;
                        p.next_probe = Instant::now() + self.park_after;
                        p.probing = false;
                    }
                    return;
                }
                Ok(()) => {}
                Err(Failure::Gone) if !self.strict => {
                    drop(st);
                    if let Err(e) = store.disable(&id, "410 Gone").await {
                        tracing::warn!(error = %e, subscription = %id, "Could not disable the subscription; probing it again later.");
                    }
                    self.resume(
                        &mut lock(&self.state),
                        &id,
                        "its endpoint answered 410 Gone",
                    );
                    return;
                }
                Err(e) => {
                    let why = match e {
                        Failure::Gone => "410 Gone".to_string(),
                        Failure::Failed { message, .. } => message,
                        Failure::Interrupted => "interrupted".to_string(),
                    };
                    st.fatal = Some(format!(
                        "delivery of an event held for subscription {id} failed: {why} (--on-delivery-failure stop)"
                    ));
                    return;
                }
            }
        }
    }
}
