//! The initial snapshot: every captured row as an `op: "r"` event, read under the slot's
//! exported snapshot so that it joins the stream exactly at the slot's consistent point.
//!
//! (About 520 lines: the workers, the framing whose order argument rests on how they hand rows
//! over, and the COPY line parser they share are kept in one place.)
//!
//! Tables are cut into chunks of heap pages (`ctid` ranges: any table, with or without a
//! primary key) and read by `--snapshot-parallelism` connections, each of which imported the
//! snapshot, so one large table is read in parallel too. The last chunk of a table is open
//! ended, so rows in pages added after the size was measured are read as well. Partitioned
//! tables are read whole through their root (published via the root).
//!
//! The snapshot is one pseudo-transaction for the checkpointer; it is complete only when Kafka
//! acknowledged every row, and only then is the slot's state set to `done` and streaming
//! started. So no streamed change of a row reaches Kafka before that row's snapshot event.
//! Each table's schema event (`origin: "snapshot"`, version = the consistent point) is sent to
//! every partition before the first chunk is read, so it precedes the table's rows everywhere.
//!
//! A table with a publication row filter (`--row-filter`) is read through the same predicate,
//! taken back from `pg_publication_tables.rowfilter`, so the snapshot holds exactly the rows
//! the stream would have let through. Excluded and masked columns are read like the others and
//! projected by the emitter ([`crate::policy`]), as streamed rows are.
//!
//! # Framing: one attempt's rows of a table
//!
//! A snapshot can be taken more than once into one topic: a producer that dies before the
//! slot's snapshot is `done` drops the slot on its next run and snapshots again under a new
//! one. So consumers can tell attempts apart and know when one holds a table whole, each
//! table's rows are framed by markers (`walrelay_common::event`, "Snapshot markers"), each sent
//! to every partition:
//!
//! ```text
//!   schema event ─▶ snapshot_start ─▶ rows (chunks, any worker) ─▶ snapshot_end
//!   └─ both before any chunk is read ─┘                            └─ by the worker that
//!                                                                     counts the last chunk
//! ```
//!
//! A worker counts its chunk only after handing all of its rows to the writer, and the writer
//! keeps the order records were handed to it per partition (idempotent producer), so on every
//! partition the end marker follows all of the table's rows of the attempt. Markers carry what
//! snapshot rows carry (`snapshot: true`, both LSNs = the consistent point, `ts_ms` = when the
//! snapshot began, the table's `key`/`types`) and the frame: the consistent point, the rows
//! read (end only) and the **attempt id**, the consistent point in hex and the start time in ms
//! ([`SnapshotJob::attempt`]). A new slot gets a new consistent point (creating it writes WAL);
//! the time tells attempts apart even where positions could repeat (a cluster restored from a
//! backup). Markers count in the snapshot pseudo-transaction like rows: the snapshot is `done`
//! only once Kafka acknowledged every end marker too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, pin_mut};
use tokio_postgres::Client;
use walrelay_common::event::{Op, SnapshotFrame};

use crate::catalog::{self, Catalog, PgError, TableRef, quote_ident, quote_literal};
use crate::checkpoint::{Checkpointer, TxnId};
use crate::ddl::{self, Origin, Registry};
use crate::emit::{Emitter, RowChange};
use crate::encode::{EventMeta, Image, TableShape};
use crate::error::RunError;
use crate::metrics::Metrics;
use crate::replication::pgoutput::Cell;

/// What the snapshot needs.
pub struct SnapshotJob {
    /// Postgres connection settings.
    pub postgres: walrelay_common::postgres::PgTarget,
    /// The exported snapshot's name.
    pub snapshot_name: String,
    /// The slot's consistent point.
    pub consistent_lsn: u64,
    /// When the snapshot began, ms since the epoch (the events' `ts_ms`).
    pub started_ms: i64,
    /// Slot (for progress rows).
    pub slot: String,
    /// Connections.
    pub parallelism: usize,
    /// Pages per chunk.
    pub chunk_pages: u32,
}

impl SnapshotJob {
    /// The attempt id the markers carry: the consistent point in hex, `-`, the start time in
    /// ms (see "Framing" in the module essay).
    pub fn attempt(&self) -> String {
        format!("{:X}-{}", self.consistent_lsn, self.started_ms)
    }

    /// The frame of this attempt's markers; `rows` on end markers.
    fn frame(&self, rows: Option<u64>) -> SnapshotFrame {
        SnapshotFrame {
            attempt: self.attempt(),
            consistent_lsn: self.consistent_lsn,
            rows,
        }
    }

    /// What every event of the snapshot carries besides its op.
    fn meta(&self, op: Op) -> EventMeta {
        EventMeta {
            op,
            lsn: self.consistent_lsn,
            commit_lsn: self.consistent_lsn,
            txid: 0,
            ts_ms: self.started_ms,
            snapshot: true,
            incremental: false,
            seq: 0,
            transaction: None,
        }
    }
}

struct TableTask {
    table: TableRef,
    shape: TableShape,
    select: String,
    chunks_total: u32,
    chunks_done: AtomicU64,
    rows: AtomicU64,
    started: Instant,
}

impl TableTask {
    /// How a chunk's `ctid` range joins the SELECT: after the row filter, or as its WHERE.
    fn and_or_where(&self) -> &'static str {
        if self.table.row_filter.is_some() {
            "AND"
        } else {
            "WHERE"
        }
    }
}

struct Chunk {
    table: usize,
    lo: u64,
    hi: Option<u64>,
}

/// Reads every table and hands the rows to `emitter` (each worker a fork of it); returns when
/// Kafka acknowledged all.
pub async fn run(
    job: SnapshotJob,
    ctl: &Client,
    tables: &[TableRef],
    emitter: &mut Emitter,
    checkpointer: Arc<Checkpointer>,
    metrics: Arc<Metrics>,
) -> Result<u64, RunError> {
    let started = Instant::now();
    let block_size: i64 = ctl
        .query_one("SELECT current_setting('block_size')::int8", &[])
        .await
        .map_err(PgError::query("reading block_size"))?
        .get(0);
    let mut catalog = Catalog::new(ctl);
    let mut tasks = Vec::new();
    let mut chunks = VecDeque::new();
    for t in tables {
        let shape = catalog.snapshot_shape(t).await?;
        let cols = shape
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        // The publication's row filter, as the stream applies it (`--row-filter`).
        let filter = t
            .row_filter
            .as_deref()
            .map_or_else(String::new, |f| format!(" WHERE ({f})"));
        let (select, pages) = if t.relkind == "p" {
            (format!("SELECT {cols} FROM {}{filter}", t.sql_name()), 0)
        } else {
            let bytes: i64 = ctl
                .query_one("SELECT pg_relation_size($1::oid::regclass)", &[&t.oid])
                .await
                .map_err(PgError::query(format!("sizing {}", t.qualified())))?
                .get(0);
            (
                format!("SELECT {cols} FROM ONLY {}{filter}", t.sql_name()),
                (bytes / block_size.max(1)) as u64,
            )
        };
        let idx = tasks.len();
        let per = u64::from(job.chunk_pages);
        let n = if t.relkind == "p" {
            1
        } else {
            pages.div_ceil(per).max(1)
        };
        for i in 0..n {
            let hi = if i + 1 == n {
                None
            } else {
                Some((i + 1) * per)
            };
            chunks.push_back(Chunk {
                table: idx,
                lo: i * per,
                hi,
            });
        }
        ctl.execute(
            "INSERT INTO walrelay.snapshot_progress (slot_name, schema_name, table_name, chunks_total) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (slot_name, schema_name, table_name) \
             DO UPDATE SET rows_done = 0, chunks_done = 0, chunks_total = $4",
            &[&job.slot, &t.schema, &t.name, &(n as i32)],
        )
        .await
        .map_err(PgError::query("writing walrelay.snapshot_progress"))?;
        metrics
            .snapshot_progress
            .with_label_values(&[&t.qualified()])
            .set(0.0);
        tasks.push(TableTask {
            table: t.clone(),
            shape,
            select,
            chunks_total: u32::try_from(n).unwrap_or(u32::MAX),
            chunks_done: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            started: Instant::now(),
        });
    }
    tracing::info!(
        tables = tasks.len(),
        chunks = chunks.len(),
        parallelism = job.parallelism,
        "Snapshot started."
    );
    let snap_txn = checkpointer.begin();
    // Schema events and start markers, counted with the rows for the checkpointer.
    let mut framing = 0;
    let mut registry = Registry::new(&job.slot);
    for task in &mut tasks {
        let Some(schema) = ddl::read_schema(ctl, task.table.oid).await? else {
            return Err(PgError::Catalog(format!(
                "{} was dropped while the snapshot started",
                task.table.qualified()
            ))
            .into());
        };
        let origin = Origin {
            kind: "snapshot",
            message: None,
            before: None,
        };
        let version = job.consistent_lsn;
        let event = ddl::schema_event(&mut catalog, &schema, version, origin, false).await?;
        registry
            .record(ctl, version, 0, schema.clone(), false)
            .await?;
        let ids = schema.ids_of(task.shape.columns.iter().map(|c| c.name.as_str()));
        task.shape.set_schema(version, ids);
        framing += emitter
            .schema(
                &event.shape,
                &event.change,
                &job.meta(Op::Ddl),
                snap_txn,
                &mut || {},
            )
            .await?;
        metrics.schema_events.with_label_values(&["snapshot"]).inc();
        framing += emitter
            .snapshot_marker(
                &task.shape,
                &job.meta(Op::SnapshotStart),
                &job.frame(None),
                snap_txn,
                &mut || {},
            )
            .await?;
    }
    tracing::info!(
        attempt = %job.attempt(),
        tables = tasks.len(),
        "Snapshot framed: schema events and start markers sent to every partition."
    );
    let tasks = Arc::new(tasks);
    let queue = Arc::new(Mutex::new(chunks));
    let sent = Arc::new(AtomicU64::new(framing));
    let job = Arc::new(job);
    let mut workers = Vec::new();
    // The count is taken first: a guard in the `for` expression would live through the loop,
    // and a worker spawned in it would block the (single) runtime thread on the queue's lock.
    let chunks_queued = walrelay_common::sync::lock(&queue).len();
    for _ in 0..job.parallelism.min(chunks_queued).max(1) {
        // Every worker imports the snapshot before any reads, while the slot's connection
        // stays idle (a command on it would end the exported snapshot).
        let client = catalog::connect(&job.postgres).await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&job.snapshot_name)
            ))
            .await
            .map_err(PgError::query("importing the exported snapshot"))?;
        let w = Worker {
            client,
            tasks: Arc::clone(&tasks),
            queue: Arc::clone(&queue),
            emitter: emitter.fork(),
            metrics: Arc::clone(&metrics),
            job: Arc::clone(&job),
            sent: Arc::clone(&sent),
            txn: snap_txn,
        };
        workers.push(tokio::spawn(w.run()));
    }
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let mut all = futures_util::future::try_join_all(workers);
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            _ = progress.tick() => report(ctl, &job.slot, &tasks, started).await,
        }
    };
    let results =
        results.map_err(|e| RunError::Protocol(format!("snapshot worker panicked: {e}")))?;
    for r in results {
        r?;
    }
    let total = sent.load(Ordering::SeqCst);
    checkpointer.commit(snap_txn, job.consistent_lsn, total);
    // Complete only once Kafka acknowledged every row.
    while !checkpointer.drained() {
        if let Some(f) = emitter.writer().failure() {
            return Err(f.into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(ctl, &job.slot, &tasks, started).await;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        rows = total,
        seconds = secs,
        rows_per_second = (total as f64 / secs.max(1e-9)) as u64,
        "Snapshot acknowledged by Kafka."
    );
    Ok(total)
}

async fn report(ctl: &Client, slot: &str, tasks: &[TableTask], started: Instant) {
    let mut total = 0;
    for t in tasks {
        let rows = t.rows.load(Ordering::Relaxed);
        total += rows;
        let done = t.chunks_done.load(Ordering::Relaxed) as i32;
        let _ = ctl
            .execute(
                "UPDATE walrelay.snapshot_progress SET rows_done = $4, chunks_done = $5 \
                 WHERE slot_name = $1 AND schema_name = $2 AND table_name = $3",
                &[&slot, &t.table.schema, &t.table.name, &(rows as i64), &done],
            )
            .await;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    tracing::info!(
        rows = total,
        rows_per_second = (total as f64 / secs) as u64,
        "Snapshot progress."
    );
}

struct Worker {
    client: Client,
    tasks: Arc<Vec<TableTask>>,
    queue: Arc<Mutex<VecDeque<Chunk>>>,
    emitter: Emitter,
    metrics: Arc<Metrics>,
    job: Arc<SnapshotJob>,
    sent: Arc<AtomicU64>,
    txn: TxnId,
}

impl Worker {
    async fn run(mut self) -> Result<(), RunError> {
        let mut line = Vec::new();
        let mut scratch = Vec::new();
        let mut ranges = Vec::new();
        loop {
            let chunk = walrelay_common::sync::lock(&self.queue).pop_front();
            let Some(chunk) = chunk else { break };
            let task = &self.tasks[chunk.table];
            let label = task.table.qualified();
            let sql = match (task.table.relkind.as_str(), chunk.hi) {
                ("p", _) => format!("COPY ({}) TO STDOUT", task.select),
                (_, Some(hi)) => format!(
                    "COPY ({} {} ctid >= '({},0)'::tid AND ctid < '({},0)'::tid) TO STDOUT",
                    task.select,
                    task.and_or_where(),
                    chunk.lo,
                    hi
                ),
                (_, None) => format!(
                    "COPY ({} {} ctid >= '({},0)'::tid) TO STDOUT",
                    task.select,
                    task.and_or_where(),
                    chunk.lo
                ),
            };
            let stream = self
                .client
                .copy_out(sql.as_str())
                .await
                .map_err(PgError::query(format!("reading {label}")))?;
            pin_mut!(stream);
            let meta = self.job.meta(Op::Read);
            let mut rows = 0u64;
            line.clear();
            while let Some(buf) = stream.next().await {
                let buf: Bytes = buf.map_err(PgError::query(format!("reading {label}")))?;
                let mut rest: &[u8] = &buf;
                while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
                    let full: &[u8] = if line.is_empty() {
                        &rest[..nl]
                    } else {
                        line.extend_from_slice(&rest[..nl]);
                        &line
                    };
                    parse_copy_line(full, &mut scratch, &mut ranges);
                    let cells: Vec<Cell<'_>> = ranges
                        .iter()
                        .map(|r: &Option<(usize, usize)>| match r {
                            None => Cell::Null,
                            Some((a, b)) => Cell::Text(&scratch[*a..*b]),
                        })
                        .collect();
                    let change = RowChange {
                        before: None,
                        after: Some(Image::full(&cells)),
                        key_row: &cells,
                    };
                    // One record, or more for an oversized row (its chunks).
                    let records = self
                        .emitter
                        .row(&task.shape, &meta, &change, self.txn, &mut || {})
                        .await?;
                    self.sent.fetch_add(records, Ordering::Relaxed);
                    rows += 1;
                    line.clear();
                    rest = &rest[nl + 1..];
                }
                line.extend_from_slice(rest);
            }
            task.rows.fetch_add(rows, Ordering::Relaxed);
            self.metrics
                .snapshot_rows
                .with_label_values(&[&label])
                .inc_by(rows);
            // AcqRel: the worker that counts the last chunk sees every other worker's rows
            // (added before their own count) and sends the end marker after them.
            let done = task.chunks_done.fetch_add(1, Ordering::AcqRel) + 1;
            self.metrics
                .snapshot_progress
                .with_label_values(&[&label])
                .set(done as f64 / f64::from(task.chunks_total.max(1)));
            if done == u64::from(task.chunks_total) {
                let total = task.rows.load(Ordering::Relaxed);
                let markers = self
                    .emitter
                    .snapshot_marker(
                        &task.shape,
                        &self.job.meta(Op::SnapshotEnd),
                        &self.job.frame(Some(total)),
                        self.txn,
                        &mut || {},
                    )
                    .await?;
                self.sent.fetch_add(markers, Ordering::Relaxed);
                let secs = task.started.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(table = %label, rows = total, rows_per_second = (total as f64 / secs) as u64,
                    attempt = %self.job.attempt(), "Table snapshot read; end marker sent to every partition.");
            }
        }
        Ok(())
    }
}

/// Splits one COPY text-format line into fields, unescaping into `scratch`; `None` is NULL.
pub fn parse_copy_line(
    line: &[u8],
    scratch: &mut Vec<u8>,
    fields: &mut Vec<Option<(usize, usize)>>,
) {
    scratch.clear();
    fields.clear();
    let mut i = 0;
    loop {
        let start = scratch.len();
        if line.get(i..i + 2) == Some(b"\\N") && matches!(line.get(i + 2), None | Some(b'\t')) {
            fields.push(None);
            i += 2;
        } else {
            while let Some(&c) = line.get(i) {
                match c {
                    b'\t' => break,
                    b'\\' => {
                        i += 1;
                        let Some(&e) = line.get(i) else { break };
                        match e {
                            b'b' => scratch.push(8),
                            b'f' => scratch.push(12),
                            b'n' => scratch.push(b'\n'),
                            b'r' => scratch.push(b'\r'),
                            b't' => scratch.push(b'\t'),
                            b'v' => scratch.push(11),
                            b'0'..=b'7' => {
                                let mut v = 0u32;
                                let mut n = 0;
                                while n < 3 && matches!(line.get(i), Some(b'0'..=b'7')) {
                                    v = v * 8 + u32::from(line[i] - b'0');
                                    i += 1;
                                    n += 1;
                                }
                                scratch.push(v as u8);
                                continue;
                            }
                            b'x' => {
                                let mut v = 0u32;
                                let mut n = 0;
                                i += 1;
                                while n < 2 && line.get(i).is_some_and(u8::is_ascii_hexdigit) {
                                    v = v * 16 + (line[i] as char).to_digit(16).unwrap_or(0);
                                    i += 1;
                                    n += 1;
                                }
                                scratch.push(v as u8);
                                continue;
                            }
                            other => scratch.push(other),
                        }
                        i += 1;
                    }
                    _ => {
                        scratch.push(c);
                        i += 1;
                    }
                }
            }
            fields.push(Some((start, scratch.len())));
        }
        if line.get(i) == Some(&b'\t') {
            i += 1;
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &[u8]) -> Vec<Option<String>> {
        let (mut s, mut f) = (Vec::new(), Vec::new());
        parse_copy_line(line, &mut s, &mut f);
        f.iter()
            .map(|r| r.map(|(a, b)| String::from_utf8_lossy(&s[a..b]).into_owned()))
            .collect()
    }

    #[test]
    fn attempt_ids_differ_per_slot_and_start() {
        let job = |lsn, ms| SnapshotJob {
            postgres: walrelay_common::postgres::PgTarget::parse("postgres://u@h/db")
                .expect("a connection string"),
            snapshot_name: "s".into(),
            consistent_lsn: lsn,
            started_ms: ms,
            slot: "slot".into(),
            parallelism: 1,
            chunk_pages: 1,
        };
        assert_eq!(
            job(0x16_B374_D848, 1_700_000_000_123).attempt(),
            "16B374D848-1700000000123"
        );
        assert_ne!(job(1, 5).attempt(), job(2, 5).attempt());
        assert_ne!(job(1, 5).attempt(), job(1, 6).attempt());
        let end = job(7, 9).frame(Some(3));
        assert_eq!((end.consistent_lsn, end.rows), (7, Some(3)));
        let meta = job(7, 9).meta(Op::SnapshotEnd);
        assert!(meta.snapshot && meta.lsn == 7 && meta.commit_lsn == 7 && meta.ts_ms == 9);
    }

    #[test]
    fn copy_text_format() {
        assert_eq!(
            fields(b"1\tabc\t\\N"),
            vec![Some("1".into()), Some("abc".into()), None]
        );
        assert_eq!(fields(b"a\\tb\\nc\\\\d"), vec![Some("a\tb\nc\\d".into())]);
        assert_eq!(fields(b"\\x41\\101\\N"), vec![Some("AAN".into())]);
        assert_eq!(
            fields(b"\t"),
            vec![Some(String::new()), Some(String::new())]
        );
        assert_eq!(fields(b"\\\\x00"), vec![Some("\\x00".into())]);
    }
}
