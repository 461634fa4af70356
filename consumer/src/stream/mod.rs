//! `walrelay-consumer stream`: a WebSocket gateway with acknowledgements (issue 16). A client
//! (a browser, a script) opens `GET /v1/stream?group=G`, receives change events as JSON frames
//! and acknowledges them; the gateway joins the Kafka consumer group `G` on its behalf (one
//! group member per connection, the group id prefixed with `--group-prefix`) and commits only
//! what was acknowledged.
//!
//! # Offsets: never past an unacknowledged event
//!
//! ```text
//!  Kafka ─▶ member (≤ --max-queued-bytes prefetched) ─▶ queue ─decode, filter─▶ socket ─▶ client
//!                                                    (≤ --max-queued-bytes;   (≤ --max-unacked
//!                                                     paused beyond)           in flight)
//!   ▲                                                                              │
//!   └── auto-commit (1 s, on revoke, on close) ◀── store: oldest unacked ◀── {"type":"ack"}
//!                                                   per partition
//! ```
//!
//! Per topic-partition the gateway remembers the offsets it sent and not yet acknowledged
//! ([`tracker`]); an ack of offset O acknowledges everything up to O on that partition. The
//! committable offset of a partition is its oldest unacknowledged offset, or, when nothing is in
//! flight, one past the last record handled. So a record skipped (no `tables` pattern matches
//! it, a tombstone, an undecodable record) is committed past by the next ack after it, or at
//! once when nothing is in flight: a group whose client only wants some tables does not lag on
//! the others. A reconnect with the same group resumes at the committed offset: the client
//! sees again exactly what it had not acknowledged (at-least-once), nothing older.
//!
//! # Several connections, one group
//!
//! Connections naming the same group share its partitions as Kafka group members do
//! (cooperative-sticky). On a revoke the member's callbacks drop that partition's in-flight
//! bookkeeping and queued records (an epoch per assignment, as the runtime's): librdkafka
//! commits the stored offset, which never passes an unacknowledged event, so the new owner
//! sends those events again. A late ack for a partition taken away is ignored, not refused.
//!
//! # Back-pressure and bounds
//!
//! At most `--max-unacked` events are in flight per connection: beyond, the session stops
//! sending and queues what the member delivers; once the queue holds `--max-queued-bytes`
//! (2 MiB per connection unless given) the member's partitions are paused (resumed once half
//! of it was sent), and polling goes on so that rebalances are served. While they are paused,
//! their lag is taken from the broker, not from librdkafka's statistics, which freeze at the
//! pause ([`crate::lag`]): a client that stopped reading shows as growing lag. In-flight events
//! cost 8 bytes each (offsets, not events). Per connection memory is so bounded by librdkafka's
//! prefetch and the queue (each `--max-queued-bytes`), the socket's write buffer (one batch of
//! 256 frames), and a librdkafka client (its threads). Streams at once: `--max-connections`.
//!
//! A client is closed (an `error` frame, then close 1008), and its partitions released, when it
//! sends nothing (not even a pong to the gateway's pings, every third of the timeout) for
//! `--idle-timeout`, when events are in flight and no ack freed any for that long, or when a
//! write does not complete in that long.
//!
//! # Records that are not sent
//!
//! The gateway decodes with the consumers' codec (`walrelay_common::codec`: JSON, and Avro
//! through `--schema-registry-url`, schemas fetched and retried while the registry is
//! unavailable). Tombstones and undecodable records are **skipped**, not dead-lettered: the
//! gateway only reads the topic for its clients, the record stays in the topic, and the
//! indexer and notifier dead-letter it in their own groups. Skips are counted
//! (`walrelay_consumer_stream_skipped_total{reason}`) and logged once per 200 ms at most, with
//! the first one's position and error.
//!
//! # caught_up
//!
//! When a connection opens, the gateway reads the end offsets of the topics' partitions. It
//! sends `{"type":"caught_up"}` once every partition assigned to the connection has been read
//! up to that end (or started there: committed offset, or `from=latest`) and what lies before
//! it was sent; with one `--topic`, reaching a partition's end counts too (a topic written with
//! Kafka transactions ends with a commit marker no record reaches). A new group reading from
//! `earliest` has then received the current state: the snapshot and every change since.
//!
//! # Leaving
//!
//! When a connection ends, its member commits what was acknowledged, unsubscribes, and is
//! polled until its assignment is empty and no fetched record is left, before it is destroyed
//! on a thread of its own. A record fetched but never polled holds its partition, and through
//! it the broker connection, so `rd_kafka_destroy` would wait for it forever (its broker
//! threads never end): each closed connection used to leave three threads and its client's
//! memory behind (the symptom of rust-rdkafka issue 509). The stream test counts the gateway's
//! librdkafka threads once its connections closed.
//!
//! Layout: [`config`] (options), [`query`] (the query string), [`frames`] (the protocol),
//! [`server`] (routes, token, serving), [`session`] (one connection), [`tracker`] (the offset
//! rule), [`kafka`] (the member and offset queries), [`metrics`], [`command`].

pub mod command;
pub mod config;
pub mod frames;
pub mod kafka;
pub mod metrics;
pub mod query;
pub mod server;
pub mod session;
pub mod tracker;

pub use config::StreamSettings;

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Listening, metrics or the registry client could not be set up. Definite.
    #[error("{0}")]
    Setup(String),
}
