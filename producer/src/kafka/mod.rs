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
//!
//! # A spent budget
//!
//! Each delivery report returns its event's bytes. If a sender waiting on a spent budget took
//! just its own event's bytes, every acknowledgement would wake it for one event, and it would
//! sleep again at once: a hand-over between the delivery thread and the listener per event
//! (45–70k context switches a second measured on the listener's thread), costly enough on two
//! cores that delivery fell behind and the budget tended to stay full (the "buffer full" mode
//! of the stream benchmark, peak RSS ~100 MiB instead of ~22 with a 64 MiB budget). So a
//! waiting sender asks for at least 1/8 of the budget, takes it when that much is free, and
//! gives back at once what its event does not use: one wake-up per eighth of the budget.
//! The bound is the same (the bytes in flight never exceed the budget), and a budget that is
//! not spent costs nothing (the first attempt takes the event's bytes or fails without
//! waiting). Waiters are served in order (tokio's semaphore is fair), so the
//! snapshot's parallel readers cannot starve one another.
//!
//! # Starting up
//!
//! The producer is idempotent: nothing leaves librdkafka before it has a producer id, and
//! librdkafka asks for one only when a metadata answer arrives while a broker connection is up,
//! or on a 500 ms retry timer. The first metadata answer comes over the bootstrap connection,
//! which librdkafka then retires for the connection to the broker it names, so the id used to
//! come half a second into the stream, after the budget had filled (64 MiB in about 0.45 s at
//! the benchmark's rate), which is what started the "buffer full" mode above. The writer asks
//! for the topic's metadata twice ([`Writer::partitions`]): the second answer comes over the
//! new connection, and the id is there before the first event.
//!
//! # Exactly once
//!
//! Under `--delivery exactly-once` the writer sends inside Kafka transactions, each holding
//! whole Postgres transactions and a progress record; the slot is confirmed only up to what a
//! committed Kafka transaction holds. The rule and its proof are in the `transaction` module.
//!
//! # librdkafka settings
//!
//! walrelay's defaults, which `--kafka-property` overrides (except the ones the option check
//! refuses to weaken): `enable.idempotence` and `acks=all`, `compression.type=lz4`,
//! `linger.ms=5` (the commit→ack latency budget: p99 ≤ 10–20 ms at 10k rows/s; a longer linger
//! makes larger batches, which a real broker with many partitions handles faster: see the
//! README's benchmark notes), `partitioner=murmur2_random` (Java client compatible), the queue
//! sized to the budget, `message.timeout.ms=0`. `batch.size`, `batch.num.messages` and
//! `max.in.flight` keep librdkafka's defaults (1 MB, 10 000, and 5 in flight, the most
//! idempotence allows): at the benchmark's rates batches are bounded by linger and in-flight
//! requests, not by these.

mod transaction;
mod writer;

pub use transaction::TransactionOptions;
pub use writer::{
    WriteError, Writer, WriterOptions, broker_reachable, ensure_progress_topic,
    ensure_single_partition_topic, ensure_topic,
};
