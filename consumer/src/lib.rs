//! walrelay's consumers: Kafka consumer groups that apply change events to sinks.
//!
//! # Layout
//!
//! - [`cli`]: the commands, each with its own options (the shared ones and its sink's), the
//!   config file, the validated [`cli::Settings`] of the command given, and running it.
//! - [`config`]: the options every command shares (Kafka, batching, retries, telemetry), the
//!   runtime's settings ([`config::RuntimeSettings`]) and the TOML config file.
//! - [`topics`]: which topics are read: one `--topic`, or every topic a `--topic-pattern`
//!   selects (the producer's per-table topics), resolved again as topics come and go.
//! - [`lag`]: a group member's lag per topic-partition, from librdkafka's statistics while it
//!   fetches and from the broker while it has paused fetching (the statistics freeze then);
//!   shared by the runtime and the stream gateway's members.
//! - [`runtime`]: what every sink shares: the consumer group (cooperative rebalancing, bounded
//!   prefetch), batches, the dead-letter topic, and the rule that an offset is committed only
//!   after the sink handled it. The [`runtime::Sink`] trait is the contract a sink implements.
//! - [`sinks`]: one folder per sink, with the same file names in each: `mod.rs` (what the sink
//!   does), `config.rs` (its options and settings), `command.rs` (its commands), `sink.rs` (the
//!   [`runtime::Sink`]), `client.rs` (the service it talks to) and `encode.rs` (how an event
//!   becomes what the service receives), plus what only that sink has.
//! - [`http`]: what sinks that speak HTTP share: the SSRF guard for user-chosen targets and
//!   `Retry-After`.
//! - [`metrics`]: the `walrelay_consumer_*` catalogue.
//! - [`stream`]: the `stream` command, a WebSocket gateway (no sink): each connection a member
//!   of the consumer group it names, committing only what its client acknowledged; its
//!   `tables` patterns ([`stream::query::Tables`]) also serve `replicate --tables`.
//!
//! The binary (`main.rs`) only builds the command's settings and runs it.
//!
//! # Commands and sinks
//!
//! One word per feature, from the command to the types. The search feature is the
//! [`sinks::search`] module, [`SearchSettings`](sinks::search::SearchSettings) and
//! [`SearchSink`](sinks::search::SearchSink); its commands are `index` (keep the indexes
//! current) and `reindex` (rebuild them behind their aliases, [`sinks::search::reindex`]), and
//! `index`'s default group is `walrelay-indexer`. The webhook feature is the [`sinks::webhook`]
//! module, [`WebhookSettings`](sinks::webhook::WebhookSettings) and
//! [`WebhookSink`](sinks::webhook::WebhookSink); its commands are `notify` (deliver, and serve
//! the subscriptions API) and `replay-dead-letters`, with default groups `walrelay-notifier`
//! and `walrelay-notifier.replay`. The Postgres target is the [`sinks::postgres`] module,
//! [`ReplicateSettings`](sinks::postgres::ReplicateSettings) and
//! [`PostgresSink`](sinks::postgres::PostgresSink); its command is `replicate` (default group
//! `walrelay-replicator`, metrics `walrelay_consumer_replicate_*`). Command and metric names
//! are the ones users and dashboards already know.

pub mod cli;
pub mod config;
pub mod http;
pub mod lag;
pub mod metrics;
pub mod runtime;
pub mod sinks;
pub mod stream;
pub mod topics;
