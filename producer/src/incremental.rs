//! Incremental snapshots: re-reading tables while the stream goes on (the watermark technique
//! of Netflix's DBLog, also Debezium's incremental snapshot).
//!
//! # Requests
//!
//! `walrelay-producer snapshot --tables P [--where SQL]` writes, in one transaction, a request
//! row per table into `walrelay.incremental_snapshot` (the request and its progress) and a row
//! into `walrelay.snapshot_signal`. Both tables are owned by walrelay's role and revoked from
//! `PUBLIC`; the signal table is in the publication, so the listener sees the request in commit
//! order and wakes the [`Worker`]. The request row is what survives restarts: the worker reads
//! the active requests from it (and polls it every few seconds), so the signal is only a
//! prompt. `--cancel` marks the table's active request `cancelled` the same way.
//!
//! # One chunk
//!
//! A table is read in key order, `--incremental-chunk-rows` rows at a time
//! (`WHERE (key) > (last key) [AND --where] ORDER BY key LIMIT n`), on an ordinary connection of
//! the worker's own, never on the replication connection, while the listener streams:
//!
//! ```text
//!   worker:    emit L ──▶ SELECT chunk (rows into the window) ──▶ emit H ──▶ wait for acks
//!   WAL/stream: … L ── c1(k=5) ── c2(k=9) ── … ── H ──▶
//!   listener:       └ window open: note keys changed ┘ at H: emit the chunk's rows whose key
//!                                                      was not noted, as op r, then go on
//! ```
//!
//! L and H are transactional logical messages (prefix [`WATERMARK_PREFIX`]) authenticated like
//! the DDL channel (HMAC-SHA256 with `walrelay.ddl_key`, bound to the xid; see
//! [`crate::ddl::capture`]) and carrying this process's random session id and the chunk's
//! number, so neither a forged message nor one replayed from an earlier session opens or
//! closes a window.
//!
//! **Why no emitted row is older than a change already emitted for its key.** The SELECT
//! starts after L committed and ends before H is written, so it sees every change committed
//! before L and none committed after H. A change committed between L and H is in the stream
//! between them and may or may not be in the chunk: the listener noted its key, and the chunk's
//! row of that key is dropped (the streamed change, already emitted, is at least as new). Every
//! other row of the chunk is the row's state as of H, and it is emitted at H's place in the
//! stream: after everything committed before H, before everything after. Its `lsn`,
//! `commit_lsn` and `txid` are H's, `seq` is 0, and `source` says `"snapshot":true,
//! "incremental":true`, so consumers that order by commit LSN (the search index's external
//! versions, the Postgres target's truncate positions) place it correctly too. A truncate of
//! the table inside a window drops the whole chunk; a key the listener cannot read (an
//! unchanged TOASTed key value) or a schema change that leaves the chunk's columns unmatched
//! makes the worker read the chunk again.
//!
//! **Visibility.** "Committed before L" in the stream (WAL order of commit records) is not quite
//! "visible to a snapshot taken after L": a transaction T writes its commit record, and only
//! then leaves the list of running transactions, so on a loaded server T can precede L in the
//! WAL and still be invisible to the chunk's SELECT (its row would be read as before T and
//! emitted after T's change: older). So the SELECT runs in a REPEATABLE READ transaction whose
//! snapshot's in-progress list (`pg_snapshot_xip`) is handed to the listener with the rows,
//! and the listener notes the table's changes from the moment the worker registers the window
//! (before it writes L) with their transaction: at H, keys changed before L by a transaction
//! the snapshot did not see are dropped too.
//!
//! ```text
//!   register ── T commit ── L ── SELECT (T still "running": in xip) ── H
//!               └ noted (xid T, key) ┘                                 └ T in xip: key dropped
//! ```
//!
//! The chunk's rows are held in memory between the SELECT and H: at most the chunk size.
//!
//! # Progress
//!
//! The chunk's rows go out inside H's transaction, so the checkpointer confirms H's commit only
//! once Kafka acknowledged them. The worker waits for exactly that (the confirmable LSN at or
//! past H's end) before it writes the chunk's last key, counts and state into
//! `walrelay.incremental_snapshot`. A producer killed in between reads the chunk again after
//! its restart (duplicates, never a gap); one killed after resumes at the next chunk.
//!
//! # Tables never snapshotted
//!
//! Under `--snapshot initial`, a captured table that the slot's initial snapshot did not read
//! (added to `--tables` and to the publication by `init` later) and that has no request yet gets
//! one by itself: the worker looks for such tables when it starts and every few seconds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, pin_mut};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog, PgError, TableRef, quote_ident, quote_literal};
use crate::checkpoint::Checkpointer;
use crate::kafka::Writer;
use crate::metrics::Metrics;
use crate::replication::pgoutput::Cell;
use crate::snapshot::parse_copy_line;

/// Prefix of the watermark messages.
pub const WATERMARK_PREFIX: &str = "walrelay.watermark";

/// The schema of a signal table's row the listener reads: the table is walrelay's own.
pub const SIGNAL_TABLE: (&str, &str) = ("walrelay", "snapshot_signal");

/// The state `init` creates (idempotent).
pub const STATE: &str = "
CREATE TABLE IF NOT EXISTS walrelay.incremental_snapshot (
    request_id bigserial PRIMARY KEY,
    slot_name text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    where_clause text,
    origin text NOT NULL DEFAULT 'command' CHECK (origin IN ('command', 'new_table')),
    state text NOT NULL DEFAULT 'requested'
        CHECK (state IN ('requested', 'running', 'done', 'cancelled', 'failed')),
    last_key text[],
    rows_done bigint NOT NULL DEFAULT 0,
    chunks_done bigint NOT NULL DEFAULT 0,
    rows_dropped bigint NOT NULL DEFAULT 0,
    error text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS walrelay.snapshot_signal (
    id bigserial PRIMARY KEY,
    slot_name text NOT NULL,
    action text NOT NULL CHECK (action IN ('start', 'cancel')),
    request_id bigint NOT NULL,
    signalled_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON walrelay.incremental_snapshot, walrelay.snapshot_signal FROM PUBLIC;
";

/// Changes of a chunk's table noted between its window's registration and its low watermark,
/// at most (see "Visibility"); beyond it the chunk is read again.
const MAX_BEFORE_LOW: usize = 200_000;

/// How often the worker looks at the request table when nothing prompts it.
const POLL: Duration = Duration::from_secs(2);

/// What a watermark message carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct Watermark {
    /// The producer session that wrote it.
    pub session: String,
    /// The chunk's number in that session.
    pub chunk: u64,
    /// `low` or `high`.
    pub mark: String,
}

/// A chunk's rows, as read (Postgres' text output, the same as pgoutput's).
pub struct ChunkRows {
    /// Column names, in the order of each row's values.
    pub columns: Vec<String>,
    /// Rows: `None` is NULL.
    pub rows: Vec<Vec<Option<Vec<u8>>>>,
}

/// What the listener made of a chunk at its high watermark.
#[derive(Debug)]
pub enum Outcome {
    /// Its rows went out in H's transaction; acknowledged once the confirmable LSN reaches
    /// `end_lsn`.
    Emitted {
        /// Rows emitted.
        rows: u64,
        /// Rows dropped (changed inside the window).
        dropped: u64,
        /// End LSN of H's transaction.
        end_lsn: u64,
    },
    /// The chunk must be read again (why).
    Retry(String),
}

/// A key as text values; `None` is NULL.
pub type Key = Vec<Option<Vec<u8>>>;

/// One chunk's window, from registration by the worker to its high watermark.
struct Window {
    oid: u32,
    /// L seen: changes are noted.
    open: bool,
    changed: HashSet<Key>,
    /// Changes between the window's registration and L: transaction and key (`None`: not
    /// readable). Those of transactions the chunk's snapshot did not see count as changed.
    before_low: Vec<(u32, Option<Key>)>,
    /// Truncates between registration and L, by transaction.
    truncated_before_low: Vec<u32>,
    /// Transactions in progress for the chunk's snapshot (its `xip`).
    invisible: HashSet<u32>,
    truncated: bool,
    /// Why the chunk cannot be used (the listener could not note a key).
    spoiled: Option<String>,
    rows: Option<ChunkRows>,
    reply: Option<oneshot::Sender<Outcome>>,
}

/// What the listener takes at a high watermark.
pub struct Closed {
    /// The table.
    pub oid: u32,
    /// Keys changed inside the window (empty when the chunk is spoiled or truncated).
    pub changed: HashSet<Key>,
    /// Everything was truncated inside the window.
    pub truncated: bool,
    /// Why the chunk must be read again, if so.
    pub spoiled: Option<String>,
    /// The chunk.
    pub rows: Option<ChunkRows>,
    /// Where the outcome goes.
    pub reply: Option<oneshot::Sender<Outcome>>,
}

/// Shared by the worker and the listener: the registered windows, and the worker's wake-up.
pub struct Hub {
    session: String,
    windows: std::sync::Mutex<HashMap<u64, Window>>,
    /// Windows registered and not yet closed: the listener's fast path skips the lock at zero.
    registered: AtomicUsize,
    wake: Notify,
}

impl Hub {
    /// A hub with a random session id.
    pub fn new() -> Arc<Self> {
        let id: u64 = rand::random();
        Arc::new(Self {
            session: format!("{id:016x}"),
            windows: std::sync::Mutex::new(HashMap::new()),
            registered: AtomicUsize::new(0),
            wake: Notify::new(),
        })
    }

    /// The signal table saw a row: the worker looks at the requests now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Whether a window is registered (changes are to be noted).
    pub fn watching(&self) -> bool {
        self.registered.load(Ordering::Relaxed) > 0
    }

    /// Whether a watermark belongs to this session.
    pub fn owns(&self, w: &Watermark) -> bool {
        w.session == self.session
    }

    fn register(&self, chunk: u64, oid: u32, reply: oneshot::Sender<Outcome>) {
        walrelay_common::sync::lock(&self.windows).insert(
            chunk,
            Window {
                oid,
                open: false,
                changed: HashSet::new(),
                before_low: Vec::new(),
                truncated_before_low: Vec::new(),
                invisible: HashSet::new(),
                truncated: false,
                spoiled: None,
                rows: None,
                reply: Some(reply),
            },
        );
        self.registered.fetch_add(1, Ordering::Relaxed);
    }

    fn fill(&self, chunk: u64, rows: ChunkRows, invisible: HashSet<u32>) {
        if let Some(w) = walrelay_common::sync::lock(&self.windows).get_mut(&chunk) {
            w.rows = Some(rows);
            w.invisible = invisible;
        }
    }

    fn forget(&self, chunk: u64) {
        if walrelay_common::sync::lock(&self.windows)
            .remove(&chunk)
            .is_some()
        {
            self.registered.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The low watermark of `chunk`: every change of its table is noted from here on.
    pub fn low(&self, chunk: u64) {
        if let Some(w) = walrelay_common::sync::lock(&self.windows).get_mut(&chunk) {
            w.open = true;
        }
    }

    /// The high watermark of `chunk`: its window closes. Besides the keys changed inside it,
    /// the keys changed before its low watermark by transactions the chunk's snapshot did not
    /// see count as changed (see "Visibility" in the module essay).
    pub fn high(&self, chunk: u64) -> Option<Closed> {
        let mut w = walrelay_common::sync::lock(&self.windows).remove(&chunk)?;
        self.registered.fetch_sub(1, Ordering::Relaxed);
        let mut spoiled = if w.open {
            w.spoiled
        } else {
            Some("the high watermark came without the low one".into())
        };
        for (xid, key) in w.before_low {
            if w.invisible.contains(&xid) {
                match key {
                    Some(k) => {
                        w.changed.insert(k);
                    }
                    None => {
                        spoiled =
                            Some("a change the chunk did not see did not carry its key".into());
                    }
                }
            }
        }
        let truncated = w.truncated
            || w.truncated_before_low
                .iter()
                .any(|x| w.invisible.contains(x));
        Some(Closed {
            oid: w.oid,
            changed: w.changed,
            truncated,
            spoiled,
            rows: w.rows,
            reply: w.reply,
        })
    }

    /// A streamed change, in transaction `xid`, of `oid`'s row with these key cells.
    pub fn changed(&self, oid: u32, xid: u32, key: &[Cell<'_>]) {
        if !self.watching() {
            return;
        }
        let mut windows = walrelay_common::sync::lock(&self.windows);
        let mut noted: Option<Option<Key>> = None;
        for w in windows.values_mut().filter(|w| w.oid == oid) {
            let k = noted.get_or_insert_with(|| {
                key.iter()
                    .map(|c| match c {
                        Cell::Null => Some(None),
                        Cell::Text(t) | Cell::Binary(t) => Some(Some(t.to_vec())),
                        Cell::UnchangedToast => None,
                    })
                    .collect::<Option<Key>>()
            });
            if !w.open {
                if w.before_low.len() < MAX_BEFORE_LOW {
                    w.before_low.push((xid, k.clone()));
                } else {
                    // A listener far behind the worker: rather than hold more, read the chunk
                    // again once it caught up.
                    w.spoiled = Some(format!(
                        "more than {MAX_BEFORE_LOW} changes of the table before the low watermark (the stream is behind)"
                    ));
                }
                continue;
            }
            match k {
                Some(k) => {
                    w.changed.insert(k.clone());
                }
                None => {
                    w.spoiled = Some("a change inside the window did not carry its key".into());
                }
            }
        }
    }

    /// A truncate of `oid` streamed in transaction `xid`.
    pub fn truncated(&self, oid: u32, xid: u32) {
        if !self.watching() {
            return;
        }
        for w in walrelay_common::sync::lock(&self.windows)
            .values_mut()
            .filter(|w| w.oid == oid)
        {
            if w.open {
                w.truncated = true;
            } else {
                w.truncated_before_low.push(xid);
            }
        }
    }
}

/// Why an incremental snapshot request cannot go on, or a chunk failed.
#[derive(Debug, thiserror::Error)]
pub enum IncrementalError {
    /// Postgres (transient or definite as [`PgError::is_transient`] says).
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// The request cannot be carried out (definite: the request is marked `failed`).
    #[error("{0}")]
    Refused(String),
    /// The session ended (the listener is gone).
    #[error("the streaming session ended")]
    SessionEnded,
}

/// A table's key and columns, as the chunk SELECT reads them.
struct TablePlan {
    table: TableRef,
    columns: Vec<String>,
    /// Key columns: name and SQL type.
    key: Vec<(String, String)>,
}

/// The columns pgoutput publishes (not dropped, not generated), in attnum order.
pub async fn published_columns(
    c: &Client,
    oid: u32,
) -> Result<Vec<(String, u32, i32, String)>, PgError> {
    let rows = c
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
               AND a.attgenerated = '' ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(PgError::query(format!(
            "reading the columns of relation {oid}"
        )))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// The refusal for a table without a key.
pub fn keyless_message(table: &str) -> String {
    format!(
        "table {table} has no primary key or replica-identity index: an incremental snapshot reads a table in key \
         order and matches streamed changes by key. Add one (ALTER TABLE {table} ADD PRIMARY KEY (…), or \
         ALTER TABLE {table} REPLICA IDENTITY USING INDEX <unique index on NOT NULL columns>), then ask again"
    )
}

async fn plan(c: &Client, table: TableRef) -> Result<TablePlan, IncrementalError> {
    let cols = published_columns(c, table.oid).await?;
    let key_names = Catalog::new(c).key_columns(table.oid).await?;
    if key_names.is_empty() {
        return Err(IncrementalError::Refused(keyless_message(
            &table.qualified(),
        )));
    }
    let mut key = Vec::new();
    for k in &key_names {
        let ty = cols
            .iter()
            .find(|c| &c.0 == k)
            .map(|c| c.3.clone())
            .ok_or_else(|| {
                IncrementalError::Refused(format!(
                    "key column {k} of {} is not published",
                    table.qualified()
                ))
            })?;
        key.push((k.clone(), ty));
    }
    Ok(TablePlan {
        table,
        columns: cols.into_iter().map(|c| c.0).collect(),
        key,
    })
}

impl TablePlan {
    /// The chunk's COPY statement after `last` (none: from the start).
    fn chunk_sql(&self, where_clause: Option<&str>, last: Option<&[String]>, rows: u32) -> String {
        let cols = self
            .columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let key = self
            .key
            .iter()
            .map(|(k, _)| quote_ident(k))
            .collect::<Vec<_>>()
            .join(", ");
        let mut conds = Vec::new();
        if let Some(f) = &self.table.row_filter {
            conds.push(format!("({f})"));
        }
        if let Some(w) = where_clause {
            conds.push(format!("({w})"));
        }
        if let Some(last) = last {
            let vals = self
                .key
                .iter()
                .zip(last)
                .map(|((_, ty), v)| format!("{}::{ty}", quote_literal(v)))
                .collect::<Vec<_>>()
                .join(", ");
            conds.push(format!("({key}) > ({vals})"));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let only = if self.table.relkind == "p" {
            ""
        } else {
            "ONLY "
        };
        format!(
            "COPY (SELECT {cols} FROM {only}{}{filter} ORDER BY {key} LIMIT {rows}) TO STDOUT",
            self.table.sql_name()
        )
    }
}

/// One request as the table holds it.
struct Request {
    id: i64,
    schema: String,
    table: String,
    where_clause: Option<String>,
    state: String,
    last_key: Option<Vec<String>>,
}

/// Reads tables in chunks between watermarks while the listener streams.
pub struct Worker {
    /// Postgres settings (the worker opens its own connections).
    pub postgres: walrelay_common::postgres::PgTarget,
    /// Slot (requests are per slot).
    pub slot: String,
    /// Publication (captured tables, their row filters).
    pub publication: String,
    /// Rows per chunk.
    pub chunk_rows: u32,
    /// Start requests for captured tables the initial snapshot never read.
    pub auto_start: bool,
    /// Shared with the listener.
    pub hub: Arc<Hub>,
    /// Acknowledgements.
    pub checkpointer: Arc<Checkpointer>,
    /// The Kafka writer (the confirmable position under exactly-once).
    pub writer: Arc<Writer>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl Worker {
    /// Runs until `stop` (the session's end); failures are logged and retried.
    pub async fn run(self, stop: CancellationToken) {
        match state_ready(&self.postgres).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "Incremental snapshots are off: walrelay.incremental_snapshot is missing (state from an older version); run `walrelay-producer init` again"
                );
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "Could not look for walrelay.incremental_snapshot; trying anyway.")
            }
        }
        let mut chunk_no = 0u64;
        let mut backoff = walrelay_common::retry::Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
        );
        loop {
            let r = tokio::select! {
                () = stop.cancelled() => return,
                r = self.session(&mut chunk_no, &stop) => r,
            };
            match r {
                Ok(()) | Err(IncrementalError::SessionEnded) => return,
                Err(e) => {
                    self.metrics
                        .errors
                        .with_label_values(&["incremental_snapshot"])
                        .inc();
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Incremental snapshot: a transient failure; trying again.");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn session(
        &self,
        chunk_no: &mut u64,
        stop: &CancellationToken,
    ) -> Result<(), IncrementalError> {
        let ctl = catalog::connect(&self.postgres).await?;
        let reader = catalog::connect(&self.postgres).await?;
        let mut announced: HashSet<i64> = HashSet::new();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if self.auto_start {
                self.start_new_tables(&ctl).await?;
            }
            let Some(req) = next_request(&ctl, &self.slot).await? else {
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = self.hub.wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                continue;
            };
            let label = format!("{}.{}", req.schema, req.table);
            match self
                .chunk(&ctl, &reader, &req, chunk_no, announced.insert(req.id))
                .await
            {
                Ok(()) => {}
                Err(IncrementalError::Refused(why)) => {
                    tracing::error!(table = %label, request = req.id, error = %why, "Incremental snapshot failed.");
                    ctl.execute(
                        "UPDATE walrelay.incremental_snapshot SET state = 'failed', error = $2, updated_at = now() \
                         WHERE request_id = $1 AND state IN ('requested', 'running')",
                        &[&req.id, &why],
                    )
                    .await
                    .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
                }
                Err(IncrementalError::Postgres(e))
                    if !e.is_transient() && matches!(e, PgError::Query { .. }) =>
                {
                    // The chunk's SELECT was refused (a bad --where, a dropped column): the
                    // same statement would be refused again.
                    let why = e.to_string();
                    tracing::error!(table = %label, request = req.id, error = %why, "Incremental snapshot failed.");
                    ctl.execute(
                        "UPDATE walrelay.incremental_snapshot SET state = 'failed', error = $2, updated_at = now() \
                         WHERE request_id = $1 AND state IN ('requested', 'running')",
                        &[&req.id, &why],
                    )
                    .await
                    .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Requests for captured tables the initial snapshot did not read and no request covers.
    async fn start_new_tables(&self, ctl: &Client) -> Result<(), IncrementalError> {
        let rows = ctl
            .query(
                "SELECT pt.schemaname::text, pt.tablename::text FROM pg_publication_tables pt \
                 WHERE pt.pubname = $2 AND pt.schemaname <> 'walrelay' \
                   AND EXISTS (SELECT 1 FROM walrelay.snapshot_progress p WHERE p.slot_name = $1) \
                   AND NOT EXISTS (SELECT 1 FROM walrelay.snapshot_progress p WHERE p.slot_name = $1 \
                                   AND p.schema_name = pt.schemaname AND p.table_name = pt.tablename) \
                   AND NOT EXISTS (SELECT 1 FROM walrelay.incremental_snapshot r WHERE r.slot_name = $1 \
                                   AND r.schema_name = pt.schemaname AND r.table_name = pt.tablename)",
                &[&self.slot, &self.publication],
            )
            .await
            .map_err(PgError::query("looking for captured tables never snapshotted"))?;
        for r in rows {
            let (schema, table): (String, String) = (r.get(0), r.get(1));
            ctl.execute(
                "INSERT INTO walrelay.incremental_snapshot (slot_name, schema_name, table_name, origin) \
                 VALUES ($1, $2, $3, 'new_table')",
                &[&self.slot, &schema, &table],
            )
            .await
            .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
            tracing::info!(table = %format!("{schema}.{table}"), "A captured table the initial snapshot did not read: starting an incremental snapshot of it.");
        }
        Ok(())
    }

    /// Reads, emits and records one chunk of `req`.
    async fn chunk(
        &self,
        ctl: &Client,
        reader: &Client,
        req: &Request,
        chunk_no: &mut u64,
        first_in_session: bool,
    ) -> Result<(), IncrementalError> {
        let label = format!("{}.{}", req.schema, req.table);
        let table = catalog::publication_tables(ctl, &self.publication)
            .await?
            .into_iter()
            .find(|t| t.schema == req.schema && t.name == req.table)
            .ok_or_else(|| {
                IncrementalError::Refused(format!(
                    "table {label} is not in publication {}: run `walrelay-producer init` with --tables covering it",
                    self.publication
                ))
            })?;
        let plan = plan(ctl, table).await?;
        if first_in_session {
            tracing::info!(table = %label, request = req.id, resume_after = ?req.last_key, state = %req.state,
                chunk_rows = self.chunk_rows, "Incremental snapshot: reading.");
        }
        if req.state == "requested" {
            ctl.execute(
                "UPDATE walrelay.incremental_snapshot SET state = 'running', updated_at = now() \
                 WHERE request_id = $1 AND state = 'requested'",
                &[&req.id],
            )
            .await
            .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
        }
        *chunk_no += 1;
        let chunk = *chunk_no;
        let (tx, rx) = oneshot::channel();
        self.hub.register(chunk, plan.table.oid, tx);
        let read = self
            .read_between_watermarks(ctl, reader, &plan, req, chunk)
            .await;
        let (last_key, read_rows) = match read {
            Ok(x) => x,
            Err(e) => {
                self.hub.forget(chunk);
                return Err(e);
            }
        };
        let outcome = rx.await.map_err(|_| IncrementalError::SessionEnded)?;
        let (rows, dropped, end_lsn) = match outcome {
            Outcome::Emitted {
                rows,
                dropped,
                end_lsn,
            } => (rows, dropped, end_lsn),
            Outcome::Retry(why) => {
                tracing::info!(table = %label, chunk, reason = %why, "Incremental snapshot: reading the chunk again.");
                return Ok(());
            }
        };
        // Done only once Kafka acknowledged H's transaction, which holds the chunk's rows.
        loop {
            if let Some(f) = self.writer.failure() {
                return Err(IncrementalError::Refused(format!("Kafka: {f}")));
            }
            if self.writer.confirmable(self.checkpointer.confirmed()) >= end_lsn {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done = read_rows < u64::from(self.chunk_rows);
        let state = if done { "done" } else { "running" };
        let last: Option<Vec<String>> = last_key.or_else(|| req.last_key.clone());
        let updated = ctl
            .execute(
                "UPDATE walrelay.incremental_snapshot SET last_key = $2, rows_done = rows_done + $3, \
                 chunks_done = chunks_done + 1, rows_dropped = rows_dropped + $4, state = $5, updated_at = now() \
                 WHERE request_id = $1 AND state IN ('requested', 'running')",
                &[&req.id, &last, &(rows as i64), &(dropped as i64), &state],
            )
            .await
            .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
        self.metrics
            .incremental_chunks
            .with_label_values(&[&label])
            .inc();
        self.metrics
            .incremental_rows
            .with_label_values(&[&label])
            .inc_by(rows);
        self.metrics
            .incremental_dropped
            .with_label_values(&[&label])
            .inc_by(dropped);
        tracing::debug!(table = %label, chunk, rows, dropped, "Incremental snapshot: chunk acknowledged.");
        if done && updated > 0 {
            let totals = ctl
                .query_one(
                    "SELECT rows_done, chunks_done, rows_dropped FROM walrelay.incremental_snapshot WHERE request_id = $1",
                    &[&req.id],
                )
                .await
                .map_err(PgError::query("reading walrelay.incremental_snapshot"))?;
            tracing::info!(table = %label, request = req.id, rows = totals.get::<_, i64>(0),
                chunks = totals.get::<_, i64>(1), dropped = totals.get::<_, i64>(2),
                "Incremental snapshot done: every row emitted and acknowledged.");
        }
        Ok(())
    }

    /// Low watermark, the chunk's SELECT (rows into the window), high watermark. Returns the
    /// chunk's last key and how many rows it read.
    async fn read_between_watermarks(
        &self,
        ctl: &Client,
        reader: &Client,
        plan: &TablePlan,
        req: &Request,
        chunk: u64,
    ) -> Result<(Option<Vec<String>>, u64), IncrementalError> {
        let label = plan.table.qualified();
        self.watermark(ctl, chunk, "low").await?;
        reader
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(PgError::query(format!(
                "starting the read of a chunk of {label}"
            )))?;
        let read = read_chunk(reader, plan, req, self.chunk_rows).await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                let _ = reader.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        reader
            .batch_execute("COMMIT")
            .await
            .map_err(PgError::query(format!(
                "ending the read of a chunk of {label}"
            )))?;
        let (rows, invisible) = read;
        let key_idx: Vec<usize> = plan
            .key
            .iter()
            .filter_map(|(k, _)| plan.columns.iter().position(|c| c == k))
            .collect();
        let last_key = rows.last().map(|r| {
            key_idx
                .iter()
                .map(|&i| {
                    r.get(i)
                        .and_then(|v| v.as_ref())
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
        });
        let n = rows.len() as u64;
        self.hub.fill(
            chunk,
            ChunkRows {
                columns: plan.columns.clone(),
                rows,
            },
            invisible,
        );
        self.watermark(ctl, chunk, "high").await?;
        Ok((last_key, n))
    }

    /// Writes an authenticated watermark into the WAL (its own transaction).
    async fn watermark(
        &self,
        ctl: &Client,
        chunk: u64,
        mark: &str,
    ) -> Result<(), IncrementalError> {
        let body = serde_json::to_string(&Watermark {
            session: self.hub.session.clone(),
            chunk,
            mark: mark.into(),
        })
        .map_err(|e| IncrementalError::Refused(format!("encoding a watermark: {e}")))?;
        let written = ctl
            .query_opt(
                "SELECT pg_logical_emit_message(true, 'walrelay.watermark', 'v1:' || encode(walrelay.hmac_sha256(k.key, \
                 convert_to((txid_current() % 4294967296)::text || ':' || $1::text, 'UTF8')), 'hex') || ':' || $1::text)::text \
                 FROM walrelay.ddl_key k WHERE k.id = 1",
                &[&body],
            )
            .await
            .map_err(PgError::query("writing a watermark (this role must read walrelay.ddl_key)"))?;
        if written.is_none() {
            return Err(IncrementalError::Refused(
                "walrelay.ddl_key is empty, so watermarks cannot be authenticated: run `walrelay-producer init`".into(),
            ));
        }
        Ok(())
    }
}

/// Inside the chunk's REPEATABLE READ transaction: the transactions its snapshot sees as in
/// progress (`xip`, as pgoutput's 32-bit xids), then the chunk's rows.
async fn read_chunk(
    reader: &Client,
    plan: &TablePlan,
    req: &Request,
    chunk_rows: u32,
) -> Result<(Vec<Vec<Option<Vec<u8>>>>, HashSet<u32>), IncrementalError> {
    let label = plan.table.qualified();
    let invisible: HashSet<u32> = reader
        .query(
            "SELECT (x::text::numeric % 4294967296)::int8 FROM pg_snapshot_xip(pg_current_snapshot()) x",
            &[],
        )
        .await
        .map_err(PgError::query("reading the chunk's snapshot"))?
        .iter()
        .map(|r| r.get::<_, i64>(0) as u32)
        .collect();
    let sql = plan.chunk_sql(
        req.where_clause.as_deref(),
        req.last_key.as_deref(),
        chunk_rows,
    );
    let stream = reader
        .copy_out(sql.as_str())
        .await
        .map_err(PgError::query(format!("reading a chunk of {label}")))?;
    pin_mut!(stream);
    let (mut scratch, mut ranges, mut line) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
    while let Some(buf) = stream.next().await {
        let buf: Bytes = buf.map_err(PgError::query(format!("reading a chunk of {label}")))?;
        let mut rest: &[u8] = &buf;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&rest[..nl]);
            parse_copy_line(&line, &mut scratch, &mut ranges);
            rows.push(
                ranges
                    .iter()
                    .map(|r: &Option<(usize, usize)>| r.map(|(a, b)| scratch[a..b].to_vec()))
                    .collect(),
            );
            line.clear();
            rest = &rest[nl + 1..];
        }
        line.extend_from_slice(rest);
    }
    Ok((rows, invisible))
}

async fn state_ready(pg: &walrelay_common::postgres::PgTarget) -> Result<bool, PgError> {
    let c = catalog::connect(pg).await?;
    Ok(c.query_one(
        "SELECT to_regclass('walrelay.incremental_snapshot') IS NOT NULL",
        &[],
    )
    .await
    .map_err(PgError::query("looking for walrelay.incremental_snapshot"))?
    .get(0))
}

async fn next_request(ctl: &Client, slot: &str) -> Result<Option<Request>, PgError> {
    let row = ctl
        .query_opt(
            "SELECT request_id, schema_name, table_name, where_clause, state, last_key \
             FROM walrelay.incremental_snapshot WHERE slot_name = $1 AND state IN ('requested', 'running') \
             ORDER BY request_id LIMIT 1",
            &[&slot],
        )
        .await
        .map_err(PgError::query("reading walrelay.incremental_snapshot"))?;
    Ok(row.map(|r| Request {
        id: r.get(0),
        schema: r.get(1),
        table: r.get(2),
        where_clause: r.get(3),
        state: r.get(4),
        last_key: r.get(5),
    }))
}

/// What `snapshot` did.
#[derive(Debug)]
pub struct RequestReport {
    /// Per table: `schema.table` and its request id.
    pub tables: Vec<(String, i64)>,
}

/// `walrelay-producer snapshot`: requests (or with `cancel`, cancels) incremental snapshots of
/// the captured tables matching `patterns`.
pub async fn request(
    s: &crate::config::Settings,
    where_clause: Option<&str>,
    cancel: bool,
) -> Result<RequestReport, PgError> {
    let mut c = catalog::connect(&s.postgres).await?;
    if !installed(&c).await? {
        return Err(PgError::Catalog(
            "walrelay's incremental-snapshot state is missing: run `walrelay-producer init` (this version) first".into(),
        ));
    }
    let tables: Vec<TableRef> = catalog::publication_tables(&c, &s.publication)
        .await?
        .into_iter()
        .filter(|t| s.tables.matches(t))
        .collect();
    if tables.is_empty() {
        return Err(PgError::Catalog(format!(
            "no table of publication {} matches --tables: name captured tables (`walrelay-producer check` lists them)",
            s.publication
        )));
    }
    if !cancel {
        let mut refused = Vec::new();
        for t in &tables {
            if Catalog::new(&c).key_columns(t.oid).await?.is_empty() {
                refused.push(keyless_message(&t.qualified()));
            }
        }
        if !refused.is_empty() {
            return Err(PgError::Catalog(refused.join("\n")));
        }
        if let Some(w) = where_clause {
            for t in &tables {
                // Refused here, naming the option, rather than by the producer later.
                c.query(
                    &format!("EXPLAIN SELECT 1 FROM {} WHERE ({w})", t.sql_name()),
                    &[],
                )
                .await
                .map_err(|e| {
                    PgError::Catalog(format!(
                        "--where does not apply to {}: {}",
                        t.qualified(),
                        catalog::describe(&e)
                    ))
                })?;
            }
        }
    }
    let tx = c
        .transaction()
        .await
        .map_err(PgError::query("starting the request's transaction"))?;
    let mut report = RequestReport { tables: Vec::new() };
    if cancel {
        for t in &tables {
            let rows = tx
                .query(
                    "UPDATE walrelay.incremental_snapshot SET state = 'cancelled', updated_at = now() \
                     WHERE slot_name = $1 AND schema_name = $2 AND table_name = $3 AND state IN ('requested', 'running') \
                     RETURNING request_id",
                    &[&s.slot, &t.schema, &t.name],
                )
                .await
                .map_err(PgError::query("writing walrelay.incremental_snapshot"))?;
            for r in rows {
                let id: i64 = r.get(0);
                signal(&tx, &s.slot, "cancel", id).await?;
                report.tables.push((t.qualified(), id));
            }
        }
    } else {
        for t in &tables {
            let busy = tx
                .query_opt(
                    "SELECT request_id FROM walrelay.incremental_snapshot WHERE slot_name = $1 AND schema_name = $2 \
                     AND table_name = $3 AND state IN ('requested', 'running')",
                    &[&s.slot, &t.schema, &t.name],
                )
                .await
                .map_err(PgError::query("reading walrelay.incremental_snapshot"))?;
            if let Some(r) = busy {
                return Err(PgError::Catalog(format!(
                    "an incremental snapshot of {} is already under way (request {}): wait for it (`walrelay-producer status`) \
                     or stop it with `walrelay-producer snapshot --cancel --tables {}`",
                    t.qualified(),
                    r.get::<_, i64>(0),
                    t.qualified()
                )));
            }
            let id: i64 = tx
                .query_one(
                    "INSERT INTO walrelay.incremental_snapshot (slot_name, schema_name, table_name, where_clause) \
                     VALUES ($1, $2, $3, $4) RETURNING request_id",
                    &[&s.slot, &t.schema, &t.name, &where_clause],
                )
                .await
                .map_err(PgError::query("writing walrelay.incremental_snapshot"))?
                .get(0);
            signal(&tx, &s.slot, "start", id).await?;
            report.tables.push((t.qualified(), id));
        }
    }
    tx.commit()
        .await
        .map_err(PgError::query("committing the request"))?;
    Ok(report)
}

async fn signal(
    tx: &tokio_postgres::Transaction<'_>,
    slot: &str,
    action: &str,
    id: i64,
) -> Result<(), PgError> {
    tx.execute(
        "INSERT INTO walrelay.snapshot_signal (slot_name, action, request_id) VALUES ($1, $2, $3)",
        &[&slot, &action, &id],
    )
    .await
    .map_err(PgError::query("writing walrelay.snapshot_signal"))?;
    Ok(())
}

/// One request's progress, for `status`.
#[derive(Debug, Serialize)]
pub struct RequestProgress {
    /// Request id.
    pub request: i64,
    /// `schema.table`.
    pub table: String,
    /// `requested`, `running`, `done`, `cancelled`, `failed`.
    pub state: String,
    /// `command` or `new_table`.
    pub origin: String,
    /// Rows emitted (acknowledged by Kafka).
    pub rows: i64,
    /// Chunks completed.
    pub chunks: i64,
    /// Rows dropped because the stream changed them inside a window.
    pub dropped: i64,
    /// The last completed chunk's last key.
    pub last_key: Option<Vec<String>>,
    /// `--where`.
    pub where_clause: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Every request of `slot`, newest first (empty before `init` created the table).
pub async fn progress(c: &Client, slot: &str) -> Result<Vec<RequestProgress>, PgError> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass('walrelay.incremental_snapshot') IS NOT NULL",
            &[],
        )
        .await
        .map_err(PgError::query("looking for walrelay.incremental_snapshot"))?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = c
        .query(
            "SELECT request_id, schema_name || '.' || table_name, state, origin, rows_done, chunks_done, \
                    rows_dropped, last_key, where_clause, error \
             FROM walrelay.incremental_snapshot WHERE slot_name = $1 ORDER BY request_id DESC",
            &[&slot],
        )
        .await
        .map_err(PgError::query("reading walrelay.incremental_snapshot"))?;
    Ok(rows
        .iter()
        .map(|r| RequestProgress {
            request: r.get(0),
            table: r.get(1),
            state: r.get(2),
            origin: r.get(3),
            rows: r.get(4),
            chunks: r.get(5),
            dropped: r.get(6),
            last_key: r.get(7),
            where_clause: r.get(8),
            error: r.get(9),
        })
        .collect())
}

/// Whether `init` created incremental snapshots' tables (`walrelay.incremental_snapshot` and
/// `walrelay.snapshot_signal`).
pub async fn installed(c: &tokio_postgres::Client) -> Result<bool, PgError> {
    Ok(c.query_one(
        "SELECT to_regclass('walrelay.incremental_snapshot') IS NOT NULL \
            AND to_regclass('walrelay.snapshot_signal') IS NOT NULL",
        &[],
    )
    .await
    .map_err(PgError::query("looking for walrelay.incremental_snapshot"))?
    .get(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(filter: Option<&str>) -> TablePlan {
        TablePlan {
            table: TableRef {
                oid: 1,
                schema: "public".into(),
                name: "t".into(),
                relkind: "r".into(),
                row_filter: filter.map(str::to_string),
            },
            columns: vec!["a".into(), "b".into(), "v".into()],
            key: vec![("a".into(), "integer".into()), ("b".into(), "text".into())],
        }
    }

    #[test]
    fn chunk_statements() {
        assert_eq!(
            plan_of(None).chunk_sql(None, None, 10),
            r#"COPY (SELECT "a", "b", "v" FROM ONLY "public"."t" ORDER BY "a", "b" LIMIT 10) TO STDOUT"#
        );
        assert_eq!(
            plan_of(Some("v > 0")).chunk_sql(
                Some("b <> 'x'"),
                Some(&["7".into(), "o'k".into()]),
                5
            ),
            r#"COPY (SELECT "a", "b", "v" FROM ONLY "public"."t" WHERE (v > 0) AND (b <> 'x') AND ("a", "b") > ('7'::integer, 'o''k'::text) ORDER BY "a", "b" LIMIT 5) TO STDOUT"#
        );
    }

    #[test]
    fn windows_note_keys_only_while_open() {
        let hub = Hub::new();
        let (tx, _rx) = oneshot::channel();
        hub.register(1, 42, tx);
        // Before L: noted only when the chunk's snapshot did not see the transaction.
        hub.changed(42, 7, &[Cell::Text(b"1")]);
        hub.changed(42, 8, &[Cell::Text(b"9")]);
        hub.low(1);
        hub.changed(42, 9, &[Cell::Text(b"2")]);
        hub.changed(43, 9, &[Cell::Text(b"3")]);
        let rows = ChunkRows {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        hub.fill(1, rows, HashSet::from([8]));
        let closed = hub.high(1).expect("the window");
        assert_eq!(closed.changed.len(), 2);
        assert!(closed.changed.contains(&vec![Some(b"2".to_vec())]));
        assert!(closed.changed.contains(&vec![Some(b"9".to_vec())]));
        assert!(closed.spoiled.is_none());
        assert!(!hub.watching());
        assert!(hub.high(1).is_none());
    }

    #[test]
    fn an_unreadable_key_spoils_the_window() {
        let hub = Hub::new();
        let (tx, _rx) = oneshot::channel();
        hub.register(1, 42, tx);
        hub.low(1);
        hub.changed(42, 1, &[Cell::UnchangedToast]);
        assert!(hub.high(1).expect("the window").spoiled.is_some());
        let (tx, _rx) = oneshot::channel();
        hub.register(2, 42, tx);
        assert!(
            hub.high(2).expect("the window").spoiled.is_some(),
            "no low watermark"
        );
    }
}
