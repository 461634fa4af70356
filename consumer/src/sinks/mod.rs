//! Sinks: where change events go. Each implements [`crate::runtime::Sink`] and sits in a
//! folder of its own with the same file names (Vector's layout):
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | what the sink does and guarantees; re-exports |
//! | `config.rs` | the sink's clap `Args` and its validated settings |
//! | `command.rs` | the commands that run the sink |
//! | `sink.rs` | the [`Sink`](crate::runtime::Sink) implementation |
//! | `client.rs` | the client of the service the sink writes to |
//! | `encode.rs` | how an event becomes what that service receives |
//!
//! - [`search`] (`index`, `reindex`): Elasticsearch and OpenSearch indexes, one per table,
//!   behind aliases; also `reindex.rs`, `indexes.rs`, `table.rs`, `ddl.rs` and `schema.rs`.
//! - [`webhook`] (`notify`, `replay-dead-letters`): signed HTTP deliveries to subscribed
//!   endpoints; also `subscriptions.rs`, `api.rs` and `server.rs` (the subscriptions API),
//!   `guard.rs` (the SSRF guard) and `signing.rs`.
//! - [`postgres`] (`replicate`): another Postgres database kept in sync, schema changes
//!   included; also `ddl.rs` (schema events to statements).

pub mod postgres;
pub mod search;
pub mod webhook;
