//! The replication protocol: the slot, its state, the pgoutput decoder and the listener.
//!
//! # LSN progress
//!
//! Three positions matter, and they only ever move forward:
//!
//! ```text
//!   WAL ──────────────────────────────────────────────────────────────────────▶
//!          confirmed_flush_lsn        last commit handed to Kafka     server wal_end
//!                 │  (slot: acked)          │  (listener)                 │ (keepalive)
//!   ──────────────●─────────────────────────●────────────────────────────●─────
//!                 └── unconfirmed window: re-sent after a crash ──┘
//! ```
//!
//! - The **listener** reads the stream: Begin, changes, Commit. It hands each change to the
//!   Kafka writer as it arrives (memory does not grow with transaction size) and registers
//!   the transaction with the [`Checkpointer`](crate::checkpoint::Checkpointer).
//! - The **checkpointer** computes the confirmable LSN: the Commit end LSN of the newest
//!   transaction whose events, and all earlier ones, Kafka has acknowledged. Nothing else
//!   moves it. When nothing is open or in flight, a keepalive's `wal_end` is confirmable too,
//!   so an idle or filtered database does not pin WAL.
//! - The **replication client** (`pgwire-replication`) sends that LSN to the server as the
//!   flush position in standby status updates, every second and at the server's request, also
//!   while the listener is paused on a full buffer, so `wal_sender_timeout` never fires.
//!
//! A restart streams from the slot's `confirmed_flush_lsn`: every transaction not confirmed is
//! decoded and sent again, with the same LSNs, xids and commit times, so the re-sent events are
//! byte-identical to the first copies. At shutdown the final confirmable LSN is sent; because
//! that last status update can be lost when the connection closes, the slot is then advanced
//! to it over an ordinary connection (`pg_replication_slot_advance`).
//!
//! # Slot lifecycle
//!
//! `walrelay.slot_state` records, per slot, whether its snapshot is `pending` or `done`.
//! A slot is created only when neither it nor a `done` state exists. A `pending` state with
//! an existing, inactive slot means a producer died mid-snapshot: the slot is dropped and
//! created again with a new snapshot (nothing was confirmed from it, so nothing is lost). A
//! `done` state without the slot, or a slot whose WAL was removed (`wal_status = lost`), is a
//! definite error: changes may be missing, and walrelay never recreates the slot silently.

pub mod connection;
pub mod listener;
pub mod pgoutput;
pub mod slot;
