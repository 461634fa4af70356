//! The chaos suite (issue 19): one reproducible run of the whole pipeline on real servers under
//! a seeded schedule of faults, then a check of every component against what Postgres says
//! was committed.
//!
//! # Layout
//!
//! ```text
//!   workload ──SQL──▶ Postgres 15 ──slot A──▶ producer (at-least-once) ──▶ topic A ──┬─▶ index ──▶ OpenSearch
//!   (workers, ledger      │        ──slot B──▶ producer (exactly-once) ──▶ topic B   ├─▶ notify ──▶ receiver (this process)
//!    chaos_tx, heartbeat) │                                                  │       ├─▶ stream ──▶ WebSocket client (this process)
//!                         │                          Kafka, 3 KRaft nodes ───┘       └─▶ replicate ──▶ target Postgres
//!   faults (seeded) ──────┴── SIGKILL/SIGTERM/SIGSTOP of processes, leader kills, Kafka pauses, pg_ctl restart -m immediate,
//!                             fault proxies on every link walrelay uses (latency, bandwidth, cuts, blackouts, HTTP 429/503)
//!   Prometheus ◀── /metrics of every walrelay process (the repository's scrape config and rules)
//!   observers: a read_committed tail of each topic, the receiver's and the client's logs,
//!              heartbeat polls of the index and the target, the slots' retained WAL
//! ```
//!
//! - [`workload`]: the schema, the writers and the **truth**. Every workload transaction first
//!   inserts a row into the `chaos_tx` ledger, in the same transaction, and learns from
//!   `RETURNING` exactly which row versions it wrote; its planned events are kept by ledger
//!   id. After the run, the ledger rows Postgres holds say which transactions committed, also
//!   those whose `COMMIT` answer was lost in an immediate restart. Every row carries a
//!   `version` bumped on each update, and keys are never reused, so `(table, key, op,
//!   version)` names one change.
//! - [`faults`]: the fault kinds and the schedule, a pure function of the seed and the
//!   profile: process kills and stops, Kafka leader kills and stalls, immediate Postgres
//!   restarts, and network faults through TCP fault proxies on every link (latency, bandwidth,
//!   cuts, a 60 s Kafka blackout, a hung search link, OpenSearch answering 429/503).
//! - [`stack`]: the servers and the walrelay processes, each restartable by the fault runner.
//! - [`runner`]: the fault runner: injects the schedule, restores targets, records what it did.
//! - [`observe`]: what watches the run: a `read_committed` tail of each topic (events, arrival
//!   times, the state rebuilt from them, partial transactions sampled after producer kills),
//!   the webhook receiver, the stream client, heartbeat polls, retained WAL of the slots.
//! - [`observability`]: a real Prometheus scraping every process with the repository's
//!   config and rules (and a time-compressed copy of the rules): which alerts fired during
//!   which faults, and whether every Grafana panel's query returns series.
//! - [`hygiene`]: after the checks, a long Kafka outage must raise the slot's near-the-limit
//!   alert, and a slot invalidated by `max_slot_wal_keep_size` must stop its producer loudly
//!   with the way out.
//! - [`checker`]: decides pass or fail, parsing JSON itself (never walrelay's envelope types):
//!   per component events expected, missing, extra, duplicated, out of order per key, latency,
//!   time to recover after each fault kind; final states against Postgres.
//! - [`report`]: markdown and JSON.
//!
//! The binary `walrelay-chaos` (orchestration only) and `scripts/chaos.sh` (build, run, and
//! `--broken`, the same run against a producer patched to confirm before Kafka's ack) use them.

pub mod checker;
pub mod faults;
pub mod hygiene;
pub mod observability;
pub mod observe;
pub mod report;
pub mod runner;
pub mod stack;
pub mod workload;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, the clock every observation is stamped with (the same
/// clock Postgres' `ts_ms` uses on this machine).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The captured tables of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// The ledger: one row per workload transaction.
    ChaosTx,
    /// Worker-owned rows: inserts, updates (some large, over 2 KB), key changes, deletes.
    Items,
    /// Updated only, `REPLICA IDENTITY DEFAULT`, a large never-updated column: unchanged TOAST.
    Accounts,
    /// Inserts, truncates and DDL (columns added and dropped).
    Scratch,
    /// The big transaction's rows.
    Bulk,
    /// One row updated a few times a second: latency and recovery of the index and target.
    Heartbeat,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 6] = [
        Table::ChaosTx,
        Table::Items,
        Table::Accounts,
        Table::Scratch,
        Table::Bulk,
        Table::Heartbeat,
    ];

    /// The table's name in `public`.
    pub fn name(self) -> &'static str {
        match self {
            Table::ChaosTx => "chaos_tx",
            Table::Items => "items",
            Table::Accounts => "accounts",
            Table::Scratch => "scratch",
            Table::Bulk => "bulk",
            Table::Heartbeat => "heartbeat",
        }
    }

    /// The table named `name`, if it is one of the workload's.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A change's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    /// Insert.
    Create,
    /// Update (under a key change: the new key's event).
    Update,
    /// Delete (under a key change: the old key's event).
    Delete,
    /// Truncate, one per partition.
    Truncate,
    /// A snapshot row: the workload never expects one.
    Read,
}

impl Op {
    /// The envelope's letter.
    pub fn letter(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// One change, named by what Postgres wrote: for rows the key and the row's `version` after
/// (deletes: before) the change; for a truncate the partition as `key` and the ledger id of
/// its transaction as `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ev {
    /// Table.
    pub table: Table,
    /// Key (`id`), or the partition of a truncate.
    pub key: i64,
    /// Kind.
    pub op: Op,
    /// Row version, or the truncating transaction's ledger id.
    pub version: i64,
}

impl std::fmt::Display for Ev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} id={} v={}",
            self.table.name(),
            self.op.letter(),
            self.key,
            self.version
        )
    }
}

/// Kafka partitions of each topic (primary-key keying spreads rows over them).
pub const PARTITIONS: i32 = 3;
