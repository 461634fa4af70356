//! walrelay's consumers: Kafka consumer groups that apply change events to sinks.
//!
//! # Layout
//!
//! - [`config`]: options from flags, environment and file; validated [`config::Settings`].
//! - [`runtime`]: what every sink shares: the consumer group (cooperative rebalancing, bounded
//!   prefetch), batches, the dead-letter topic, and the rule that an offset is committed only
//!   after the sink handled it. The [`runtime::Sink`] trait is the contract a sink implements.
//! - [`sinks`]: the sinks; [`sinks::search`] indexes into Elasticsearch or OpenSearch,
//!   [`sinks::webhook`] delivers signed webhooks.
//! - [`reindex`]: zero-downtime re-index: build new index versions from offset zero, swap the
//!   aliases, hand over to the running indexer, delete the old indexes.
//! - [`notify`]: the webhook notifier's commands (`notify`, `replay-dead-letters`).
//! - [`metrics`]: the `walrelay_consumer_*` catalogue.
//!
//! The binary (`main.rs`) only parses options, starts telemetry and runs a command.

pub mod config;
pub mod metrics;
pub mod notify;
pub mod reindex;
pub mod runtime;
pub mod sinks;
