//! The webhook sink (`notify`): every event POSTed, signed, to every matching subscription.
//!
//! - **Identity.** `webhook-id` is `msg_` + a hash of the subscription id and the record's
//!   bytes: the same on every re-delivery of the event (a producer's re-delivery after a crash
//!   is byte-identical, so it gets the same id too), so receivers can de-duplicate.
//! - **Order and parallelism.** Per subscription, a batch's events are cut into phases at each
//!   truncate or schema event (which concern every row of a table); inside a phase each row's
//!   events form a chain delivered in order, and chains and subscriptions run in parallel (at
//!   most `--max-concurrent-deliveries` requests at once). A phase waits for the one before it.
//! - **Retries.** Timeouts, connection errors, 408, 425, 429 and 5xx are retried with
//!   exponential backoff and jitter (`--retry-initial-backoff` .. `--retry-max-backoff`),
//!   honouring `Retry-After` on 429 and 503, up to `--max-attempts` attempts. 410 Gone disables
//!   the subscription. After the last attempt, or on another 4xx, a refusal by the SSRF guard
//!   or a redirect, the event is dead-lettered with `walrelay.dlq.subscription`,
//!   `walrelay.dlq.status` and `walrelay.dlq.url` headers (`--on-delivery-failure stop` halts
//!   the notifier instead).
//! - **Progress.** The runtime stores a partition's offset only after the whole batch has a
//!   final answer for every subscription, so nothing is committed past an event still being
//!   retried. The batch is the bounded queue: a slow or dead endpoint holds the next batch
//!   back only after every other chain of the current one has been delivered.
//! - **Proxies.** Proxy environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, ...)
//!   are ignored: deliveries connect directly unless `--webhook-proxy` names a proxy, and then
//!   every delivery goes through it (plain-HTTP targets as absolute-form requests, HTTPS
//!   targets through `CONNECT` tunnels, TLS end to end with the target).
//!
//! # The SSRF guard and a proxy
//! Without a proxy the guard sits in the client's resolver and checks every address a
//! connection is made to. With `--webhook-proxy` the only connections are to the proxy (the
//! operator's choice, not checked), so the guard checks the **target** before every attempt:
//! a literal address directly, a host name by resolving it here and refusing it if any of its
//! addresses is refused. So the notifier must be able to resolve target names itself (names
//! listed in `--allow-targets` are not looked up).
//!
//! Guaranteed: no delivery is handed to the proxy for a literal internal address, nor for a
//! name that resolves here, at that attempt, to any internal address. Not guaranteed: the
//! proxy resolves the name again on its own, so a name whose records change between our check
//! and the proxy's lookup (DNS rebinding with a short TTL), or that the proxy's resolver
//! answers differently (split-horizon DNS, its own hosts file), can still lead the proxy to an
//! internal address. A proxy that must not reach internal networks has to refuse them itself
//! (its own ACLs).
//!
//! # Layout
//! - [`signing`]: Standard Webhooks signatures and secrets.
//! - [`guard`]: the SSRF guard (literal addresses, and every resolved address at connect time).
//! - [`subscriptions`]: the subscriptions in Postgres and their cache.
//! - [`api`]: the subscriptions HTTP API.
//! - [`server`]: serving the API (TLS, timeouts and limits).

pub mod api;
pub mod guard;
pub mod server;
pub mod signing;
pub mod subscriptions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use walrelay_common::event::{Envelope, Op};
use walrelay_common::retry::Backoff;
use walrelay_common::sync::lock;

use crate::metrics::Metrics;
use crate::runtime::{Event, Letter, Sink, SinkError, Verdict};
use guard::{Guard, GuardedResolver, refusal_in};
use subscriptions::{Store, Subscription};

/// What a failed delivery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Dead-letter the event for that subscription and go on.
    #[default]
    DeadLetter,
    /// Stop the notifier (exit 1) without committing: strict mode.
    Stop,
}

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Per-attempt timeout.
    pub delivery_timeout: Duration,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// First backoff.
    pub retry_initial_backoff: Duration,
    /// Backoff cap (and the longest `Retry-After` honoured).
    pub retry_max_backoff: Duration,
    /// Requests in flight at most.
    pub max_concurrent_deliveries: usize,
    /// What a definite failure does.
    pub on_failure: OnFailure,
    /// The proxy every delivery goes through (`--webhook-proxy`), if any.
    pub proxy: Option<ProxyUrl>,
}

/// `--webhook-proxy`: an http(s) proxy URL, possibly with credentials (kept out of debug
/// output and logs).
#[derive(Clone)]
pub struct ProxyUrl(Url);

impl ProxyUrl {
    /// Parses and checks a proxy URL; the error says what is wrong and what to give.
    pub fn parse(s: &str) -> Result<Self, String> {
        let shown = walrelay_common::options::without_userinfo(s);
        let url = Url::parse(s.trim()).map_err(|e| {
            format!("{shown:?} is not a URL ({e}); give one such as http://proxy.internal:3128")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!(
                "{shown:?} is not an http(s) proxy URL; give one such as http://proxy.internal:3128"
            ));
        }
        if url.path() != "/" || url.query().is_some() {
            return Err(format!(
                "{shown:?} has a path or query; a proxy URL is scheme, host and port only"
            ));
        }
        Ok(Self(url))
    }

    /// The URL without credentials.
    pub fn shown(&self) -> String {
        walrelay_common::options::without_userinfo(self.0.as_str())
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({})", self.shown())
    }
}

/// Why a delivery did not succeed.
#[derive(Debug)]
enum Failure {
    /// The endpoint answered 410: the subscription is disabled.
    Gone,
    /// A definite answer or refusal, or the attempts ran out.
    Failed {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
    /// Shutdown came while retrying.
    Interrupted,
}

/// The webhook sink.
pub struct WebhookSink {
    http: reqwest::Client,
    guard: Arc<Guard>,
    store: Arc<Store>,
    settings: WebhookSettings,
    metrics: Arc<Metrics>,
    /// Subscriptions that answered 410 in the batch being written: disabled once the runtime
    /// has dead-lettered the batch ([`Sink::settled`]); a crash in between repeats the 410
    /// instead of losing its dead letter.
    gone: std::sync::Mutex<Vec<String>>,
}

/// The stable `webhook-id` of an event for a subscription.
pub fn message_id(subscription: &str, record: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(subscription.as_bytes());
    h.update(b"\n");
    h.update(record);
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("msg_{hex}")
}

/// The row an event belongs to (its order chain), or `None` for an event that concerns more
/// than one row: a truncate, a schema event, or an update that changed the row's key (it ends
/// one row's chain and starts another's), which are delivered alone, between phases.
fn row_of(env: &Envelope, after: Option<&str>) -> Option<String> {
    if matches!(env.op, Op::Truncate | Op::Ddl) {
        return None;
    }
    let key_of = |image: &serde_json::Map<String, serde_json::Value>| {
        let mut key = format!("{}.{}", env.source.schema, env.source.table);
        for k in &env.key {
            key.push('\u{0}');
            key.push_str(&image.get(k).map(ToString::to_string).unwrap_or_default());
        }
        key
    };
    let after: Option<serde_json::Map<String, serde_json::Value>> =
        after.and_then(|a| serde_json::from_str(a).ok());
    match (env.op, env.before.as_ref(), after.as_ref()) {
        (Op::Delete, Some(before), _) => Some(key_of(before)),
        (Op::Update, Some(before), Some(after)) => {
            let (old, new) = (key_of(before), key_of(after));
            (old == new).then_some(new)
        }
        (_, _, Some(after)) => Some(key_of(after)),
        _ => Some(format!("{}.{}", env.source.schema, env.source.table)),
    }
}

impl WebhookSink {
    /// A sink delivering to `store`'s subscriptions.
    pub fn new(
        settings: WebhookSettings,
        guard: Arc<Guard>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        // Never a proxy from the environment; `--webhook-proxy` only.
        let mut http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.delivery_timeout)
            .connect_timeout(settings.delivery_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("walrelay-notifier/", env!("CARGO_PKG_VERSION")));
        http = match &settings.proxy {
            // Every connection goes to the proxy: the resolver would see only the proxy's
            // name, so targets are checked in `deliver` instead.
            Some(proxy) => {
                tracing::info!(proxy = %proxy.shown(), "Deliveries go through the proxy.");
                http.proxy(reqwest::Proxy::all(proxy.0.clone())?)
            }
            None => http.dns_resolver(Arc::new(GuardedResolver(Arc::clone(&guard)))),
        };
        let http = http.build()?;
        metrics
            .sink_errors
            .with_label_values(&["webhook", "definite"]);
        Ok(Self {
            http,
            guard,
            store,
            settings,
            metrics,
            gone: std::sync::Mutex::default(),
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

    /// Through a proxy, the target's host name is resolved and checked here before each
    /// attempt (without one, the client's resolver checks every connection itself).
    async fn check_target(&self, url: &Url) -> Result<(), guard::Refused> {
        match (&self.settings.proxy, url.host()) {
            (Some(_), Some(url::Host::Domain(host))) => self.guard.check_host(host).await,
            _ => Ok(()),
        }
    }

    /// Delivers one event to one subscription, retrying until a final answer.
    async fn deliver(
        &self,
        sub: &Subscription,
        id: &str,
        body: &[u8],
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let failed = |status: Option<u16>, message: String| Failure::Failed { status, message };
        let url = Url::parse(&sub.url).map_err(|e| failed(None, format!("bad URL: {e}")))?;
        if let Err(refused) = self.guard.check_url(&url) {
            self.metrics
                .webhook_deliveries
                .with_label_values(&["refused"])
                .inc();
            return Err(failed(None, refused.to_string()));
        }
        let Some(secret) = sub.secret() else {
            return Err(failed(
                None,
                "the subscription's secret is unreadable".into(),
            ));
        };
        // One copy of the body for every attempt (cloning `Bytes` shares it).
        let payload = bytes::Bytes::copy_from_slice(body);
        let mut backoff = Backoff::new(
            self.settings.retry_initial_backoff,
            self.settings.retry_max_backoff,
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            if let Err(refused) = self.check_target(&url).await {
                self.metrics
                    .webhook_deliveries
                    .with_label_values(&["refused"])
                    .inc();
                return Err(failed(None, refused.to_string()));
            }
            let ts = walrelay_common::clock::now_ms() / 1000;
            let started = Instant::now();
            let sent = self
                .http
                .post(url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", secret.sign(id, ts, body))
                .body(payload.clone())
                .send()
                .await;
            self.metrics
                .webhook_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            let (class, retry_after, last) = match sent {
                Ok(resp) => {
                    let status = resp.status();
                    let class = match status.as_u16() {
                        200..=299 => "2xx",
                        300..=399 => "3xx",
                        400..=499 => "4xx",
                        _ => "5xx",
                    };
                    self.metrics
                        .webhook_deliveries
                        .with_label_values(&[class])
                        .inc();
                    if status.is_success() {
                        return Ok(());
                    }
                    if status == StatusCode::GONE {
                        return Err(Failure::Gone);
                    }
                    let retryable = matches!(status.as_u16(), 408 | 425 | 429 | 500..=599);
                    if !retryable {
                        return Err(failed(
                            Some(status.as_u16()),
                            format!("the endpoint answered {status}"),
                        ));
                    }
                    let retry_after = if matches!(status.as_u16(), 429 | 503) {
                        resp.headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(Duration::from_secs)
                    } else {
                        None
                    };
                    (
                        class,
                        retry_after,
                        (
                            Some(status.as_u16()),
                            format!("the endpoint answered {status}"),
                        ),
                    )
                }
                Err(e) => {
                    if let Some(why) = refusal_in(&e) {
                        self.metrics
                            .webhook_deliveries
                            .with_label_values(&["refused"])
                            .inc();
                        return Err(failed(None, why));
                    }
                    let class = if e.is_timeout() {
                        "timeout"
                    } else {
                        "connection"
                    };
                    self.metrics
                        .webhook_deliveries
                        .with_label_values(&[class])
                        .inc();
                    (class, None, (None, format!("{class}: {e}")))
                }
            };
            if attempt >= self.settings.max_attempts {
                return Err(failed(
                    last.0,
                    format!("{} after {attempt} attempts", last.1),
                ));
            }
            self.metrics.webhook_retries.inc();
            // The backoff steps on every retry, also when the endpoint said how long to wait.
            let jittered = backoff.next_wait();
            let wait = retry_after
                .map(|d| d.min(self.settings.retry_max_backoff))
                .unwrap_or(jittered);
            tracing::debug!(subscription = %sub.id, %class, wait_ms = wait.as_millis() as u64, "Delivery failed; retrying.");
            tokio::select! {
                () = shutdown.cancelled() => return Err(Failure::Interrupted),
                () = tokio::time::sleep(wait) => {}
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
            match self.deliver(sub, &id, body, shutdown).await {
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
                    if self.settings.on_failure == OnFailure::Stop {
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
            if !sub.matches(env.op, &env.source.schema, &env.source.table) {
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

fn gone_letter(sub: &Subscription) -> Letter {
    letter(
        sub,
        Some(410),
        "410 Gone: the subscription is disabled".into(),
        "gone",
    )
}

fn letter(
    sub: &Subscription,
    status: Option<u16>,
    message: String,
    reason: &'static str,
) -> Letter {
    Letter {
        reason,
        message,
        headers: vec![
            ("walrelay.dlq.subscription", sub.id.clone()),
            (
                "walrelay.dlq.url",
                walrelay_common::options::without_userinfo(&sub.url),
            ),
            (
                "walrelay.dlq.status",
                status.map_or_else(|| "none".to_string(), |s| s.to_string()),
            ),
        ],
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
        let limit = Semaphore::new(self.settings.max_concurrent_deliveries);
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
    match sink.deliver(&sub, &id, record, shutdown).await {
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
