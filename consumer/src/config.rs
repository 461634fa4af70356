//! The options every command shares (Kafka, batching, retries, telemetry), their validated
//! settings, and the TOML config file.
//!
//! Each command's options are its own clap `Args`: this module's [`Args`], flattened into every
//! command, and the options of the command's sink, which live with the sink
//! (`sinks::<sink>::config`); `cli` puts them together. Precedence is flags, then `WALRELAY_*`
//! environment variables (clap reads both), then the config file, then defaults. A bad value is
//! a [`ConfigError`] naming the option; the binary exits with code 2 on it.
//!
//! One config file may hold the keys of every command (keys are the long option names with `_`
//! for `-`): a command takes its own and leaves the others, but a key no command knows is
//! refused, as is a value of the wrong type under any known key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
pub use walrelay_common::options::ConfigError;
use walrelay_common::options::{self, parse_bytes, parse_duration};
use walrelay_common::telemetry::LogFormat;

use crate::topics::{TopicPattern, Topics};

/// The options every command shares, each unset unless given.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[group(skip)]
pub struct Args {
    /// Kafka bootstrap servers, comma-separated.
    #[arg(long, env = "WALRELAY_KAFKA_BROKERS", value_name = "HOST:PORT,...")]
    pub kafka_brokers: Option<String>,
    /// Topic the producer writes [default: walrelay.events]. Not with --topic-pattern.
    #[arg(long, env = "WALRELAY_TOPIC")]
    pub topic: Option<String>,
    /// Read every topic whose whole name matches this regular expression instead of one
    /// --topic, e.g. 'walrelay\.events\..*' for the producer's per-table topics. Matching
    /// topics created later are read within about 5 s (librdkafka's
    /// topic.metadata.refresh.interval.ms). Names ending in .dlq, .progress, .transactions or
    /// .schema-changes (walrelay's side topics) and Kafka's __ topics are skipped even when
    /// they match (see --include-side-topics). Requires --dead-letter-topic, which the pattern
    /// must not match.
    #[arg(long, env = "WALRELAY_TOPIC_PATTERN", value_name = "REGEX")]
    pub topic_pattern: Option<String>,
    /// With --topic-pattern, also read matching topics named like side topics: the topic of a
    /// table named transactions or progress, say. Write the pattern so that it leaves the real
    /// side topics out, e.g. 'walrelay\.events\.[^.]+\..+' (schema and table after the
    /// prefix; side topics have one name there).
    #[arg(long, env = "WALRELAY_INCLUDE_SIDE_TOPICS")]
    #[serde(default)]
    pub include_side_topics: bool,
    /// Consumer group [default: walrelay-indexer for index, walrelay-notifier for notify,
    /// walrelay-notifier.replay for replay-dead-letters]. `reindex` takes the value of `index`
    /// and derives its own group from it.
    #[arg(long, env = "WALRELAY_GROUP")]
    pub group: Option<String>,
    /// Topic for events a sink rejects or that cannot be decoded [default: TOPIC.dlq; required
    /// with --topic-pattern].
    #[arg(long, env = "WALRELAY_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Most events per sink batch [default: 2000].
    #[arg(long, env = "WALRELAY_BATCH_MAX_EVENTS")]
    pub batch_max_events: Option<usize>,
    /// Most bytes of events per sink batch, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "WALRELAY_BATCH_MAX_BYTES", value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub batch_max_bytes: Option<u64>,
    /// Longest wait to fill a batch, e.g. 200ms [default: 200ms].
    #[arg(long, env = "WALRELAY_BATCH_MAX_WAIT", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub batch_max_wait: Option<Duration>,
    /// Most bytes librdkafka prefetches, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "WALRELAY_MAX_QUEUED_BYTES", value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub max_queued_bytes: Option<u64>,
    /// First wait before retrying a failed sink request [default: 100ms].
    #[arg(long, env = "WALRELAY_RETRY_INITIAL_BACKOFF", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub retry_initial_backoff: Option<Duration>,
    /// Longest wait between retries [default: 30s].
    #[arg(long, env = "WALRELAY_RETRY_MAX_BACKOFF", value_parser = parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub retry_max_backoff: Option<Duration>,
    /// Address of /metrics, /healthz and /readyz, e.g. 0.0.0.0:9188 [default: off].
    #[arg(long, env = "WALRELAY_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A librdkafka property, KEY=VALUE; repeatable (env: comma-separated).
    #[arg(
        long = "kafka-property",
        env = "WALRELAY_KAFKA_PROPERTIES",
        value_delimiter = ',',
        value_name = "KEY=VALUE"
    )]
    #[serde(skip)]
    pub kafka_property: Vec<String>,
    /// Librdkafka properties (config file only: a `[kafka_properties]` table).
    #[arg(skip)]
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, String>,
    /// Log format [default: text].
    #[arg(long, env = "WALRELAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Schema registry of Avro topics (the producer's --format avro), Confluent-compatible. JSON
    /// records are read without it; an Avro record without it is dead-lettered.
    #[arg(long, env = "WALRELAY_SCHEMA_REGISTRY_URL", value_name = "URL")]
    pub schema_registry_url: Option<String>,
    /// Schema registry user (HTTP basic).
    #[arg(long, env = "WALRELAY_SCHEMA_REGISTRY_USERNAME")]
    pub schema_registry_username: Option<String>,
    /// Schema registry password (HTTP basic); prefer the environment variable.
    #[arg(
        long,
        env = "WALRELAY_SCHEMA_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    pub schema_registry_password: Option<String>,
    /// Schema registry bearer token; prefer the environment variable.
    #[arg(long, env = "WALRELAY_SCHEMA_REGISTRY_TOKEN", hide_env_values = true)]
    pub schema_registry_token: Option<String>,
    /// PEM file of CA certificates for an https schema registry.
    #[arg(long, env = "WALRELAY_SCHEMA_REGISTRY_CA_FILE", value_name = "FILE")]
    pub schema_registry_ca_file: Option<PathBuf>,
}

impl Args {
    /// `self` where set, else `file`; `--topic` and `--topic-pattern` count as one option (either
    /// set in `self` replaces both of `file`'s).
    pub fn or(self, file: Args) -> Args {
        let (topic, topic_pattern) = if self.topic.is_some() || self.topic_pattern.is_some() {
            (self.topic, self.topic_pattern)
        } else {
            (file.topic, file.topic_pattern)
        };
        let (kafka_property, kafka_properties) = options::merge_kafka_options(
            (self.kafka_property, self.kafka_properties),
            (file.kafka_property, file.kafka_properties),
        );
        Args {
            kafka_brokers: self.kafka_brokers.or(file.kafka_brokers),
            topic,
            topic_pattern,
            include_side_topics: self.include_side_topics || file.include_side_topics,
            group: self.group.or(file.group),
            dead_letter_topic: self.dead_letter_topic.or(file.dead_letter_topic),
            batch_max_events: self.batch_max_events.or(file.batch_max_events),
            batch_max_bytes: self.batch_max_bytes.or(file.batch_max_bytes),
            batch_max_wait: self.batch_max_wait.or(file.batch_max_wait),
            max_queued_bytes: self.max_queued_bytes.or(file.max_queued_bytes),
            retry_initial_backoff: self.retry_initial_backoff.or(file.retry_initial_backoff),
            retry_max_backoff: self.retry_max_backoff.or(file.retry_max_backoff),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            kafka_property,
            kafka_properties,
            log_format: self.log_format.or(file.log_format),
            schema_registry_url: self.schema_registry_url.or(file.schema_registry_url),
            schema_registry_username: self
                .schema_registry_username
                .or(file.schema_registry_username),
            schema_registry_password: self
                .schema_registry_password
                .or(file.schema_registry_password),
            schema_registry_token: self.schema_registry_token.or(file.schema_registry_token),
            schema_registry_ca_file: self
                .schema_registry_ca_file
                .or(file.schema_registry_ca_file),
        }
    }

    /// The retry backoffs (`--retry-initial-backoff`, `--retry-max-backoff`), checked.
    pub fn retry(&self) -> Result<Retry, ConfigError> {
        let initial = self
            .retry_initial_backoff
            .unwrap_or(Duration::from_millis(100));
        let max = self.retry_max_backoff.unwrap_or(Duration::from_secs(30));
        if initial.is_zero() || max < initial {
            return Err(ConfigError::new(
                "--retry-max-backoff",
                "backoffs must be positive and the maximum at least the initial one",
            ));
        }
        Ok(Retry { initial, max })
    }

    /// Applies defaults and validates; `default_group` is the command's consumer group.
    pub fn settings(self, default_group: &str) -> Result<Shared, ConfigError> {
        let retry = self.retry()?;
        let o = self;
        let kafka_brokers = o
            .kafka_brokers
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| ConfigError::missing("--kafka-brokers"))?;
        let group = o.group.clone().unwrap_or_else(|| default_group.into());
        if group.trim().is_empty() || group.len() > 200 {
            return Err(ConfigError::new(
                "--group",
                "a group id is 1-200 characters",
            ));
        }
        if o.include_side_topics && o.topic_pattern.is_none() {
            return Err(ConfigError::new(
                "--include-side-topics",
                "only with --topic-pattern (a --topic is read whatever its name)",
            ));
        }
        let pattern = o.topic_pattern.map(|p| (p, o.include_side_topics));
        let (topics, dead_letter_topic) = topics(o.topic, pattern, o.dead_letter_topic)?;
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
        let registry = walrelay_common::registry::RegistryOptions::from_flags(
            o.schema_registry_url,
            o.schema_registry_username,
            o.schema_registry_password,
            o.schema_registry_token,
            o.schema_registry_ca_file,
        )?;
        Ok(Shared {
            runtime: RuntimeSettings {
                kafka_brokers,
                topics,
                group,
                dead_letter_topic,
                batch_max_events,
                batch_max_bytes: usize::try_from(batch_max_bytes).unwrap_or(usize::MAX),
                batch_max_wait: o.batch_max_wait.unwrap_or(Duration::from_millis(200)),
                max_queued_bytes: usize::try_from(max_queued_bytes).unwrap_or(usize::MAX),
                kafka_properties,
                registry,
            },
            retry,
            metrics_addr: o.metrics_addr,
            log_format: o.log_format.unwrap_or_default(),
        })
    }
}

/// The topics read and the dead-letter topic (`--topic`, `--topic-pattern`,
/// `--dead-letter-topic`), checked: one topic or one pattern, and a dead-letter topic that is
/// not read.
fn topics(
    topic: Option<String>,
    pattern: Option<(String, bool)>,
    dead_letter_topic: Option<String>,
) -> Result<(Topics, String), ConfigError> {
    match (topic, pattern) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            "--topic-pattern",
            "give either --topic or --topic-pattern, not both (check WALRELAY_TOPIC and \
             WALRELAY_TOPIC_PATTERN too)",
        )),
        (topic, None) => {
            let topic = topic.unwrap_or_else(|| "walrelay.events".into());
            options::check_topic("--topic", &topic)?;
            let dead_letter_topic = dead_letter_topic.unwrap_or_else(|| format!("{topic}.dlq"));
            options::check_topic("--dead-letter-topic", &dead_letter_topic)?;
            if dead_letter_topic == topic {
                return Err(ConfigError::new(
                    "--dead-letter-topic",
                    "must differ from --topic, or rejected events would be read again",
                ));
            }
            Ok((Topics::One(topic), dead_letter_topic))
        }
        (None, Some((pattern, include_side_topics))) => {
            let pattern = TopicPattern::new(&pattern)
                .map_err(|e| ConfigError::new("--topic-pattern", e.to_string()))?
                .including_side_topics(include_side_topics);
            let dead_letter_topic = dead_letter_topic.ok_or_else(|| {
                ConfigError::new(
                    "--dead-letter-topic",
                    "required with --topic-pattern (there is no single topic to name it \
                     after), e.g. --dead-letter-topic walrelay.events.dlq",
                )
            })?;
            options::check_topic("--dead-letter-topic", &dead_letter_topic)?;
            pattern
                .check_dead_letter_topic(&dead_letter_topic)
                .map_err(|e| ConfigError::new("--topic-pattern", e.to_string()))?;
            Ok((Topics::Pattern(pattern), dead_letter_topic))
        }
    }
}

/// Retry backoffs of sink requests: exponential from `initial`, capped at `max`, jittered
/// (`walrelay_common::retry::Backoff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

/// The validated shared settings.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Kafka side.
    pub runtime: RuntimeSettings,
    /// Sink request retries.
    pub retry: Retry,
    /// Probe and metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
}

/// Settings of the runtime (Kafka side), shared by every sink.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    /// Bootstrap servers.
    pub kafka_brokers: String,
    /// Topics read.
    pub topics: Topics,
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
    /// The schema registry of Avro records, if given.
    pub registry: Option<walrelay_common::registry::RegistryOptions>,
}

/// The keys a serde struct accepts (what serde hands `deserialize_struct` as its fields).
pub fn keys_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe(&'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for &mut Probe {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(serde::de::Error::custom("probed"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut probe = Probe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

/// A TOML config file, read once; each command takes the sections it needs.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    path: PathBuf,
    text: String,
}

impl ConfigFile {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Ok(Self::new(path, text))
    }

    /// A file's text (`path` only names it in errors).
    pub fn new(path: &Path, text: impl Into<String>) -> Self {
        Self {
            path: path.to_path_buf(),
            text: text.into(),
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(
            "--config",
            format!(
                "{}: {message} (keys are the long option names with _ for -, e.g. kafka_brokers)",
                self.path.display()
            ),
        )
    }

    /// Refuses a key that is in none of `known` (each a command's or a sink's keys).
    pub fn check_keys(&self, known: &[&[&str]]) -> Result<(), ConfigError> {
        let table: toml::Table = toml::from_str(&self.text).map_err(|e| self.error(e.message()))?;
        for key in table.keys() {
            if !known.iter().any(|keys| keys.contains(&key.as_str())) {
                let mut all: Vec<&str> = known.iter().flat_map(|k| k.iter().copied()).collect();
                all.sort_unstable();
                all.dedup();
                return Err(self.error(format!(
                    "unknown key `{key}`, expected one of {}",
                    all.iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The keys of `T` (other keys are left to other sections).
    pub fn section<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| self.error(e.message()))
    }
}
