//! The Postgres target (`replicate`): keeps another Postgres database in sync with the topic,
//! schema changes included.
//!
//! # Exactly-once effect
//!
//! ```text
//!  Kafka ─batch─▶ PostgresSink ── BEGIN ──────────────────────────────────────── COMMIT ──▶ target
//!                   │  lock walrelay.applied rows of the batch's partitions (FOR UPDATE)
//!                   │  skip records below next_offset (already applied: a replay)
//!                   │  rows, truncates, schema changes, in log order
//!                   └  next_offset = last + 1, events_applied += records handled
//!  offsets stored in Kafka only for what the target committed (Sink::backlog) — a hint
//! ```
//!
//! The applied positions live in the target (`walrelay.applied`, per group, topic and
//! partition) and move in the same transaction as the rows they cover, so a record is applied
//! once whatever happens between the target's commit and Kafka's: a replay after a crash or a
//! rebalance finds `next_offset` past it and skips it. Kafka's committed offsets only say
//! where to start reading. Two members that briefly own one partition (a rebalance)
//! serialise on its locked row.
//!
//! # A lost session
//!
//! The open target transaction dies with its session (a cut link, a target restart), and the
//! target rolls it back. Records it held from earlier batches were already answered for (the
//! runtime only holds their offsets back through [`crate::runtime::Backlog`]) and are not kept
//! here, so their loss cannot be retried in place: the sink stops with a definite error
//! ("restart the replicator…") and a restart reads them again from Kafka's committed offset.
//! So a session is only ever replaced when no transaction is open on it
//! (`PostgresSink::db`); a batch whose own transaction is lost before it answered is retried.
//!
//! ```text
//!  batch n answered ─▶ [open tx: n] ── link cut ──▶ batch n+1: session closed, tx open
//!                                                     └─▶ stop (never: new session, n lost)
//! ```
//!
//! # Consistency a target reader sees
//!
//! Target transactions hold **whole source transactions, per partition**: within a batch, each
//! partition's events up to its last source-transaction boundary are committed together; the
//! events of the partition's last source transaction (which may go on in the next batch) stay
//! in an open target transaction, which commits with the next batch that shows that
//! transaction ended (a later one follows on that partition), or after a quiet spell
//! (`max(2 × --batch-max-wait, 500ms)` without a batch: the topic holds nothing more of it).
//! Snapshot rows are not transactions and commit with any batch. Under the producer's
//! `--delivery exactly-once` a Kafka transaction holds whole source transactions, so a quiet
//! topic means the transaction is complete; under at-least-once, a producer that stalls in the
//! middle of a transaction for longer than the quiet spell lets its first part be seen first.
//! A very large transaction stays in one open target transaction however many batches it
//! spans (memory stays bounded: its rows are in the target's transaction, not here).
//!
//! Across partitions (`table` or `primary-key` keying), partitions commit independently: a
//! source transaction spread over two partitions may appear in the target in two steps, and
//! rows of different tables can be momentarily from different source instants. Each row's
//! changes stay in order (one partition carries all of a row's changes, in commit order).
//!
//! # Rows
//!
//! A batch's changes of a table are collapsed to the last change per key and applied as one
//! multi-row delete and one upsert per column set ([`encode`]); an update that moved a row to
//! a new key deletes the old; unchanged TOAST values are never written (an earlier change of
//! the same batch supplies them when it had them). Rows written under an older schema (from
//! another partition, before its copy of a schema event) are renamed through their column
//! ids, and values of dropped columns left out. Values are restored to their types by
//! Postgres' input functions from the envelope's JSON ([`encode`]).
//!
//! # Schema changes
//!
//! A schema event is applied at its place in the log, once (its copies on the other
//! partitions find its version applied), as the statements [`ddl`] derives from the
//! difference with the last version applied. One the target refuses stops the replicator
//! with the statement and Postgres' error: the open transaction is rolled back, so nothing
//! after it is committed, and a restart after the operator fixed the target applies it again.
//! `--on-schema-error dead-letter` instead dead-letters it (rows go on, and may then fail).
//!
//! Layout: [`config`] (options), [`command`] (`replicate`, `--check`), [`sink`] (the
//! [`crate::runtime::Sink`] and its metrics), [`client`] (the target session and
//! bookkeeping), [`encode`] (rows to SQL), [`ddl`] (schema events to SQL).

pub mod client;
pub mod command;
pub mod config;
pub mod ddl;
pub mod encode;
pub mod sink;

pub use config::ReplicateSettings;
pub use sink::PostgresSink;
