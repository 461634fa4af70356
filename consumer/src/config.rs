//! Options from flags, `WALRELAY_*` environment variables and a TOML file, in that order of
//! precedence, then defaults. A bad value is a [`ConfigError`] naming the option; the binary
//! exits with code 2 on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use walrelay_common::options::{self, ConfigError, parse_bytes, parse_duration};
use walrelay_common::telemetry::LogFormat;

/// `walrelay-consumer`: walrelay's change events from Kafka into sinks.
#[derive(Debug, Parser)]
#[command(name = "walrelay-consumer", version, about)]
pub struct Cli {
    /// TOML file with options (keys are the long flag names with `_` for `-`).
    #[arg(
        long,
        short = 'c',
        env = "WALRELAY_CONFIG",
        global = true,
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// Options shared by every command.
    #[command(flatten)]
    pub options: Options,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The consumer's commands.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Keep search indexes (one per table, behind an alias) current, until stopped.
    Index,
    /// Build new versioned indexes from offset zero, swap the aliases when caught up, then
    /// delete the old indexes.
    Reindex,
    /// Deliver events to the subscribed webhook endpoints, and serve the subscriptions API.
    Notify,
    /// Deliver the webhook dead letters again, each to the subscription its headers name,
    /// then exit.
    ReplayDeadLetters,
}

impl Command {
    fn needs_search(self) -> bool {
        matches!(self, Command::Index | Command::Reindex)
    }

    fn default_group(self) -> &'static str {
        match self {
            Command::Index | Command::Reindex => "walrelay-indexer",
            Command::Notify => "walrelay-notifier",
            Command::ReplayDeadLetters => "walrelay-notifier.replay",
        }
    }
}

/// Every option, each unset unless given.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(
        long,
        env = "WALRELAY_KAFKA_BROKERS",
        global = true,
        value_name = "HOST:PORT,..."
    )]
    pub kafka_brokers: Option<String>,
    /// Topic the producer writes [default: walrelay.events].
    #[arg(long, env = "WALRELAY_TOPIC", global = true)]
    pub topic: Option<String>,
    /// Consumer group of the indexer [default: walrelay-indexer]. `reindex` takes the same
    /// value and derives its own group from it.
    #[arg(long, env = "WALRELAY_GROUP", global = true)]
    pub group: Option<String>,
    /// Topic for events a sink rejects or that cannot be decoded [default: <topic>.dlq].
    #[arg(long, env = "WALRELAY_DEAD_LETTER_TOPIC", global = true)]
    pub dead_letter_topic: Option<String>,
    /// Elasticsearch or OpenSearch base URL, e.g. https://search:9200.
    #[arg(long, env = "WALRELAY_SEARCH_URL", global = true, value_name = "URL")]
    pub search_url: Option<String>,
    /// User for basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_USERNAME", global = true)]
    pub search_username: Option<String>,
    /// Password for basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_PASSWORD", global = true)]
    pub search_password: Option<String>,
    /// Elasticsearch API key (the base64 `id:key` form), instead of basic authentication.
    #[arg(long, env = "WALRELAY_SEARCH_API_KEY", global = true)]
    pub search_api_key: Option<String>,
    /// PEM file of a CA to trust for https (besides the bundled web roots).
    #[arg(
        long,
        env = "WALRELAY_SEARCH_CA_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub search_ca_file: Option<PathBuf>,
    /// Alias name per table; `{db}`, `{schema}` and `{table}` are replaced, the result is
    /// lowercased [default: {schema}.{table}].
    #[arg(long, env = "WALRELAY_INDEX_TEMPLATE", global = true)]
    pub index_template: Option<String>,
    /// What a dropped table does to its index: `delete` it, or `keep` it [default: delete].
    #[arg(long, env = "WALRELAY_ON_DROP_TABLE", global = true, value_enum)]
    pub on_drop_table: Option<OnDropTable>,
    /// notify: Postgres holding the subscriptions (schema `walrelay`, created when missing).
    #[arg(long, env = "WALRELAY_POSTGRES_URL", global = true, value_name = "URL")]
    pub postgres_url: Option<String>,
    /// notify: address of the subscriptions API [default: 127.0.0.1:8089].
    #[arg(long, env = "WALRELAY_API_ADDR", global = true)]
    pub api_addr: Option<SocketAddr>,
    /// notify: bearer token the API requires (at least 16 characters).
    #[arg(
        long,
        env = "WALRELAY_API_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    /// notify: PEM certificate chain for serving the subscriptions API over HTTPS (with
    /// --api-tls-key) [default: plain HTTP].
    #[arg(
        long,
        env = "WALRELAY_API_TLS_CERT",
        global = true,
        value_name = "FILE"
    )]
    pub api_tls_cert: Option<PathBuf>,
    /// notify: PEM private key (PKCS#8, PKCS#1 or SEC1) of --api-tls-cert.
    #[arg(long, env = "WALRELAY_API_TLS_KEY", global = true, value_name = "FILE")]
    pub api_tls_key: Option<PathBuf>,
    /// notify: most subscriptions the deployment may hold; creating one more is refused with
    /// 409 [default: 1000].
    #[arg(long, env = "WALRELAY_MAX_SUBSCRIPTIONS", global = true)]
    pub max_subscriptions: Option<u64>,
    /// notify: CIDRs, addresses or host names endpoints may resolve to despite the SSRF guard,
    /// comma-separated [default: none].
    #[arg(long, env = "WALRELAY_ALLOW_TARGETS", global = true)]
    pub allow_targets: Option<String>,
    /// notify: HTTP(S) proxy every delivery goes through, e.g. http://proxy:3128; the SSRF
    /// guard still checks each target. Proxy environment variables (HTTP_PROXY, ...) are
    /// never used [default: none, direct connections].
    #[arg(
        long,
        env = "WALRELAY_WEBHOOK_PROXY",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    pub webhook_proxy: Option<String>,
    /// notify: timeout of one delivery attempt, e.g. 10s [default: 10s].
    #[arg(long, env = "WALRELAY_DELIVERY_TIMEOUT", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub delivery_timeout: Option<Duration>,
    /// notify: attempts per event and subscription before dead-lettering [default: 8].
    #[arg(long, env = "WALRELAY_MAX_ATTEMPTS", global = true)]
    pub max_attempts: Option<u32>,
    /// notify: requests in flight at most [default: 64].
    #[arg(long, env = "WALRELAY_MAX_CONCURRENT_DELIVERIES", global = true)]
    pub max_concurrent_deliveries: Option<usize>,
    /// notify: what a delivery that failed for good does: `dead-letter` and go on, or `stop`
    /// (strict) [default: dead-letter].
    #[arg(long, env = "WALRELAY_ON_DELIVERY_FAILURE", global = true, value_enum)]
    pub on_delivery_failure: Option<crate::sinks::webhook::OnFailure>,
    /// notify: how often subscriptions are reloaded from Postgres, e.g. 2s [default: 2s].
    #[arg(long, env = "WALRELAY_SUBSCRIPTIONS_REFRESH", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub subscriptions_refresh: Option<Duration>,
    /// Most events per sink batch [default: 2000].
    #[arg(long, env = "WALRELAY_BATCH_MAX_EVENTS", global = true)]
    pub batch_max_events: Option<usize>,
    /// Most bytes of events per sink batch, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "WALRELAY_BATCH_MAX_BYTES", global = true, value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub batch_max_bytes: Option<u64>,
    /// Longest wait to fill a batch, e.g. 200ms [default: 200ms].
    #[arg(long, env = "WALRELAY_BATCH_MAX_WAIT", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub batch_max_wait: Option<Duration>,
    /// Most bytes librdkafka prefetches, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "WALRELAY_MAX_QUEUED_BYTES", global = true, value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub max_queued_bytes: Option<u64>,
    /// First wait before retrying a failed sink request [default: 100ms].
    #[arg(long, env = "WALRELAY_RETRY_INITIAL_BACKOFF", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub retry_initial_backoff: Option<Duration>,
    /// Longest wait between retries [default: 30s].
    #[arg(long, env = "WALRELAY_RETRY_MAX_BACKOFF", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub retry_max_backoff: Option<Duration>,
    /// reindex: lag (events) at or under which the new indexes count as caught up and the
    /// aliases swap; the hand-over after the swap covers the rest [default: 1000].
    #[arg(long, env = "WALRELAY_CAUGHT_UP_LAG", global = true)]
    pub caught_up_lag: Option<u64>,
    /// reindex: wait between the alias swap and deleting the old indexes [default: 60s].
    #[arg(long, env = "WALRELAY_GRACE_PERIOD", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub grace_period: Option<Duration>,
    /// reindex: keep the old indexes after the swap.
    #[arg(long, env = "WALRELAY_KEEP_OLD", global = true)]
    #[serde(default)]
    pub keep_old: bool,
    /// reindex: how often progress is logged [default: 5s].
    #[arg(long, env = "WALRELAY_PROGRESS_INTERVAL", global = true, value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub progress_interval: Option<Duration>,
    /// Address of /metrics, /healthz and /readyz, e.g. 0.0.0.0:9188 [default: off].
    #[arg(long, env = "WALRELAY_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// A librdkafka property, KEY=VALUE; repeatable (env: comma-separated).
    #[arg(
        long = "kafka-property",
        env = "WALRELAY_KAFKA_PROPERTIES",
        global = true,
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    #[serde(skip)]
    pub kafka_property: Vec<String>,
    /// librdkafka properties (config file only: a `[kafka_properties]` table).
    #[arg(skip)]
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    /// Log format [default: text].
    #[arg(long, env = "WALRELAY_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl Options {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        options::read_file(path)
    }

    /// `self` where set, else `file`.
    pub fn or(self, file: Options) -> Options {
        let mut kafka_properties = file.kafka_properties;
        kafka_properties.extend(self.kafka_properties);
        Options {
            kafka_brokers: self.kafka_brokers.or(file.kafka_brokers),
            topic: self.topic.or(file.topic),
            group: self.group.or(file.group),
            dead_letter_topic: self.dead_letter_topic.or(file.dead_letter_topic),
            search_url: self.search_url.or(file.search_url),
            search_username: self.search_username.or(file.search_username),
            search_password: self.search_password.or(file.search_password),
            search_api_key: self.search_api_key.or(file.search_api_key),
            search_ca_file: self.search_ca_file.or(file.search_ca_file),
            index_template: self.index_template.or(file.index_template),
            on_drop_table: self.on_drop_table.or(file.on_drop_table),
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
            subscriptions_refresh: self.subscriptions_refresh.or(file.subscriptions_refresh),
            batch_max_events: self.batch_max_events.or(file.batch_max_events),
            batch_max_bytes: self.batch_max_bytes.or(file.batch_max_bytes),
            batch_max_wait: self.batch_max_wait.or(file.batch_max_wait),
            max_queued_bytes: self.max_queued_bytes.or(file.max_queued_bytes),
            retry_initial_backoff: self.retry_initial_backoff.or(file.retry_initial_backoff),
            retry_max_backoff: self.retry_max_backoff.or(file.retry_max_backoff),
            caught_up_lag: self.caught_up_lag.or(file.caught_up_lag),
            grace_period: self.grace_period.or(file.grace_period),
            keep_old: self.keep_old || file.keep_old,
            progress_interval: self.progress_interval.or(file.progress_interval),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            kafka_property: if self.kafka_property.is_empty() {
                file.kafka_property
            } else {
                self.kafka_property
            },
            kafka_properties,
            log_format: self.log_format.or(file.log_format),
        }
    }
}

/// How the search sink authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum SearchAuth {
    /// None.
    None,
    /// HTTP basic authentication.
    Basic {
        /// User.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: ApiKey …`.
    ApiKey(String),
}

impl std::fmt::Debug for SearchAuth {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchAuth::None => f.write_str("None"),
            SearchAuth::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
            SearchAuth::ApiKey(_) => f.write_str("ApiKey(***)"),
        }
    }
}

/// Settings of the runtime (Kafka side), shared by every sink.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Bootstrap servers.
    pub kafka_brokers: String,
    /// Topic read.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
    /// Most events per batch.
    pub batch_max_events: usize,
    /// Most bytes per batch.
    pub batch_max_bytes: usize,
    /// Longest wait to fill a batch.
    pub batch_max_wait: Duration,
    /// librdkafka prefetch cap.
    pub max_queued_bytes: usize,
    /// librdkafka properties given by the user.
    pub kafka_properties: walrelay_common::options::KafkaProperties,
}

/// Settings of the search sink.
#[derive(Debug, Clone)]
pub struct SearchSettings {
    /// Base URL.
    pub url: reqwest::Url,
    /// Authentication.
    pub auth: SearchAuth,
    /// Extra CA (PEM bytes).
    pub ca_pem: Option<Vec<u8>>,
    /// Alias template.
    pub index_template: String,
    /// What a dropped table does to its index.
    pub on_drop_table: OnDropTable,
    /// Retry backoff: first wait.
    pub retry_initial_backoff: Duration,
    /// Retry backoff: cap.
    pub retry_max_backoff: Duration,
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
pub struct ApiTls(pub std::sync::Arc<rustls::ServerConfig>);

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiTls(…)")
    }
}

/// Settings of `notify` and `replay-dead-letters`.
#[derive(Debug, Clone)]
pub struct NotifySettings {
    /// Subscriptions database.
    pub postgres: walrelay_common::postgres::PgTarget,
    /// API address.
    pub api_addr: SocketAddr,
    /// API token.
    pub api_token: ApiToken,
    /// TLS of the API, when it serves HTTPS.
    pub api_tls: Option<ApiTls>,
    /// Most subscriptions the deployment may hold.
    pub max_subscriptions: u64,
    /// Allowed targets.
    pub guard: crate::sinks::webhook::guard::Guard,
    /// Delivery.
    pub delivery: crate::sinks::webhook::WebhookSettings,
    /// Subscriptions reload interval.
    pub subscriptions_refresh: Duration,
}

/// What a dropped table does to its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnDropTable {
    /// Delete the table's index (and so its alias).
    #[default]
    Delete,
    /// Keep the index as it was.
    Keep,
}

/// Settings of `reindex`.
#[derive(Debug, Clone)]
pub struct ReindexSettings {
    /// Lag at or under which the build counts as caught up.
    pub caught_up_lag: u64,
    /// Wait before deleting the old indexes.
    pub grace_period: Duration,
    /// Keep the old indexes.
    pub keep_old: bool,
    /// Progress log interval.
    pub progress_interval: Duration,
}

/// Every validated setting.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Kafka side.
    pub runtime: RuntimeSettings,
    /// Search sink (`index`, `reindex`).
    pub search: Option<SearchSettings>,
    /// Webhook sink (`notify`, `replay-dead-letters`).
    pub webhook: Option<NotifySettings>,
    /// Re-index.
    pub reindex: ReindexSettings,
    /// Probe and metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
}

impl Settings {
    /// Applies defaults and validates.
    pub fn from_options(o: Options, command: Command) -> Result<Self, ConfigError> {
        let webhook = match command {
            Command::Notify | Command::ReplayDeadLetters => Some(notify_settings(&o)?),
            Command::Index | Command::Reindex => None,
        };
        let search = match o.search_url.clone() {
            None if command.needs_search() => return Err(ConfigError::missing("--search-url")),
            None => None,
            Some(url) => Some(search_settings(o.clone(), url)?),
        };
        let kafka_brokers = o
            .kafka_brokers
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| ConfigError::missing("--kafka-brokers"))?;
        let topic = o.topic.unwrap_or_else(|| "walrelay.events".into());
        options::check_topic("--topic", &topic)?;
        let group = o
            .group
            .clone()
            .unwrap_or_else(|| command.default_group().into());
        if group.trim().is_empty() || group.len() > 200 {
            return Err(ConfigError::new(
                "--group",
                "a group id is 1-200 characters",
            ));
        }
        let dead_letter_topic = o
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{topic}.dlq"));
        options::check_topic("--dead-letter-topic", &dead_letter_topic)?;
        if dead_letter_topic == topic {
            return Err(ConfigError::new(
                "--dead-letter-topic",
                "must differ from --topic, or rejected events would be read again",
            ));
        }
        let batch_max_events = o.batch_max_events.unwrap_or(2000);
        if !(1..=100_000).contains(&batch_max_events) {
            return Err(ConfigError::new(
                "--batch-max-events",
                "must be between 1 and 100000",
            ));
        }
        let batch_max_bytes = o.batch_max_bytes.unwrap_or(4 << 20);
        if !((64 << 10)..=(256 << 20)).contains(&batch_max_bytes) {
            return Err(ConfigError::new(
                "--batch-max-bytes",
                "must be between 64KiB and 256MiB (bulk requests of a few MiB index fastest)",
            ));
        }
        let max_queued_bytes = o.max_queued_bytes.unwrap_or(8 << 20);
        if max_queued_bytes < 1 << 20 {
            return Err(ConfigError::new(
                "--max-queued-bytes",
                "must be at least 1MiB",
            ));
        }
        let kafka_properties = options::kafka_properties(o.kafka_properties, &o.kafka_property)?;
        Ok(Self {
            runtime: RuntimeSettings {
                kafka_brokers,
                topic,
                group,
                dead_letter_topic,
                batch_max_events,
                batch_max_bytes: usize::try_from(batch_max_bytes).unwrap_or(usize::MAX),
                batch_max_wait: o.batch_max_wait.unwrap_or(Duration::from_millis(200)),
                max_queued_bytes: usize::try_from(max_queued_bytes).unwrap_or(usize::MAX),
                kafka_properties,
            },
            search,
            webhook,
            reindex: ReindexSettings {
                caught_up_lag: o.caught_up_lag.unwrap_or(1000),
                grace_period: o.grace_period.unwrap_or(Duration::from_secs(60)),
                keep_old: o.keep_old,
                progress_interval: o.progress_interval.unwrap_or(Duration::from_secs(5)),
            },
            metrics_addr: o.metrics_addr,
            log_format: o.log_format.unwrap_or_default(),
        })
    }
}

fn backoffs(o: &Options) -> Result<(Duration, Duration), ConfigError> {
    let retry_initial_backoff = o
        .retry_initial_backoff
        .unwrap_or(Duration::from_millis(100));
    let retry_max_backoff = o.retry_max_backoff.unwrap_or(Duration::from_secs(30));
    if retry_initial_backoff.is_zero() || retry_max_backoff < retry_initial_backoff {
        return Err(ConfigError::new(
            "--retry-max-backoff",
            "backoffs must be positive and the maximum at least the initial one",
        ));
    }
    Ok((retry_initial_backoff, retry_max_backoff))
}

fn notify_settings(o: &Options) -> Result<NotifySettings, ConfigError> {
    let url = o
        .postgres_url
        .as_deref()
        .ok_or_else(|| ConfigError::missing("--postgres-url"))?;
    let postgres = walrelay_common::postgres::PgTarget::parse(url)
        .map_err(|e| ConfigError::new("--postgres-url", e))?;
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
    let guard = crate::sinks::webhook::guard::Guard::parse(o.allow_targets.as_deref())
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
    let (retry_initial_backoff, retry_max_backoff) = backoffs(o)?;
    let api_tls = match (&o.api_tls_cert, &o.api_tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(ApiTls(std::sync::Arc::new(
            crate::sinks::webhook::server::tls_config(cert, key)
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
        .map(crate::sinks::webhook::ProxyUrl::parse)
        .transpose()
        .map_err(|m| ConfigError::new("--webhook-proxy", m))?;
    Ok(NotifySettings {
        postgres,
        api_addr: o
            .api_addr
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8089))),
        api_token: ApiToken(api_token),
        api_tls,
        max_subscriptions,
        guard,
        delivery: crate::sinks::webhook::WebhookSettings {
            delivery_timeout,
            max_attempts,
            retry_initial_backoff,
            retry_max_backoff,
            max_concurrent_deliveries,
            on_failure: o.on_delivery_failure.unwrap_or_default(),
            proxy,
        },
        subscriptions_refresh: o.subscriptions_refresh.unwrap_or(Duration::from_secs(2)),
    })
}

fn search_settings(o: Options, url: String) -> Result<SearchSettings, ConfigError> {
    let (retry_initial_backoff, retry_max_backoff) = backoffs(&o)?;
    let url = reqwest::Url::parse(&url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            ConfigError::new(
                "--search-url",
                format!("{url:?} is not an http(s) URL such as https://search:9200"),
            )
        })?;
    let auth = match (o.search_username, o.search_password, o.search_api_key) {
        (None, None, None) => SearchAuth::None,
        (Some(username), Some(password), None) => SearchAuth::Basic { username, password },
        (None, None, Some(key)) => SearchAuth::ApiKey(key),
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(ConfigError::new(
                "--search-username",
                "basic authentication needs both --search-username and --search-password",
            ));
        }
        (Some(_), Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "--search-api-key",
                "give either an API key or a username and password, not both",
            ));
        }
    };
    let ca_pem = match o.search_ca_file {
        None => None,
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| {
                ConfigError::new(
                    "--search-ca-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ConfigError::new(
                    "--search-ca-file",
                    format!("{} is not a PEM certificate: {e}", path.display()),
                )
            })?;
            Some(pem)
        }
    };
    let index_template = o
        .index_template
        .clone()
        .unwrap_or_else(|| "{schema}.{table}".into());
    if !index_template.contains("{table}") {
        return Err(ConfigError::new(
            "--index-template",
            format!(
                "{index_template:?} must contain {{table}}, or every table would share one index"
            ),
        ));
    }
    Ok(SearchSettings {
        url,
        auth,
        ca_pem,
        index_template,
        on_drop_table: o.on_drop_table.unwrap_or_default(),
        retry_initial_backoff,
        retry_max_backoff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Options {
        Options {
            kafka_brokers: Some("127.0.0.1:9092".into()),
            search_url: Some("http://127.0.0.1:9200".into()),
            ..Options::default()
        }
    }

    #[test]
    fn defaults_and_file_layering() {
        let file: Options = toml::from_str(
            "topic = 'from.file'\ngroup = 'file-group'\nbatch_max_wait = '1s'\nbatch_max_bytes = '3MiB'\n[kafka_properties]\n'fetch.wait.max.ms' = '50'",
        )
        .expect("valid file");
        let mut cli = base();
        cli.group = Some("cli-group".into());
        let s = Settings::from_options(cli.or(file), Command::Index).expect("valid");
        assert_eq!(s.runtime.group, "cli-group");
        assert_eq!(s.runtime.topic, "from.file");
        assert_eq!(s.runtime.dead_letter_topic, "from.file.dlq");
        assert_eq!(s.runtime.batch_max_wait, Duration::from_secs(1));
        assert_eq!(s.runtime.batch_max_bytes, 3 << 20);
        let search = s.search.expect("index has search settings");
        assert_eq!(search.index_template, "{schema}.{table}");
        assert_eq!(search.auth, SearchAuth::None);
    }

    #[test]
    fn bad_values_name_the_option() {
        type Change = Box<dyn Fn(&mut Options)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|o| o.kafka_brokers = None), "--kafka-brokers"),
            (Box::new(|o| o.search_url = None), "--search-url"),
            (
                Box::new(|o| o.search_url = Some("ftp://x".into())),
                "--search-url",
            ),
            (
                Box::new(|o| o.index_template = Some("{schema}".into())),
                "--index-template",
            ),
            (
                Box::new(|o| o.search_username = Some("u".into())),
                "--search-username",
            ),
            (
                Box::new(|o| o.batch_max_events = Some(0)),
                "--batch-max-events",
            ),
            (
                Box::new(|o| o.dead_letter_topic = Some("walrelay.events".into())),
                "--dead-letter-topic",
            ),
            (
                Box::new(|o| o.search_ca_file = Some("/nonexistent.pem".into())),
                "--search-ca-file",
            ),
        ];
        for (change, option) in cases {
            let mut o = base();
            change(&mut o);
            let err = Settings::from_options(o, Command::Index).expect_err(option);
            assert_eq!(err.option, option, "{err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let mut o = base();
        o.search_username = Some("elastic".into());
        o.search_password = Some("s3cret-pass".into());
        let s = Settings::from_options(o, Command::Index).expect("valid");
        assert!(!format!("{s:?}").contains("s3cret-pass"));
        let mut o = base();
        o.search_api_key = Some("c2VjcmV0LWtleQ==".into());
        let s = Settings::from_options(o, Command::Index).expect("valid");
        assert!(!format!("{s:?}").contains("c2VjcmV0LWtleQ=="));
        let mut o = base();
        o.search_url = None;
        o.postgres_url = Some("postgres://app:pg-s3cret@db/app".into());
        o.api_token = Some("token-token-token-1234".into());
        let s = Settings::from_options(o, Command::Notify).expect("valid");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("token-token-token-1234") && !debug.contains("pg-s3cret"),
            "{debug}"
        );
    }

    #[test]
    fn notify_options_are_checked() {
        let notify = || {
            let mut o = base();
            o.search_url = None;
            o.postgres_url = Some("postgres://app@db/app".into());
            o.api_token = Some("0123456789abcdef0123".into());
            o
        };
        let s = Settings::from_options(notify(), Command::Notify).expect("valid");
        assert_eq!(s.runtime.group, "walrelay-notifier");
        assert!(s.search.is_none());
        type Change = Box<dyn Fn(&mut Options)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|o| o.postgres_url = None), "--postgres-url"),
            (Box::new(|o| o.api_token = None), "--api-token"),
            (
                Box::new(|o| o.api_token = Some("short".into())),
                "--api-token",
            ),
            (
                Box::new(|o| o.allow_targets = Some("10.0.0.0/8,no way".into())),
                "--allow-targets",
            ),
            (Box::new(|o| o.max_attempts = Some(0)), "--max-attempts"),
            (
                Box::new(|o| o.max_concurrent_deliveries = Some(0)),
                "--max-concurrent-deliveries",
            ),
            (
                Box::new(|o| o.api_tls_cert = Some("/etc/api.crt".into())),
                "--api-tls-key",
            ),
            (
                Box::new(|o| o.api_tls_key = Some("/etc/api.key".into())),
                "--api-tls-cert",
            ),
            (
                Box::new(|o| {
                    o.api_tls_cert = Some("/nonexistent/api.crt".into());
                    o.api_tls_key = Some("/nonexistent/api.key".into());
                }),
                "--api-tls-cert",
            ),
            (
                Box::new(|o| o.max_subscriptions = Some(0)),
                "--max-subscriptions",
            ),
            (
                Box::new(|o| o.webhook_proxy = Some("socks5://proxy:1080".into())),
                "--webhook-proxy",
            ),
            (
                Box::new(|o| o.webhook_proxy = Some("proxy:3128".into())),
                "--webhook-proxy",
            ),
        ];
        for (change, option) in cases {
            let mut o = notify();
            change(&mut o);
            let err = Settings::from_options(o, Command::Notify).expect_err(option);
            assert_eq!(err.option, option, "{err}");
        }
        let mut o = notify();
        o.webhook_proxy = Some("http://user:proxy-s3cret@proxy.internal:3128".into());
        let s = Settings::from_options(o, Command::Notify).expect("valid proxy");
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("proxy-s3cret") && debug.contains("proxy.internal:3128"),
            "{debug}"
        );
        assert_eq!(s.webhook.map(|n| n.max_subscriptions), Some(1000));
    }
}
