//! The webhook sink itself: a batch's events delivered to every matching subscription, in
//! order per row and subscription, in parallel otherwise, each subscription within its share of
//! the delivery permits and parked when it cannot keep up (see the module documentation of
//! [`super`] for the order, retry, isolation and progress rules).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use walrelay_common::sync::lock;

use super::client::{Failure, Gate, WebhookClient};
use super::config::{DeliverySettings, OnFailure};
use super::encode::{gone_letter, letter, message_id, row_of};
use super::parking::{HeldEvent, Parking};
use super::subscriptions::{Store, Subscription};
use crate::http::guard::Guard;
use crate::metrics::Metrics;
use crate::runtime::{Backlog, Event, Letter, Sink, SinkError, Verdict};

/// The webhook sink.
pub struct WebhookSink {
    client: Arc<WebhookClient>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Requests in flight, every subscription together (`--max-concurrent-deliveries`).
    limit: Arc<Semaphore>,
    parking: Arc<Parking>,
    /// Subscriptions that answered 410 in the batch being written: disabled once the runtime
    /// has dead-lettered the batch ([`Sink::settled`]); a crash in between repeats the 410
    /// instead of losing its dead letter.
    gone: Mutex<Vec<String>>,
}

/// One subscription's part of the batch being written.
struct Lane<'a> {
    sub: &'a Subscription,
    /// Parked before the batch: nothing is sent, its events are dead-lettered or held.
    parked: bool,
    /// It has events in the batch.
    busy: bool,
    /// Cancelled when it is parked during the batch (and at shutdown).
    stop: CancellationToken,
    /// Its share of the permits.
    share: Semaphore,
    done: AtomicBool,
    /// The last answer settling an event (or the batch's start).
    last_answer: Mutex<Instant>,
    /// The last failure worth retrying.
    last_error: Mutex<Option<String>>,
}

impl Lane<'_> {
    fn report(&self, r: Option<&str>) {
        match r {
            None => *lock(&self.last_answer) = Instant::now(),
            Some(e) => *lock(&self.last_error) = Some(e.to_string()),
        }
    }

    fn running(&self) -> bool {
        self.busy && !self.parked && !self.done.load(Ordering::Relaxed) && !self.stop.is_cancelled()
    }
}

impl WebhookSink {
    /// A sink delivering to `store`'s subscriptions.
    pub fn new(
        settings: DeliverySettings,
        guard: Arc<Guard>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let parking = Arc::new(Parking::new(
            settings.park_after,
            settings.max_held_bytes,
            settings.on_failure == OnFailure::Stop,
            Arc::clone(&metrics),
        ));
        let limit = Arc::new(Semaphore::new(settings.max_concurrent_deliveries));
        let client = Arc::new(WebhookClient::new(settings, guard, Arc::clone(&metrics))?);
        metrics
            .sink_errors
            .with_label_values(&["webhook", "definite"]);
        Ok(Self {
            client,
            store,
            metrics,
            limit,
            parking,
            gone: Mutex::default(),
        })
    }

    /// The parked subscriptions (for the API).
    pub fn parking(&self) -> Arc<Parking> {
        Arc::clone(&self.parking)
    }

    /// Probes parked subscriptions (and delivers what they hold) until `shutdown`.
    pub fn probe_parked(&self, shutdown: CancellationToken) -> impl Future<Output = ()> + use<> {
        Arc::clone(&self.parking).probe_all(
            Arc::clone(&self.client),
            Arc::clone(&self.store),
            Arc::clone(&self.limit),
            shutdown,
        )
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

    /// Events of a parked subscription, in order: dead-lettered (lenient; the newest becomes
    /// the probe) or held (strict).
    fn set_aside(
        &self,
        lane: &Lane<'_>,
        rest: &[usize],
        events: &[Event],
        letters: &mut Vec<(usize, Letter)>,
    ) {
        let sub = lane.sub;
        if self.parking.strict() {
            for &i in rest {
                let e = &events[i];
                self.parking.hold(
                    &sub.id,
                    HeldEvent {
                        topic: Arc::clone(&e.topic),
                        partition: e.partition,
                        offset: e.offset,
                        body: e.raw.clone().unwrap_or_default(),
                    },
                );
            }
            return;
        }
        let why = self
            .parking
            .last_error(&sub.id)
            .unwrap_or_else(|| "its endpoint kept failing".into());
        for &i in rest {
            letters.push((
                i,
                letter(
                    sub,
                    None,
                    format!("the subscription is parked: {why}"),
                    "parked",
                ),
            ));
        }
        if let Some(&last) = rest.last() {
            self.parking
                .dead_lettered(&sub.id, events[last].raw.as_deref().unwrap_or_default());
        }
    }

    /// Delivers a chain of events (one row's, in order) to the lane's subscription; records
    /// letters per event.
    async fn run_chain(
        &self,
        lane: &Lane<'_>,
        chain: &[usize],
        events: &[Event],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Letter)>, SinkError> {
        let sub = lane.sub;
        let mut letters = Vec::new();
        let report = |r: Option<&str>| lane.report(r);
        let gate = Gate {
            limit: &self.limit,
            share: Some(&lane.share),
            stop: &lane.stop,
            attempts: self.client.settings().max_attempts,
            report: &report,
        };
        for (at, &i) in chain.iter().enumerate() {
            if self.is_gone(&sub.id) {
                // Answered 410 earlier in this batch: not sent again, dead-lettered alike.
                letters.push((i, gone_letter(sub)));
                continue;
            }
            if lane.stop.is_cancelled() {
                if shutdown.is_cancelled() {
                    return Err(SinkError::Interrupted);
                }
                self.set_aside(lane, &chain[at..], events, &mut letters);
                break;
            }
            let body = events[i].raw.as_deref().unwrap_or_default();
            let id = message_id(&sub.id, body);
            match self.client.deliver(sub, &id, body, &gate).await {
                Ok(()) => {}
                Err(Failure::Interrupted) => {
                    if shutdown.is_cancelled() {
                        return Err(SinkError::Interrupted);
                    }
                    // Parked meanwhile: this event and the rest of the chain are set aside.
                    self.set_aside(lane, &chain[at..], events, &mut letters);
                    break;
                }
                Err(Failure::Gone) => {
                    tracing::warn!(subscription = %sub.id, url = %walrelay_common::options::without_userinfo(&sub.url), "The endpoint answered 410 Gone: the subscription is disabled after this batch.");
                    let mut gone = lock(&self.gone);
                    if !gone.contains(&sub.id) {
                        gone.push(sub.id.clone());
                    }
                    drop(gone);
                    letters.push((i, gone_letter(sub)));
                }
                Err(Failure::Failed {
                    message,
                    exhausted: true,
                    ..
                }) if self.parking.strict() => {
                    // Strict: an endpoint that keeps failing is parked, its events held.
                    self.parking.park(&sub.id, &message);
                    lane.stop.cancel();
                    self.set_aside(lane, &chain[at..], events, &mut letters);
                    break;
                }
                Err(Failure::Failed {
                    status, message, ..
                }) => {
                    if self.parking.strict() {
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

    /// Delivers every matching event of the batch to the lane's subscription, phase by phase.
    /// `rows[i]` is event `i`'s order chain ([`row_of`]), computed once per batch.
    async fn run_subscription(
        &self,
        lane: &Lane<'_>,
        events: &[Event],
        rows: &[Option<String>],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Letter)>, SinkError> {
        let result = self.deliver_phases(lane, events, rows, shutdown).await;
        lane.done.store(true, Ordering::Relaxed);
        result
    }

    async fn deliver_phases(
        &self,
        lane: &Lane<'_>,
        events: &[Event],
        rows: &[Option<String>],
        shutdown: &CancellationToken,
    ) -> Result<Vec<(usize, Letter)>, SinkError> {
        let sub = lane.sub;
        let matching = events.iter().enumerate().filter(|(_, e)| {
            let env = &e.envelope;
            // Snapshot markers frame the producer's snapshot attempts for sinks that keep
            // state; they are no change to notify anyone of, and are never delivered.
            !env.op.is_snapshot_marker()
                && sub.matches(env.op, &env.source.schema, &env.source.table)
        });
        let mut letters = Vec::new();
        if lane.parked {
            // In event order: nothing is sent.
            let all: Vec<usize> = matching.map(|(i, _)| i).collect();
            self.set_aside(lane, &all, events, &mut letters);
            return Ok(letters);
        }
        let mut phase: Vec<(String, Vec<usize>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let flush = async |phase: &mut Vec<(String, Vec<usize>)>,
                           letters: &mut Vec<(usize, Letter)>| {
            let chains = std::mem::take(phase);
            let results = join_all(
                chains
                    .iter()
                    .map(|(_, chain)| self.run_chain(lane, chain, events, shutdown)),
            )
            .await;
            for r in results {
                letters.extend(r?);
            }
            Ok::<(), SinkError>(())
        };
        for (i, _) in matching {
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
                    letters.extend(self.run_chain(lane, &barrier, events, shutdown).await?);
                }
            }
        }
        flush(&mut phase, &mut letters).await?;
        Ok(letters)
    }

    /// Parks the lanes that cannot keep up, until every lane is done (never returns by itself:
    /// dropped when the batch ends). A lane is parked when it had no settling answer for
    /// `--park-after`, or is still delivering `--park-after` after the first other lane with
    /// events finished.
    async fn supervise(&self, lanes: &[Lane<'_>]) {
        let park_after = self.parking.park_after();
        let tick = (park_after / 20).clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut first_done: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            let now = Instant::now();
            if first_done.is_none()
                && lanes.iter().any(|l| {
                    l.busy && !l.parked && !l.stop.is_cancelled() && l.done.load(Ordering::Relaxed)
                })
            {
                first_done = Some(now);
            }
            for lane in lanes.iter().filter(|l| l.running()) {
                let silent = now.duration_since(*lock(&lane.last_answer)) > park_after;
                let lagging = first_done.is_some_and(|t| now.duration_since(t) > park_after);
                if !(silent || lagging) {
                    continue;
                }
                let last = lock(&lane.last_error).clone();
                let why = match (silent, last) {
                    (true, Some(e)) => format!("no answer for {park_after:?}; last error: {e}"),
                    (true, None) => format!("no answer for {park_after:?}"),
                    (false, _) => format!(
                        "still delivering {park_after:?} after another subscription finished the batch"
                    ),
                };
                self.parking.park(&lane.sub.id, &why);
                lane.stop.cancel();
            }
        }
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

    fn backlog(&self) -> Backlog {
        self.parking.backlog()
    }

    async fn write(
        &mut self,
        events: &mut [Event],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, SinkError> {
        if let Some(fatal) = self.parking.fatal() {
            return Err(SinkError::Definite(fatal));
        }
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
        let events_ref: &[Event] = events;
        let mut lanes: Vec<Lane<'_>> = active
            .iter()
            .map(|&sub| Lane {
                sub,
                parked: self.parking.is_parked(&sub.id),
                busy: events_ref.iter().any(|e| {
                    let env = &e.envelope;
                    !env.op.is_snapshot_marker()
                        && sub.matches(env.op, &env.source.schema, &env.source.table)
                }),
                stop: shutdown.child_token(),
                share: Semaphore::new(0),
                done: AtomicBool::new(false),
                last_answer: Mutex::new(Instant::now()),
                last_error: Mutex::new(None),
            })
            .collect();
        // Each subscription delivering in this batch gets an equal share of the permits.
        let delivering = lanes.iter().filter(|l| l.busy && !l.parked).count().max(1);
        let share = (self.client.settings().max_concurrent_deliveries / delivering).max(1);
        for lane in &mut lanes {
            lane.share.add_permits(share);
        }
        let this = &*self;
        let lanes = &lanes;
        let work = join_all(
            lanes
                .iter()
                .map(|lane| this.run_subscription(lane, events_ref, &rows, shutdown)),
        );
        let results = tokio::select! {
            results = work => results,
            () = this.supervise(lanes) => Vec::new(),
        };
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
    let limit = Semaphore::new(1);
    let gate = Gate {
        limit: &limit,
        share: None,
        stop: shutdown,
        attempts: sink.client.settings().max_attempts,
        report: &|_| {},
    };
    match sink.client.deliver(&sub, &id, record, &gate).await {
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
