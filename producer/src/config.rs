//! Options from flags, `WALRELAY_*` environment variables and a TOML file, in that order of
//! precedence, then defaults. A bad value is a [`ConfigError`] that names the option; the
//! binary exits with code 2 on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use walrelay_common::options::{self, ConfigError, parse_bytes};
use walrelay_common::postgres::PgTarget;
use walrelay_common::telemetry::LogFormat;

use crate::catalog::TablePatterns;
use crate::encode::PartitionKey;
use crate::policy::{ColumnPolicy, MaskSalt, RowFilter};

/// `walrelay-producer`: Postgres changes into Kafka.
#[derive(Debug, Parser)]
#[command(name = "walrelay-producer", version, about)]
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

/// The producer's commands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Preflight: report whether Postgres and Kafka are ready for walrelay.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create the publication and walrelay's state (idempotent).
    Init,
    /// Snapshot when the slot is new, then stream until stopped.
    Run,
    /// Show the slot, its confirmed LSN, retained WAL and snapshot progress.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running producer to snapshot the tables matching --tables again, while it
    /// streams (an incremental snapshot), or with --cancel stop one.
    Snapshot {
        /// Only rows matching this SQL condition (over the table's columns).
        #[arg(long = "where", value_name = "SQL")]
        where_clause: Option<String>,
        /// Stop the tables' incremental snapshots under way.
        #[arg(long)]
        cancel: bool,
    },
    /// Drop the slot, the publication and walrelay's state.
    Destroy {
        /// Also when the slot is in use (its holder is disconnected).
        #[arg(long)]
        force: bool,
    },
}

/// Whether a new slot starts with a snapshot of existing rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotMode {
    /// Copy every captured row first.
    #[default]
    Initial,
    /// Stream changes only.
    Never,
}

/// What schema events carry of the DDL statement that caused them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DdlStatement {
    /// The statement as the server received it.
    Include,
    /// The statement with password literals and `password=` connection parameters replaced by
    /// `***`.
    #[default]
    Redact,
    /// No statement.
    Omit,
}

/// What a crash may leave in the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every committed change at least once; after a crash, the changes after the last
    /// confirmed position are written again (byte-identical duplicates).
    #[default]
    AtLeastOnce,
    /// Kafka transactions: each committed Postgres transaction is visible to `read_committed`
    /// consumers exactly once and whole (see `kafka::transaction`).
    ExactlyOnce,
}

/// The record format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// JSON envelopes (walrelay's and Debezium's JSON shape).
    #[default]
    Json,
    /// Avro in the Confluent wire format with a schema registry (Debezium's Avro layout).
    Avro,
}

/// Which topics the tables' events go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TopicRouting {
    /// Every table to `--topic`.
    #[default]
    Single,
    /// Each table to `<topic>.<schema>.<table>`.
    PerTable,
}

/// Where schema events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SchemaEvents {
    /// Into the data topic, to every partition, ordered with the rows (walrelay's consumers
    /// use them).
    #[default]
    Inline,
    /// To `<topic>.schema-changes` (one partition), out of the data topics.
    Topic,
}

/// Compatibility with readers of other tools' topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Compat {
    /// walrelay's own envelope.
    #[default]
    None,
    /// What an unmodified Debezium reader (Flink's `debezium-json`/`debezium-avro-confluent`,
    /// ksqlDB, Materialize) expects: `source` typed as Debezium's, schema events in
    /// `<topic>.schema-changes`, no snapshot markers in the data topics.
    Debezium,
}

/// Every option, each unset unless given.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Postgres connection (URL or key=value), database of the captured tables.
    #[arg(long, env = "WALRELAY_POSTGRES_URL", global = true, value_name = "URL")]
    pub postgres_url: Option<String>,
    /// Kafka bootstrap servers, comma-separated.
    #[arg(
        long,
        env = "WALRELAY_KAFKA_BROKERS",
        global = true,
        value_name = "HOST:PORT,..."
    )]
    pub kafka_brokers: Option<String>,
    /// Topic the events go to [default: walrelay.events].
    #[arg(long, env = "WALRELAY_TOPIC", global = true)]
    pub topic: Option<String>,
    /// Replication slot [default: walrelay].
    #[arg(long, env = "WALRELAY_SLOT", global = true)]
    pub slot: Option<String>,
    /// Publication [default: walrelay].
    #[arg(long, env = "WALRELAY_PUBLICATION", global = true)]
    pub publication: Option<String>,
    /// Captured tables: comma-separated schema.table patterns with `*` [default: every table
    /// outside system schemas].
    #[arg(long, env = "WALRELAY_TABLES", global = true, value_name = "PATTERNS")]
    pub tables: Option<String>,
    /// Columns never written: comma-separated schema.table.column patterns with `*`
    /// (e.g. public.*.password_hash) [default: none].
    #[arg(
        long,
        env = "WALRELAY_COLUMNS_EXCLUDE",
        global = true,
        value_name = "PATTERNS"
    )]
    pub columns_exclude: Option<String>,
    /// Columns written masked: comma-separated schema.table.column=hash|redact (hash: hex
    /// SHA-256 of --mask-salt and the value; redact: `***`) [default: none].
    #[arg(
        long,
        env = "WALRELAY_COLUMNS_MASK",
        global = true,
        value_name = "PATTERN=hash|redact,..."
    )]
    pub columns_mask: Option<String>,
    /// The secret salt of `hash` masks (at least 16 bytes); prefer the environment variable.
    #[arg(
        long,
        env = "WALRELAY_MASK_SALT",
        global = true,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub mask_salt: Option<MaskSalt>,
    /// A publication row filter, 'schema.table: SQL predicate'; repeatable, or several
    /// separated by `;` (env, file) [default: none].
    #[arg(
        long = "row-filter",
        env = "WALRELAY_ROW_FILTER",
        global = true,
        value_name = "SCHEMA.TABLE: PREDICATE"
    )]
    #[serde(default, deserialize_with = "string_or_list")]
    pub row_filter: Vec<String>,
    /// Kafka key, and so the unit of ordering [default: schema].
    #[arg(long, env = "WALRELAY_PARTITION_KEY", global = true, value_enum)]
    pub partition_key: Option<PartitionKey>,
    /// Partitions of the topic when walrelay creates it [default: 1].
    #[arg(long, env = "WALRELAY_TOPIC_PARTITIONS", global = true)]
    pub topic_partitions: Option<i32>,
    /// Cap on bytes read from Postgres and not yet acknowledged by Kafka, e.g. 64MiB
    /// [default: 64MiB].
    #[arg(long, env = "WALRELAY_MAX_BUFFER_BYTES", global = true, value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub max_buffer_bytes: Option<u64>,
    /// Largest event written whole, e.g. 16MiB: the Kafka client's
    /// message.max.bytes and the created topics' max.message.bytes. A larger event goes in chunks
    /// to `<topic>.oversized` and its row carries a reference in place of its largest values
    /// [default: 16MiB, or half of --max-buffer-bytes when that is less].
    #[arg(long, env = "WALRELAY_MAX_EVENT_BYTES", global = true, value_parser = parse_bytes)]
    #[serde(default, deserialize_with = "options::deserialize_bytes")]
    pub max_event_bytes: Option<u64>,
    /// Address of /metrics, /healthz and /readyz, e.g. 0.0.0.0:9187 [default: off].
    #[arg(long, env = "WALRELAY_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
    /// Snapshot a new slot's existing rows [default: initial].
    #[arg(long, env = "WALRELAY_SNAPSHOT", global = true, value_enum)]
    pub snapshot: Option<SnapshotMode>,
    /// The DDL text in schema events: include it, redact password literals, or omit it
    /// [default: redact].
    #[arg(long, env = "WALRELAY_DDL_STATEMENT", global = true, value_enum)]
    pub ddl_statement: Option<DdlStatement>,
    /// Connections reading the snapshot in parallel [default: 4].
    #[arg(long, env = "WALRELAY_SNAPSHOT_PARALLELISM", global = true)]
    pub snapshot_parallelism: Option<usize>,
    /// Heap pages per snapshot chunk (8 KiB each) [default: 4096].
    #[arg(long, env = "WALRELAY_SNAPSHOT_CHUNK_PAGES", global = true)]
    pub snapshot_chunk_pages: Option<u32>,
    /// Rows per incremental-snapshot chunk (also the most rows held in memory for one)
    /// [default: 4096].
    #[arg(long, env = "WALRELAY_INCREMENTAL_CHUNK_ROWS", global = true)]
    pub incremental_chunk_rows: Option<u32>,
    /// Delivery guarantee into Kafka [default: at-least-once].
    #[arg(long, env = "WALRELAY_DELIVERY", global = true, value_enum)]
    pub delivery: Option<Delivery>,
    /// Under exactly-once: a Kafka transaction commits when the stream pauses, or, on a busy
    /// stream, at the first Postgres commit once it is this old, e.g. 10ms [default: 10ms].
    #[arg(long, env = "WALRELAY_TRANSACTION_INTERVAL", global = true, value_parser = options::parse_duration)]
    #[serde(default, deserialize_with = "options::deserialize_duration")]
    pub transaction_interval: Option<std::time::Duration>,
    /// Under exactly-once: the Kafka transactional id, stable per slot
    /// [default: walrelay.TOPIC.DATABASE.SLOT].
    #[arg(long, env = "WALRELAY_TRANSACTIONAL_ID", global = true)]
    pub transactional_id: Option<String>,
    /// Transaction metadata: a `transaction` block in every data event and BEGIN/END records
    /// in `<topic>.transactions` (Debezium's shape) [default: off].
    #[arg(long, env = "WALRELAY_TRANSACTION_METADATA", global = true, num_args = 0..=1, default_missing_value = "true")]
    pub transaction_metadata: Option<bool>,
    /// Record format [default: json].
    #[arg(long, env = "WALRELAY_FORMAT", global = true, value_enum)]
    pub format: Option<Format>,
    /// Schema registry base URL, Confluent-compatible (required with --format avro).
    #[arg(
        long,
        env = "WALRELAY_SCHEMA_REGISTRY_URL",
        global = true,
        value_name = "URL"
    )]
    pub schema_registry_url: Option<String>,
    /// Schema registry user (HTTP basic).
    #[arg(long, env = "WALRELAY_SCHEMA_REGISTRY_USERNAME", global = true)]
    pub schema_registry_username: Option<String>,
    /// Schema registry password (HTTP basic); prefer the environment variable.
    #[arg(
        long,
        env = "WALRELAY_SCHEMA_REGISTRY_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub schema_registry_password: Option<String>,
    /// Schema registry bearer token; prefer the environment variable.
    #[arg(
        long,
        env = "WALRELAY_SCHEMA_REGISTRY_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub schema_registry_token: Option<String>,
    /// PEM file of CA certificates for an https schema registry.
    #[arg(
        long,
        env = "WALRELAY_SCHEMA_REGISTRY_CA_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub schema_registry_ca_file: Option<PathBuf>,
    /// Subject naming: auto (topic-record-name with one topic, topic-name with per-table
    /// topics), topic-name, record-name, topic-record-name [default: auto].
    #[arg(long, env = "WALRELAY_SUBJECT_STRATEGY", global = true, value_enum)]
    pub subject_strategy: Option<crate::avro::SubjectStrategy>,
    /// One topic for every table, or `<topic>.<schema>.<table>` per table [default: single].
    #[arg(long, env = "WALRELAY_TOPIC_ROUTING", global = true, value_enum)]
    pub topic_routing: Option<TopicRouting>,
    /// Schema events inline in the data topics or in `<topic>.schema-changes`
    /// [default: inline; topic under --compat debezium].
    #[arg(long, env = "WALRELAY_SCHEMA_EVENTS", global = true, value_enum)]
    pub schema_events: Option<SchemaEvents>,
    /// Write topics that unmodified Debezium readers accept [default: none].
    #[arg(long, env = "WALRELAY_COMPAT", global = true, value_enum)]
    pub compat: Option<Compat>,
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

/// A file value given as one string or as a list of strings.
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn bad(option: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(option, message)
}

impl Options {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        options::read_file(path)
    }

    /// `self` where set, else `file`.
    pub fn or(self, file: Options) -> Options {
        let (kafka_property, kafka_properties) = options::merge_kafka_options(
            (self.kafka_property, self.kafka_properties),
            (file.kafka_property, file.kafka_properties),
        );
        Options {
            postgres_url: self.postgres_url.or(file.postgres_url),
            kafka_brokers: self.kafka_brokers.or(file.kafka_brokers),
            topic: self.topic.or(file.topic),
            slot: self.slot.or(file.slot),
            publication: self.publication.or(file.publication),
            tables: self.tables.or(file.tables),
            columns_exclude: self.columns_exclude.or(file.columns_exclude),
            columns_mask: self.columns_mask.or(file.columns_mask),
            mask_salt: self.mask_salt.or(file.mask_salt),
            row_filter: if self.row_filter.is_empty() {
                file.row_filter
            } else {
                self.row_filter
            },
            partition_key: self.partition_key.or(file.partition_key),
            topic_partitions: self.topic_partitions.or(file.topic_partitions),
            max_buffer_bytes: self.max_buffer_bytes.or(file.max_buffer_bytes),
            max_event_bytes: self.max_event_bytes.or(file.max_event_bytes),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            snapshot: self.snapshot.or(file.snapshot),
            ddl_statement: self.ddl_statement.or(file.ddl_statement),
            snapshot_parallelism: self.snapshot_parallelism.or(file.snapshot_parallelism),
            snapshot_chunk_pages: self.snapshot_chunk_pages.or(file.snapshot_chunk_pages),
            incremental_chunk_rows: self.incremental_chunk_rows.or(file.incremental_chunk_rows),
            delivery: self.delivery.or(file.delivery),
            transaction_interval: self.transaction_interval.or(file.transaction_interval),
            transactional_id: self.transactional_id.or(file.transactional_id),
            transaction_metadata: self.transaction_metadata.or(file.transaction_metadata),
            format: self.format.or(file.format),
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
            subject_strategy: self.subject_strategy.or(file.subject_strategy),
            topic_routing: self.topic_routing.or(file.topic_routing),
            schema_events: self.schema_events.or(file.schema_events),
            compat: self.compat.or(file.compat),
            kafka_property,
            kafka_properties,
            log_format: self.log_format.or(file.log_format),
        }
    }
}

/// Validated settings with defaults applied.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Postgres connection, TLS included (see [`walrelay_common::postgres`]).
    pub postgres: PgTarget,
    /// Kafka bootstrap servers, when given.
    pub kafka_brokers: Option<String>,
    /// Topic.
    pub topic: String,
    /// Slot.
    pub slot: String,
    /// Publication.
    pub publication: String,
    /// Captured tables.
    pub tables: TablePatterns,
    /// Excluded and masked columns, with the salt (see [`crate::policy`]).
    pub columns: std::sync::Arc<ColumnPolicy>,
    /// Publication row filters.
    pub row_filters: Vec<RowFilter>,
    /// Keying.
    pub partition_key: PartitionKey,
    /// Partitions for a new topic.
    pub topic_partitions: i32,
    /// Byte budget.
    pub max_buffer_bytes: usize,
    /// Largest event written whole (`--max-event-bytes`).
    pub max_event_bytes: usize,
    /// Probe and metrics address.
    pub metrics_addr: Option<SocketAddr>,
    /// Snapshot mode.
    pub snapshot: SnapshotMode,
    /// DDL text in schema events.
    pub ddl_statement: DdlStatement,
    /// Snapshot connections.
    pub snapshot_parallelism: usize,
    /// Pages per snapshot chunk.
    pub snapshot_chunk_pages: u32,
    /// Rows per incremental-snapshot chunk.
    pub incremental_chunk_rows: u32,
    /// Delivery guarantee.
    pub delivery: Delivery,
    /// Under exactly-once: how long a Kafka transaction gathers Postgres transactions.
    pub transaction_interval: std::time::Duration,
    /// Under exactly-once: the transactional id.
    pub transactional_id: String,
    /// Transaction metadata in events and `<topic>.transactions`.
    pub transaction_metadata: bool,
    /// Record format.
    pub format: Format,
    /// The schema registry (`--format avro`).
    pub registry: Option<walrelay_common::registry::RegistryOptions>,
    /// Subject naming.
    pub subject_strategy: crate::avro::SubjectStrategy,
    /// Topic per table or one topic.
    pub topic_routing: TopicRouting,
    /// Where schema events go.
    pub schema_events: SchemaEvents,
    /// Debezium compatibility.
    pub compat: Compat,
    /// librdkafka properties.
    pub kafka_properties: walrelay_common::options::KafkaProperties,
    /// Log format.
    pub log_format: LogFormat,
}

fn valid_name(s: &str, max: usize, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || extra.contains(&c))
}

impl Settings {
    /// Applies defaults and validates.
    pub fn from_options(o: Options) -> Result<Self, ConfigError> {
        let url = o
            .postgres_url
            .ok_or_else(|| ConfigError::missing("--postgres-url"))?;
        let postgres = PgTarget::parse(&url).map_err(|e| bad("--postgres-url", e))?;
        if postgres.config.get_hosts().is_empty() {
            return Err(bad("--postgres-url", "no host given"));
        }
        let topic = o.topic.unwrap_or_else(|| "walrelay.events".into());
        options::check_topic("--topic", &topic)?;
        let slot = o.slot.unwrap_or_else(|| "walrelay".into());
        if !valid_name(&slot, 63, &[]) || slot.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(bad(
                "--slot",
                format!("{slot:?}: a slot name is 1-63 of [a-z0-9_]"),
            ));
        }
        let publication = o.publication.unwrap_or_else(|| "walrelay".into());
        if publication.is_empty() || publication.len() > 63 {
            return Err(bad(
                "--publication",
                "a publication name is 1-63 characters",
            ));
        }
        let tables = TablePatterns::parse(o.tables.as_deref()).map_err(|m| bad("--tables", m))?;
        let columns = column_policy(o.columns_exclude, o.columns_mask, o.mask_salt)?;
        let row_filters =
            crate::policy::parse_row_filters(&o.row_filter).map_err(|m| bad("--row-filter", m))?;
        let topic_partitions = o.topic_partitions.unwrap_or(1);
        if topic_partitions < 1 {
            return Err(bad("--topic-partitions", "must be at least 1"));
        }
        let max_buffer_bytes = o.max_buffer_bytes.unwrap_or(64 << 20);
        if max_buffer_bytes < 1 << 20 {
            return Err(bad("--max-buffer-bytes", "must be at least 1MiB"));
        }
        // The default leaves room in a small buffer: 16MiB, or half the buffer.
        let max_event_bytes = o
            .max_event_bytes
            .unwrap_or((16 << 20).min(max_buffer_bytes / 2));
        if !(64 << 10..=512 << 20).contains(&max_event_bytes) {
            return Err(bad("--max-event-bytes", "must be between 64KiB and 512MiB"));
        }
        if max_event_bytes + (64 << 10) > max_buffer_bytes {
            return Err(bad(
                "--max-event-bytes",
                "must be at least 64KiB below --max-buffer-bytes (an event must fit the buffer): \
                 lower it or raise --max-buffer-bytes",
            ));
        }
        let snapshot_parallelism = o.snapshot_parallelism.unwrap_or(4);
        if !(1..=64).contains(&snapshot_parallelism) {
            return Err(bad("--snapshot-parallelism", "must be between 1 and 64"));
        }
        let snapshot_chunk_pages = o.snapshot_chunk_pages.unwrap_or(4096);
        if snapshot_chunk_pages < 1 {
            return Err(bad("--snapshot-chunk-pages", "must be at least 1"));
        }
        let incremental_chunk_rows = o.incremental_chunk_rows.unwrap_or(4096);
        if !(1..=1_000_000).contains(&incremental_chunk_rows) {
            return Err(bad(
                "--incremental-chunk-rows",
                "must be between 1 and 1000000",
            ));
        }
        let kafka_properties = options::kafka_properties(o.kafka_properties, &o.kafka_property)?;
        if kafka_properties.get("message.max.bytes").is_some() {
            return Err(bad(
                "--kafka-property message.max.bytes",
                "walrelay sets it from --max-event-bytes (with the topics' max.message.bytes): \
                 use --max-event-bytes instead",
            ));
        }
        let transaction_interval = o
            .transaction_interval
            .unwrap_or(std::time::Duration::from_millis(10));
        if transaction_interval > std::time::Duration::from_secs(60) {
            return Err(bad(
                "--transaction-interval",
                "must be at most 60s (a Kafka transaction open longer holds back every read_committed consumer)",
            ));
        }
        let database = postgres
            .config
            .get_dbname()
            .or(postgres.config.get_user())
            .unwrap_or("postgres")
            .to_string();
        let transactional_id = o
            .transactional_id
            .unwrap_or_else(|| format!("walrelay.{topic}.{database}.{slot}"));
        if transactional_id.trim().is_empty() || transactional_id.len() > 249 {
            return Err(bad(
                "--transactional-id",
                "a transactional id is 1-249 characters",
            ));
        }
        let format = o.format.unwrap_or_default();
        let registry = registry_options(
            format,
            o.schema_registry_url,
            o.schema_registry_username,
            o.schema_registry_password,
            o.schema_registry_token,
            o.schema_registry_ca_file,
        )?;
        let compat = o.compat.unwrap_or_default();
        let schema_events = match (o.schema_events, compat) {
            (Some(SchemaEvents::Inline), Compat::Debezium) => {
                return Err(bad(
                    "--schema-events",
                    "inline schema events break Debezium readers: leave --schema-events unset (or `topic`) with --compat debezium",
                ));
            }
            (Some(e), _) => e,
            (None, Compat::Debezium) => SchemaEvents::Topic,
            (None, Compat::None) => SchemaEvents::Inline,
        };
        Ok(Self {
            format,
            registry,
            subject_strategy: o.subject_strategy.unwrap_or_default(),
            topic_routing: o.topic_routing.unwrap_or_default(),
            schema_events,
            compat,
            postgres,
            kafka_brokers: o.kafka_brokers.filter(|b| !b.trim().is_empty()),
            topic,
            slot,
            publication,
            tables,
            columns: std::sync::Arc::new(columns),
            row_filters,
            partition_key: o.partition_key.unwrap_or_default(),
            topic_partitions,
            max_buffer_bytes: usize::try_from(max_buffer_bytes).unwrap_or(usize::MAX),
            max_event_bytes: usize::try_from(max_event_bytes).unwrap_or(usize::MAX),
            metrics_addr: o.metrics_addr,
            snapshot: o.snapshot.unwrap_or_default(),
            ddl_statement: o.ddl_statement.unwrap_or_default(),
            snapshot_parallelism,
            snapshot_chunk_pages,
            incremental_chunk_rows,
            delivery: o.delivery.unwrap_or_default(),
            transaction_interval,
            transactional_id,
            transaction_metadata: o.transaction_metadata.unwrap_or(false),
            kafka_properties,
            log_format: o.log_format.unwrap_or_default(),
        })
    }

    /// The brokers, or an error naming the option.
    pub fn require_brokers(&self) -> Result<&str, ConfigError> {
        self.kafka_brokers
            .as_deref()
            .ok_or_else(|| ConfigError::missing("--kafka-brokers"))
    }

    /// The Kafka writer's options (with Kafka transactions under `--delivery exactly-once`).
    pub fn writer_options(&self, brokers: &str) -> crate::kafka::WriterOptions {
        crate::kafka::WriterOptions {
            brokers: brokers.to_string(),
            topic: self.topic.clone(),
            max_buffer_bytes: self.max_buffer_bytes,
            max_event_bytes: self.max_event_bytes,
            properties: self.kafka_properties.to_map(),
            transactions: (self.delivery == Delivery::ExactlyOnce).then(|| {
                crate::kafka::TransactionOptions {
                    id: self.transactional_id.clone(),
                    progress_topic: format!("{}.progress", self.topic),
                    interval: self.transaction_interval,
                }
            }),
        }
    }

    /// The emitter's routing.
    pub fn routing(&self) -> crate::emit::Routing {
        crate::emit::Routing {
            topic: std::sync::Arc::from(self.topic.as_str()),
            per_table: self.topic_routing == TopicRouting::PerTable,
            schema_topic: (self.schema_events == SchemaEvents::Topic)
                .then(|| std::sync::Arc::from(self.schema_topic().as_str())),
            markers: self.compat == Compat::None,
        }
    }

    /// `<topic>.schema-changes`.
    pub fn schema_topic(&self) -> String {
        format!("{}.schema-changes", self.topic)
    }

    /// Database name.
    pub fn database(&self) -> String {
        self.postgres
            .config
            .get_dbname()
            .or(self.postgres.config.get_user())
            .unwrap_or("postgres")
            .to_string()
    }
}

/// `--columns-exclude`, `--columns-mask` and `--mask-salt`, checked together. Messages never
/// carry the salt.
fn column_policy(
    exclude: Option<String>,
    mask: Option<String>,
    salt: Option<MaskSalt>,
) -> Result<ColumnPolicy, ConfigError> {
    let exclude =
        ColumnPolicy::parse_exclude(exclude.as_deref()).map_err(|m| bad("--columns-exclude", m))?;
    let mask = ColumnPolicy::parse_mask(mask.as_deref()).map_err(|m| bad("--columns-mask", m))?;
    let policy = ColumnPolicy::new(exclude, mask, salt.unwrap_or_default());
    if policy.hashes() && policy.salt_len() < crate::policy::MIN_SALT_BYTES {
        return Err(bad(
            "--mask-salt",
            format!(
                "a hash mask needs a secret salt of at least {} bytes (without one, anyone can hash candidate values and match them); set WALRELAY_MASK_SALT, e.g. to the output of `openssl rand -hex 32`, and keep it stable: a new salt changes every hash",
                crate::policy::MIN_SALT_BYTES
            ),
        ));
    }
    Ok(policy)
}

/// The registry options, required with `--format avro` and refused without it.
fn registry_options(
    format: Format,
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    ca_file: Option<PathBuf>,
) -> Result<Option<walrelay_common::registry::RegistryOptions>, ConfigError> {
    if format == Format::Json {
        if url.is_some() {
            return Err(bad(
                "--schema-registry-url",
                "is used by --format avro only; add --format avro or drop it",
            ));
        }
        return Ok(None);
    }
    if url.is_none() {
        return Err(bad(
            "--schema-registry-url",
            "--format avro needs a Confluent-compatible schema registry, e.g. http://127.0.0.1:8081",
        ));
    }
    walrelay_common::registry::RegistryOptions::from_flags(url, username, password, token, ca_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str) -> Options {
        Options {
            postgres_url: Some(url.into()),
            ..Options::default()
        }
    }

    #[test]
    fn flags_win_over_file_and_defaults_fill_in() {
        let file: Options = toml::from_str(
            "postgres_url = 'postgres://f@h/db'\ntopic = 'from.file'\nslot = 'fileslot'\nmax_buffer_bytes = '8MiB'\n[kafka_properties]\n'linger.ms' = '9'",
        )
        .expect("valid file");
        let mut cli = opts("postgres://c@h/db");
        cli.slot = Some("cli_slot".into());
        let s = Settings::from_options(cli.or(file)).expect("valid");
        assert_eq!(s.slot, "cli_slot");
        assert_eq!(s.topic, "from.file");
        assert_eq!(s.publication, "walrelay");
        assert_eq!(s.max_buffer_bytes, 8 << 20);
        assert_eq!(
            s.kafka_properties.get("linger.ms").map(String::as_str),
            Some("9")
        );
        assert_eq!(s.postgres.config.get_user(), Some("c"));
    }

    #[test]
    fn max_event_bytes_fits_the_buffer_and_owns_message_max_bytes() {
        let s = Settings::from_options(opts("postgres://u@h/db")).expect("valid");
        assert_eq!(s.max_event_bytes, 16 << 20);
        let o = Options {
            max_buffer_bytes: Some(8 << 20),
            ..opts("postgres://u@h/db")
        };
        assert_eq!(
            Settings::from_options(o).expect("valid").max_event_bytes,
            4 << 20,
            "half of a small buffer"
        );
        let o = Options {
            max_event_bytes: Some(64 << 20),
            ..opts("postgres://u@h/db")
        };
        let e = Settings::from_options(o).expect_err("over the buffer");
        assert_eq!(e.option, "--max-event-bytes");
        assert!(e.to_string().contains("--max-buffer-bytes"), "{e}");
        let o = Options {
            kafka_property: vec!["message.max.bytes=2000000".into()],
            ..opts("postgres://u@h/db")
        };
        let e = Settings::from_options(o).expect_err("refused");
        assert!(e.to_string().contains("--max-event-bytes"), "{e}");
    }

    #[test]
    fn bad_values_name_the_option() {
        let mut o = opts("postgres://u@h/db");
        o.slot = Some("Bad-Slot".into());
        assert_eq!(Settings::from_options(o).expect_err("bad").option, "--slot");
        let mut o = opts("postgres://u@h/db");
        o.tables = Some("nodot".into());
        assert_eq!(
            Settings::from_options(o).expect_err("bad").option,
            "--tables"
        );
        assert_eq!(
            Settings::from_options(Options::default())
                .expect_err("bad")
                .option,
            "--postgres-url"
        );
        let mut o = opts("postgres://u@h/db");
        o.format = Some(Format::Avro);
        assert_eq!(
            Settings::from_options(o).expect_err("no registry").option,
            "--schema-registry-url"
        );
        let mut o = opts("postgres://u@h/db");
        o.schema_registry_url = Some("http://127.0.0.1:1".into());
        assert_eq!(
            Settings::from_options(o).expect_err("json").option,
            "--schema-registry-url"
        );
        let mut o = opts("postgres://u@h/db");
        o.format = Some(Format::Avro);
        o.schema_registry_url = Some("http://127.0.0.1:1".into());
        o.schema_registry_username = Some("u".into());
        assert_eq!(
            Settings::from_options(o).expect_err("no password").option,
            "--schema-registry-username"
        );
        let mut o = opts("postgres://u@h/db");
        o.compat = Some(Compat::Debezium);
        o.schema_events = Some(SchemaEvents::Inline);
        assert_eq!(
            Settings::from_options(o).expect_err("inline").option,
            "--schema-events"
        );
        let mut o = opts("postgres://u@h/db");
        o.compat = Some(Compat::Debezium);
        let s = Settings::from_options(o).expect("valid");
        assert_eq!(s.schema_events, SchemaEvents::Topic);
        assert!(!s.routing().markers);
        let mut o = opts("postgres://u@h/db");
        o.columns_exclude = Some("public.users".into());
        let e = Settings::from_options(o).expect_err("bad pattern");
        assert_eq!(e.option, "--columns-exclude");
        let unknown = toml::from_str::<Options>("slott = 'x'");
        assert!(unknown.is_err(), "unknown keys are refused");
    }

    fn error_text(e: &ConfigError) -> String {
        e.to_string()
    }

    #[test]
    fn what_leaves_the_database_options() {
        let salt = "s3cret-salt-0123456789";
        let mut o = opts("postgres://u@h/db");
        o.columns_exclude = Some("public.*.password_hash, app.users.ssn".into());
        o.columns_mask = Some("public.users.email=hash,public.users.phone=redact".into());
        o.mask_salt = Some(MaskSalt::new(salt));
        o.row_filter = vec!["public.orders: region = 'eu'; public.items: qty > 0".into()];
        let s = Settings::from_options(o.clone()).expect("valid");
        assert_eq!(s.columns.excluded().len(), 2);
        assert_eq!(s.columns.masked().len(), 2);
        assert_eq!(s.row_filters.len(), 2);
        assert!(!format!("{s:?}").contains(salt), "Debug shows the salt");
        assert!(!format!("{o:?}").contains(salt), "Debug shows the salt");

        let mut bad_pattern = o.clone();
        bad_pattern.columns_exclude = Some("public.users".into());
        let e = Settings::from_options(bad_pattern).expect_err("bad pattern");
        assert_eq!(e.option, "--columns-exclude");
        assert!(
            error_text(&e)
                .contains("column pattern \"public.users\" is not of the form schema.table.column"),
            "{e}"
        );

        let mut bad_kind = o.clone();
        bad_kind.columns_mask = Some("public.users.email=md5".into());
        let e = Settings::from_options(bad_kind).expect_err("bad kind");
        assert_eq!(e.option, "--columns-mask");
        assert!(error_text(&e).contains("unknown mask \"md5\""), "{e}");

        let mut short_salt = o.clone();
        short_salt.mask_salt = Some(MaskSalt::new("short"));
        let e = Settings::from_options(short_salt).expect_err("short salt");
        assert_eq!(e.option, "--mask-salt");
        assert!(!error_text(&e).contains("short\""), "{e}");
        let mut no_salt = o.clone();
        no_salt.mask_salt = None;
        assert_eq!(
            Settings::from_options(no_salt).expect_err("no salt").option,
            "--mask-salt"
        );
        // Redaction alone needs no salt.
        let mut redact_only = o.clone();
        redact_only.mask_salt = None;
        redact_only.columns_mask = Some("public.users.phone=redact".into());
        assert!(Settings::from_options(redact_only).is_ok());

        let mut bad_filter = o;
        bad_filter.row_filter = vec!["orders: region = 'eu'".into()];
        let e = Settings::from_options(bad_filter).expect_err("bad filter");
        assert_eq!(e.option, "--row-filter");
        assert!(error_text(&e).contains("not a schema.table pattern"), "{e}");

        // The key check, as `init`/`run` apply it to each captured table.
        let e = s
            .columns
            .check_key("app", "users", &["ssn"])
            .expect_err("excluded key column");
        assert!(
            e.to_string()
                .contains("column \"ssn\" of app.users is part of its key"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("Mask it instead (--columns-mask app.users.ssn=hash"),
            "{e}"
        );

        let file: Options = toml::from_str(
            "postgres_url = 'postgres://f@h/db'\nrow_filter = ['public.a: x > 1', 'public.b: y > 2']\ncolumns_mask = 'public.a.z=redact'",
        )
        .expect("valid file");
        let s = Settings::from_options(Options::default().or(file)).expect("valid");
        assert_eq!(s.row_filters.len(), 2);
        assert_eq!(s.columns.masked().len(), 1);
    }
}
