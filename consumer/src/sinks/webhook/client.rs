//! The webhook sink's HTTP client: one signed POST per attempt, retried with the shared
//! backoff until a final answer.
//!
//! - Proxy environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, ...) are ignored:
//!   deliveries connect directly unless `--webhook-proxy` names a proxy, and then every
//!   delivery goes through it.
//! - Redirects are not followed (a 3xx is a definite failure).
//! - Without a proxy the SSRF guard sits in the client's resolver and checks every address a
//!   connection is made to; with one, the target's host name is resolved and checked here
//!   before each attempt (see the sink's module documentation for what that guarantees).
//! - Timeouts, connection errors, 408, 425, 429 and 5xx are retried (`Retry-After` in seconds
//!   on 429 and 503 is honoured, capped by `--retry-max-backoff`), up to `--max-attempts`.
//! - A delivery permit ([`Gate`]) is held only while a request is in flight, never while
//!   backing off, and a delivery stops at once (mid-request too) when its subscription is
//!   parked or the notifier stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use walrelay_common::retry::Backoff;

use super::config::DeliverySettings;
use super::subscriptions::Subscription;
use crate::http::guard::{self, Guard, GuardedResolver, refusal_in};
use crate::metrics::Metrics;

/// Why a delivery did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The endpoint answered 410: the subscription is disabled.
    Gone,
    /// A definite answer or refusal, or the attempts ran out.
    Failed {
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What happened.
        message: String,
        /// The attempts ran out on answers worth retrying (the endpoint may come back): not a
        /// definite refusal.
        exhausted: bool,
    },
    /// Shutdown came while retrying.
    Interrupted,
}

/// What one attempt came to.
enum Outcome {
    /// A 2xx.
    Delivered,
    /// No retry will change it.
    Final(Failure),
    /// Worth another attempt.
    Retry {
        /// The metric class (`5xx`, `timeout`, ...).
        class: &'static str,
        /// The endpoint's `Retry-After`, if it gave one that counts.
        retry_after: Option<Duration>,
        /// HTTP status, when there was an answer.
        status: Option<u16>,
        /// What happened.
        message: String,
    },
}

fn failed(status: Option<u16>, message: String) -> Failure {
    Failure::Failed {
        status,
        message,
        exhausted: false,
    }
}

/// What bounds one delivery: the permits it takes (only while a request is in flight, never
/// while backing off), when it must stop, how many attempts it has, and who hears of them.
pub struct Gate<'a> {
    /// Requests in flight for every subscription (`--max-concurrent-deliveries`).
    pub limit: &'a Semaphore,
    /// The subscription's share of them in the batch being written, if any.
    pub share: Option<&'a Semaphore>,
    /// Shutdown, or the subscription parked: the delivery stops, even mid-request.
    pub stop: &'a CancellationToken,
    /// Attempts at most (`--max-attempts`; 1 for a probe).
    pub attempts: u32,
    /// Told of each attempt: `None` for an answer that settles the event (a success or a
    /// definite refusal), `Some(error)` for a failure worth retrying.
    pub report: &'a (dyn Fn(Option<&str>) + Sync),
}

impl Gate<'_> {
    /// The permits of one request, or `None` when the delivery must stop first.
    async fn permits(&self) -> Option<Vec<tokio::sync::SemaphorePermit<'_>>> {
        let take = async {
            let mut held = Vec::with_capacity(2);
            if let Some(share) = self.share {
                held.push(share.acquire().await.ok()?);
            }
            held.push(self.limit.acquire().await.ok()?);
            Some(held)
        };
        tokio::select! {
            () = self.stop.cancelled() => None,
            p = take => p,
        }
    }
}

/// Delivers signed requests to subscription endpoints.
pub struct WebhookClient {
    http: reqwest::Client,
    guard: Arc<Guard>,
    settings: DeliverySettings,
    metrics: Arc<Metrics>,
}

impl WebhookClient {
    /// A client with the delivery settings, guarded by `guard`.
    pub fn new(
        settings: DeliverySettings,
        guard: Arc<Guard>,
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
                http.proxy(reqwest::Proxy::all(proxy.url().clone())?)
            }
            None => http.dns_resolver(Arc::new(GuardedResolver(Arc::clone(&guard)))),
        };
        Ok(Self {
            http: http.build()?,
            guard,
            settings,
            metrics,
        })
    }

    /// The delivery settings.
    pub fn settings(&self) -> &DeliverySettings {
        &self.settings
    }

    fn count(&self, class: &str) {
        self.metrics
            .webhook_deliveries
            .with_label_values(&[class])
            .inc();
    }

    /// Through a proxy, the target's host name is resolved and checked here before each
    /// attempt (without one, the client's resolver checks every connection itself).
    async fn check_target(&self, url: &Url) -> Result<(), guard::Refused> {
        match (&self.settings.proxy, url.host()) {
            (Some(_), Some(url::Host::Domain(host))) => self.guard.check_host(host).await,
            _ => Ok(()),
        }
    }

    /// Delivers one event to one subscription, retrying until a final answer, within `gate`.
    pub async fn deliver(
        &self,
        sub: &Subscription,
        id: &str,
        body: &[u8],
        gate: &Gate<'_>,
    ) -> Result<(), Failure> {
        let url = Url::parse(&sub.url).map_err(|e| failed(None, format!("bad URL: {e}")))?;
        if let Err(refused) = self.guard.check_url(&url) {
            self.count("refused");
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
                self.count("refused");
                return Err(failed(None, refused.to_string()));
            }
            // The permits are held for the request only.
            let Some(permits) = gate.permits().await else {
                return Err(Failure::Interrupted);
            };
            let ts = walrelay_common::clock::now_ms() / 1000;
            let started = Instant::now();
            let request = self
                .http
                .post(url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", secret.sign(id, ts, body))
                .body(payload.clone())
                .send();
            let sent = tokio::select! {
                () = gate.stop.cancelled() => return Err(Failure::Interrupted),
                sent = request => sent,
            };
            drop(permits);
            self.metrics
                .webhook_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            let (class, retry_after, status, message) = match self.outcome(sent) {
                Outcome::Delivered => {
                    (gate.report)(None);
                    return Ok(());
                }
                Outcome::Final(failure) => {
                    (gate.report)(None);
                    return Err(failure);
                }
                Outcome::Retry {
                    class,
                    retry_after,
                    status,
                    message,
                } => (class, retry_after, status, message),
            };
            (gate.report)(Some(&message));
            if attempt >= gate.attempts {
                return Err(Failure::Failed {
                    status,
                    message: format!("{message} after {attempt} attempts"),
                    exhausted: true,
                });
            }
            self.metrics.webhook_retries.inc();
            // The backoff steps on every retry, also when the endpoint said how long to wait.
            let jittered = backoff.next_wait();
            let wait = retry_after
                .map(|d| d.min(self.settings.retry_max_backoff))
                .unwrap_or(jittered);
            tracing::debug!(subscription = %sub.id, %class, wait_ms = wait.as_millis() as u64, "Delivery failed; retrying.");
            tokio::select! {
                () = gate.stop.cancelled() => return Err(Failure::Interrupted),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Classifies an attempt's answer (or error) and counts it.
    fn outcome(&self, sent: Result<reqwest::Response, reqwest::Error>) -> Outcome {
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(why) = refusal_in(&e) {
                    self.count("refused");
                    return Outcome::Final(failed(None, why));
                }
                let class = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                self.count(class);
                return Outcome::Retry {
                    class,
                    retry_after: None,
                    status: None,
                    message: format!("{class}: {e}"),
                };
            }
        };
        let status = resp.status();
        let class = match status.as_u16() {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.count(class);
        if status.is_success() {
            return Outcome::Delivered;
        }
        if status == StatusCode::GONE {
            return Outcome::Final(Failure::Gone);
        }
        let message = format!("the endpoint answered {status}");
        if !matches!(status.as_u16(), 408 | 425 | 429 | 500..=599) {
            return Outcome::Final(failed(Some(status.as_u16()), message));
        }
        let retry_after = if matches!(status.as_u16(), 429 | 503) {
            crate::http::retry_after(resp.headers())
        } else {
            None
        };
        Outcome::Retry {
            class,
            retry_after,
            status: Some(status.as_u16()),
            message,
        }
    }
}
