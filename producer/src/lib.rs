//! walrelay's producer: Postgres logical replication into Kafka.
//!
//! # Layout
//!
//! - [`config`]: options from flags, environment and file; validated [`config::Settings`].
//! - [`commands`]: `check`, `init`, `status`, `destroy`.
//! - [`pipeline`]: `run`: sessions, restart policy, slot decisions, graceful shutdown.
//! - [`replication`]: the LSN-progress essay, slot state, pgoutput decoder, listener.
//! - [`snapshot`]: the initial snapshot under the slot's exported snapshot.
//! - [`checkpoint`]: which LSN may be confirmed (only what Kafka acknowledged).
//! - [`ddl`]: schema events: event-trigger capture, the schema registry, the Relation fallback.
//! - [`kafka`]: client config, topic creation, the byte-bounded writer.
//! - [`shape`], [`value`], [`catalog`]: table shapes, value conversion, catalog reads.
//! - [`metrics`]: the metric catalogue.
//!
//! ```text
//!   slot ──▶ listener ──▶ shape/value (JSON) ──▶ kafka::Writer ──▶ broker
//!     ▲                                               │ acks
//!     └──── confirmed LSN ◀── checkpoint ◀────────────┘
//! ```

pub mod catalog;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod ddl;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod replication;
pub mod shape;
pub mod snapshot;
pub mod value;
