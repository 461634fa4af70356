//! What walrelay's producer and consumers share, and nothing more.
//!
//! # Layout
//!
//! - [`codec`]: how events are read back from Kafka records (JSON today; the seam for Avro).
//! - [`clock`]: wall-clock time in milliseconds or microseconds since the Unix epoch.
//! - [`event`]: the change-event envelope as it travels through Kafka (Debezium-shaped JSON), the
//!   operation codes, and how an envelope is read back.
//! - [`kafka`]: a quiet librdkafka client context and topic creation with unlimited retention.
//! - [`oversized`]: events over `--max-event-bytes`: the chunk topic, the reference a row
//!   carries in their place, and putting the whole event together again.
//! - [`options`]: what every binary's options share: the error naming a bad option, sizes,
//!   durations, the TOML file, Kafka properties (refusing unsafe ones) and topic names.
//! - [`postgres`]: libpq-style connection strings with `sslmode`, `sslrootcert`, `sslcert` and
//!   `sslkey` (rustls), for every Postgres connection walrelay opens.
//! - [`registry`]: a Confluent-compatible schema registry client (register, look up by id,
//!   cached) and the Confluent wire format.
//! - [`retry`]: the shared retry policy (capped exponential backoff with jitter); callers only
//!   classify failures as transient or definite.
//! - [`signal`]: a cancellation token for SIGTERM/SIGINT.
//! - [`sync`]: locking a mutex whose previous holder panicked.
//! - [`transaction`]: transaction metadata (`--transaction-metadata`): the events' `transaction`
//!   block and the `BEGIN`/`END` records of `<topic>.transactions`, in Debezium's shape.
//! - [`telemetry`]: the Prometheus registry, the `/metrics`, `/healthz` and `/readyz` server, and
//!   logging set-up.
//!
//! # Data flow of the whole system
//!
//! ```text
//! Postgres ──slot (pgoutput)──▶ producer ──JSON envelopes, keyed──▶ Kafka ──▶ consumers ──▶ sinks
//!    ▲                                                                │
//!    └──── confirmed LSN: only what Kafka acknowledged ◀──────────────┘
//! ```

pub mod clock;
pub mod codec;
pub mod event;
pub mod kafka;
pub mod options;
pub mod oversized;
pub mod postgres;
pub mod registry;
pub mod retry;
pub mod signal;
pub mod sync;
pub mod telemetry;
pub mod transaction;
