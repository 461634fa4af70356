//! walrelay's producer: Postgres logical replication into Kafka.
//!
//! # Layout
//!
//! - [`config`]: options from flags, environment and file; validated [`config::Settings`].
//! - [`commands`]: `check`, `init`, `status`, `destroy`.
//! - [`pipeline`]: `run`: sessions, restart policy, slot decisions, graceful shutdown.
//! - [`replication`]: the LSN-progress essay, slot state, pgoutput decoder, listener.
//! - [`snapshot`]: the initial snapshot under the slot's exported snapshot.
//! - [`incremental`]: incremental (re-)snapshots while streaming: key-ordered chunks between
//!   watermarks, requested through `walrelay.snapshot_signal` (`walrelay-producer snapshot`).
//! - [`error`]: [`error::RunError`], why a session ends: transient (a new session) or definite.
//! - [`checkpoint`]: which LSN may be confirmed (only what Kafka acknowledged).
//! - [`ddl`]: schema events: event-trigger capture, the schema registry, the Relation fallback.
//! - [`emit`]: the output seam: encoding, routing (by key, one or every partition), the writer;
//!   the listener, the snapshot and schema events all send through it.
//! - [`avro`]: the Avro codec: Debezium's Avro layout, the Confluent wire format, schema
//!   registration per table shape.
//! - [`kafka`]: client config, topic creation, the byte-bounded writer.
//! - [`encode`]: how a row becomes a Kafka record: table shapes pre-rendered, the key, the JSON
//!   envelope (the producer's codec); [`value`]: Postgres text to JSON values; [`catalog`]:
//!   catalog reads.
//! - [`policy`]: what leaves the database: excluded and masked columns (applied by the
//!   emitter to every event), publication row filters (`init`, the snapshot).
//! - [`metrics`]: the metric catalogue.
//!
//! ```text
//!   slot ──▶ listener ──▶ emit (encode, route) ──▶ kafka::Writer ──▶ broker
//!     ▲                                               │ acks
//!     └──── confirmed LSN ◀── checkpoint ◀────────────┘
//! ```

pub mod avro;
pub mod catalog;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod ddl;
pub mod emit;
pub mod encode;
pub mod error;
pub mod incremental;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod replication;
pub mod snapshot;
pub mod value;
