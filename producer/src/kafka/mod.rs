//! The Kafka side: client configuration, topic creation and the byte-bounded writer.
//!
//! ```text
//!  listener / snapshot ──send(key, value, txn)──▶ Writer ──▶ librdkafka queue ──▶ broker
//!        ▲  waits while the budget is spent            │                         │
//!        └──────── budget released ◀── delivery callback (ack: Checkpointer::acked) ◀┘
//! ```
//!
//! The budget (`--max-buffer-bytes`) counts every event from the moment it is handed to
//! librdkafka until its delivery report, so the bytes read from Postgres and not yet acked
//! never exceed it. librdkafka's own queue is sized to the same budget, and
//! `message.timeout.ms` defaults to 0 (never expire): while the broker is away, events wait in
//! the queue, the budget fills, the listener stops reading the slot, and the replication
//! client keeps sending standby status so the server does not drop us.

mod writer;

pub use writer::{WriteError, Writer, WriterOptions, broker_reachable, ensure_topic};
