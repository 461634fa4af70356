//! The webhook sink's options ([`Args`], for `notify` and `replay-dead-letters`) and their
//! validated settings ([`WebhookSettings`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use walrelay_common::options::{self, ConfigError, parse_duration};
use walrelay_common::postgres::PgTarget;

use crate::config::Retry;
use crate::http::guard::Guard;

/// The webhook sink's options, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
#[command(next_help_heading = "Webhooks")]
pub struct Args {
    /// Postgres holding the subscriptions (schema `walrelay`, created when missing).
    #[arg(long, env = "WALRELAY_POSTGRES_URL", value_name = "URL")]
    pub postgres_url: Option<String>,
    /// Address of the subscriptions API [default: 127.0.0.1:8089].
    #[arg(long, env = "WALRELAY_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Bearer token the API requires (at least 16 characters).
    #[arg(long, env = "WALRELAY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// PEM certificate chain for serving the subscriptions API over HTTPS (with
    /// --api-tls-key) [default: plain HTTP].
    #[arg(long, env = "WALRELAY_API_TLS_CERT", value_name = "FILE")]
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --api-tls-cert.
    #[arg(long, env = "WALRELAY_API_TLS_KEY", value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// Most subscriptions the deployment may hold; creating one more is refused with
    /// 409 [default: 1000].
    #[arg(long, env = "WALRELAY_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<u64>,
    /// CIDRs, addresses or host names endpoints may resolve to despite the SSRF guard,
    /// comma-separated [default: none].
    #[arg(long, env = "WALRELAY_ALLOW_TARGETS")]
    pub allow_targets: Option<String>,
    /// HTTP(S) proxy every delivery goes through, e.g. http://proxy:3128; the SSRF
    /// guard still checks each target. Proxy environment variables (HTTP_PROXY, ...) are
    /// never used [default: none, direct connections].
    #[arg(
        long,
        env = "WALRELAY_WEBHOOK_PROXY",
        value_name = "URL",
        hide_env_values = true
    )]
    pub webhook_proxy: Option<String>,
    /// Timeout of one delivery attempt, e.g. 10s [default: 10s].
    #[arg(long, env = "WALRELAY_DELIVERY_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub delivery_timeout: Option<Duration>,
    /// Attempts per event and subscription before dead-lettering [default: 8].
    #[arg(long, env = "WALRELAY_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Requests in flight at most [default: 64].
    #[arg(long, env = "WALRELAY_MAX_CONCURRENT_DELIVERIES")]
    pub max_concurrent_deliveries: Option<usize>,
    /// What a delivery that failed for good does: `dead-letter` and go on, or `stop`
    /// (strict: a definite refusal stops the notifier; a parked subscription's events are
    /// held until its endpoint is back) [default: dead-letter].
    #[arg(long, env = "WALRELAY_ON_DELIVERY_FAILURE", value_enum)]
    pub on_delivery_failure: Option<OnFailure>,
    /// A subscription whose endpoint gave no answer (nor a success) for this long while it
    /// had events, or that is still delivering this long after another subscription finished
    /// the batch, is parked; also how often a parked one is probed, e.g. 10s [default: 10s].
    #[arg(long, env = "WALRELAY_PARK_AFTER", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub park_after: Option<Duration>,
    /// Most bytes of events held in memory for parked subscriptions in strict mode; at the
    /// bound, fetching their partitions pauses, e.g. 64MiB [default: 64MiB].
    #[arg(long, env = "WALRELAY_MAX_HELD_BYTES", value_parser = options::parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub max_held_bytes: Option<u64>,
    /// How often subscriptions are reloaded from Postgres, e.g. 2s [default: 2s].
    #[arg(long, env = "WALRELAY_SUBSCRIPTIONS_REFRESH", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub subscriptions_refresh: Option<Duration>,
}

impl Args {
    /// `self` where set, else `file`.
    pub fn or(self, file: Args) -> Args {
        Args {
            postgres_url: self.postgres_url.or(file.postgres_url),
            api_addr: self.api_addr.or(file.api_addr),
            api_token: self.api_token.or(file.api_token),
            api_tls_cert: self.api_tls_cert.or(file.api_tls_cert),
            api_tls_key: self.api_tls_key.or(file.api_tls_key),
            max_subscriptions: self.max_subscriptions.or(file.max_subscriptions),
            allow_targets: self.allow_targets.or(file.allow_targets),
            webhook_proxy: self.webhook_proxy.or(file.webhook_proxy),
            delivery_timeout: self.delivery_timeout.or(file.delivery_timeout),
            max_attempts: self.max_attempts.or(file.max_attempts),
            max_concurrent_deliveries: self
                .max_concurrent_deliveries
                .or(file.max_concurrent_deliveries),
            on_delivery_failure: self.on_delivery_failure.or(file.on_delivery_failure),
            park_after: self.park_after.or(file.park_after),
            max_held_bytes: self.max_held_bytes.or(file.max_held_bytes),
            subscriptions_refresh: self.subscriptions_refresh.or(file.subscriptions_refresh),
        }
    }

    /// Applies defaults and validates (`retry`: the shared retry policy).
    pub fn settings(self, retry: Retry) -> Result<WebhookSettings, ConfigError> {
        let o = self;
        let url = o
            .postgres_url
            .as_deref()
            .ok_or_else(|| ConfigError::missing("--postgres-url"))?;
        let postgres = PgTarget::parse(url).map_err(|e| ConfigError::new("--postgres-url", e))?;
        let api_token = o
            .api_token
            .clone()
            .ok_or_else(|| ConfigError::missing("--api-token"))?;
        if api_token.len() < 16 {
            return Err(ConfigError::new(
                "--api-token",
                "use at least 16 random characters (e.g. openssl rand -hex 24)",
            ));
        }
        let guard = Guard::parse(o.allow_targets.as_deref())
            .map_err(|m| ConfigError::new("--allow-targets", m))?;
        let max_attempts = o.max_attempts.unwrap_or(8);
        if !(1..=100).contains(&max_attempts) {
            return Err(ConfigError::new(
                "--max-attempts",
                "must be between 1 and 100",
            ));
        }
        let max_concurrent_deliveries = o.max_concurrent_deliveries.unwrap_or(64);
        if !(1..=10_000).contains(&max_concurrent_deliveries) {
            return Err(ConfigError::new(
                "--max-concurrent-deliveries",
                "must be between 1 and 10000",
            ));
        }
        let delivery_timeout = o.delivery_timeout.unwrap_or(Duration::from_secs(10));
        if delivery_timeout.is_zero() {
            return Err(ConfigError::new("--delivery-timeout", "must be positive"));
        }
        let park_after = o.park_after.unwrap_or(Duration::from_secs(10));
        if park_after < Duration::from_millis(100) {
            return Err(ConfigError::new("--park-after", "must be 100ms or more"));
        }
        let max_held_bytes = o.max_held_bytes.unwrap_or(64 << 20);
        if max_held_bytes < 1 << 20 {
            return Err(ConfigError::new("--max-held-bytes", "must be 1MiB or more"));
        }
        let api_tls = match (&o.api_tls_cert, &o.api_tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ApiTls(Arc::new(
                super::server::tls_config(cert, key)
                    .map_err(|(option, message)| ConfigError::new(option, message))?,
            ))),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "--api-tls-key",
                    "--api-tls-cert needs --api-tls-key (the certificate's private key, PEM)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "--api-tls-cert",
                    "--api-tls-key needs --api-tls-cert (the certificate chain, PEM)",
                ));
            }
        };
        let max_subscriptions = o.max_subscriptions.unwrap_or(1000);
        if !(1..=1_000_000).contains(&max_subscriptions) {
            return Err(ConfigError::new(
                "--max-subscriptions",
                "must be between 1 and 1000000",
            ));
        }
        let proxy = o
            .webhook_proxy
            .as_deref()
            .map(ProxyUrl::parse)
            .transpose()
            .map_err(|m| ConfigError::new("--webhook-proxy", m))?;
        Ok(WebhookSettings {
            postgres,
            api_addr: o
                .api_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8089))),
            api_token: ApiToken(api_token),
            api_tls,
            max_subscriptions,
            guard,
            delivery: DeliverySettings {
                delivery_timeout,
                max_attempts,
                retry_initial_backoff: retry.initial,
                retry_max_backoff: retry.max,
                max_concurrent_deliveries,
                on_failure: o.on_delivery_failure.unwrap_or_default(),
                proxy,
                park_after,
                max_held_bytes: usize::try_from(max_held_bytes).unwrap_or(usize::MAX),
            },
            subscriptions_refresh: o.subscriptions_refresh.unwrap_or(Duration::from_secs(2)),
        })
    }
}

/// What a failed delivery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Dead-letter the event for that subscription and go on.
    #[default]
    DeadLetter,
    /// Strict mode: a definite refusal stops the notifier (exit 1) without committing; a
    /// parked subscription's events are held (never dead-lettered, never committed past).
    Stop,
}

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
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
    /// When a subscription is parked, and how often a parked one is probed.
    pub park_after: Duration,
    /// Most bytes held for parked subscriptions (strict mode).
    pub max_held_bytes: usize,
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

    /// The URL, credentials included (for the HTTP client only).
    pub fn url(&self) -> &Url {
        &self.0
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

/// The API's bearer token (kept out of debug output).
#[derive(Clone)]
pub struct ApiToken(pub String);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(…)")
    }
}

/// The API's TLS configuration (its debug output is only a marker: no certificate bytes).
#[derive(Clone)]
pub struct ApiTls(pub Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiTls(…)")
    }
}

/// Settings of the webhook sink: `notify` and `replay-dead-letters`.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Subscriptions database.
    pub postgres: PgTarget,
    /// API address.
    pub api_addr: SocketAddr,
    /// API token.
    pub api_token: ApiToken,
    /// TLS of the API, when it serves HTTPS.
    pub api_tls: Option<ApiTls>,
    /// Most subscriptions the deployment may hold.
    pub max_subscriptions: u64,
    /// Allowed targets.
    pub guard: Guard,
    /// Delivery.
    pub delivery: DeliverySettings,
    /// Subscriptions reload interval.
    pub subscriptions_refresh: Duration,
}
