//! The listener: reads the replication stream, turns changes into events, hands them to the
//! emitter, and keeps the confirmed LSN flowing back to the server.
//!
//! [`Listener::run`] only receives and dispatches; what the stream has seen so far (the
//! relations, the open transaction, the progress pushed) is a `Stream`, with one method per
//! kind of message: `begin`, `commit`, `keepalive`, `relation`, `insert`, `update`, `delete`,
//! `truncate` and `ddl_message`. Every event leaves through [`crate::emit::Emitter`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::Op;
use walrelay_common::transaction::{DataCollection, Status, TransactionRecord, transaction_id};

mod incremental;
mod schema;

use self::schema::Rejections;
use super::pgoutput::{self, Cell, Message, OldKind, Tuple};
use crate::catalog::{Catalog, build_shape};
use crate::checkpoint::{Checkpointer, TxnId};
use crate::config::DdlStatement;
use crate::ddl::capture::MESSAGE_PREFIX;
use crate::ddl::{Registry, TableSchema};
use crate::emit::{Emitter, RowChange};
use crate::encode::{ColumnShape, EventMeta, Image, TableShape, TxnOrder};
use crate::error::RunError;
use crate::incremental::{Hub, Outcome, WATERMARK_PREFIX};
use crate::kafka::Writer;
use crate::metrics::Metrics;

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// How often the confirmed LSN is pushed to the replication client when nothing else does.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

struct OpenTxn {
    id: TxnId,
    /// Kafka already holds it (exactly-once, after a restart): decoded, not written.
    muted: bool,
    xid: u32,
    commit_lsn: u64,
    ts_ms: i64,
    seq: u64,
    sent: u64,
    /// Transaction metadata: whether its `BEGIN` went out, its data events, and per table.
    metadata: Option<TxnMetadata>,
}

/// What `--transaction-metadata` counts of an open transaction.
#[derive(Default)]
struct TxnMetadata {
    data_events: u64,
    /// Data events per table (by relation OID), in order of first appearance.
    tables: Vec<(u32, u64)>,
}

impl TxnMetadata {
    /// Counts a data event of `oid`; its place in the transaction.
    fn count(&mut self, oid: u32) -> TxnOrder {
        self.data_events += 1;
        let collection = match self.tables.iter_mut().rev().find(|(o, _)| *o == oid) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.tables.push((oid, 1));
                1
            }
        };
        TxnOrder {
            total: self.data_events,
            collection,
        }
    }
}

/// Converts a Postgres timestamp (µs since 2000-01-01) to ms since the Unix epoch.
pub fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    (micros + PG_EPOCH_OFFSET_MICROS).div_euclid(1000)
}

/// Streams until `shutdown` or an error.
pub struct Listener<'a> {
    /// The replication session (started).
    pub client: &'a mut ReplicationClient,
    /// Catalog reader on an ordinary connection.
    pub catalog: Catalog<'a>,
    /// Where every event goes.
    pub emitter: Emitter,
    /// Progress tracker.
    pub checkpointer: &'a Checkpointer,
    /// The Kafka writer (the emitter's), for Kafka transactions and the confirmable position.
    pub writer: Arc<Writer>,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Schemas of the captured tables as of the stream position.
    pub registry: Registry,
    /// The publication streamed (schema messages of other publications are skipped).
    pub publication: String,
    /// The key trigger messages are authenticated with (`None`: none is accepted).
    pub ddl_key: Option<Vec<u8>>,
    /// What schema events carry of the DDL text.
    pub ddl_statement: DdlStatement,
    /// Under exactly-once: the end LSN Kafka already holds; transactions ending at or below
    /// it are not written again (0: none).
    pub skip_through: u64,
    /// Incremental snapshots: the chunk windows shared with the worker (`None`: off).
    pub incremental: Option<Arc<Hub>>,
}

/// A table as the last Relation message described it.
struct Relation {
    namespace: String,
    name: String,
    /// Published columns: name and type OID.
    columns: Vec<(String, u32)>,
    shape: TableShape,
    /// A schema the registry does not know yet (fallback): its event goes out at the next
    /// change of the table, whose LSN becomes its version.
    pending: Option<TableSchema>,
}

fn push_progress(
    client: &ReplicationClient,
    ckpt: &Checkpointer,
    writer: &Writer,
    metrics: &Metrics,
    pushed: &mut u64,
) {
    // Acknowledged, and under exactly-once also committed in Kafka.
    let c = writer.confirmable(ckpt.confirmed());
    if c > *pushed {
        client.update_applied_lsn(Lsn::from_u64(c));
        *pushed = c;
        metrics.confirmed_lsn.set(c as f64);
    }
}

impl Listener<'_> {
    /// The emitter, and what to do while it waits on a spent byte budget: keep handing the
    /// confirmed LSN to the server (acks go on arriving), so Postgres sees progress.
    fn emitter_and_progress<'s>(
        &'s mut self,
        pushed: &'s mut u64,
    ) -> (&'s mut Emitter, impl FnMut() + 's) {
        let Listener {
            emitter,
            client,
            checkpointer,
            metrics,
            writer,
            ..
        } = self;
        let (client, checkpointer, metrics, writer): (
            &ReplicationClient,
            &Checkpointer,
            &Metrics,
            &Writer,
        ) = (client, checkpointer, metrics, writer);
        (emitter, move || {
            push_progress(client, checkpointer, writer, metrics, pushed);
        })
    }

    /// Runs until `shutdown` is cancelled (returns `Ok`) or a failure.
    pub async fn run(self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let mut stream = Stream {
            pushed: self.writer.confirmable(self.checkpointer.confirmed()),
            io: self,
            relations: HashMap::new(),
            txn: None,
            batch_events: 0,
            batch_txns: 0,
            last_log: std::time::Instant::now(),
            rejections: Rejections {
                last_log: None,
                since_log: 0,
            },
            shutdown: shutdown.clone(),
            walrelay_tables: HashSet::new(),
            chunk_acks: Vec::new(),
        };
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            // Under exactly-once, between Postgres transactions with a Kafka transaction open:
            // commit as soon as the stream pauses (`recv` has nothing ready; it is polled
            // first). A busy stream commits at a Postgres commit once the Kafka transaction is
            // `--transaction-interval` old (in `commit`).
            let idle_commit = stream.txn.is_none() && stream.io.writer.transaction_open();
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => return stream.stop().await,
                failure = stream.io.writer.failed() => return Err(failure.into()),
                _ = tick.tick() => {
                    stream.tick();
                    continue;
                }
                ev = stream.io.client.recv() => ev,
                () = std::future::ready(()), if idle_commit => {
                    stream.commit_kafka().await?;
                    continue;
                }
            };
            match event {
                Ok(Some(ev)) => stream.event(ev).await?,
                Ok(None) => {
                    return Err(RunError::Replication("the replication stream ended".into()));
                }
                Err(e) => return Err(RunError::from_pgwire(e)),
            }
        }
    }
}

/// What the stream has seen so far, and the listener's parts.
struct Stream<'a> {
    io: Listener<'a>,
    relations: HashMap<u32, Relation>,
    txn: Option<OpenTxn>,
    /// The confirmed LSN last handed to the replication client.
    pushed: u64,
    batch_events: u64,
    batch_txns: u64,
    last_log: std::time::Instant,
    rejections: Rejections,
    /// Cancelled on SIGTERM/SIGINT: a Kafka commit waiting on an absent broker gives way.
    shutdown: CancellationToken,
    /// walrelay's own published tables (the snapshot signal table): never emitted.
    walrelay_tables: HashSet<u32>,
    /// Incremental-snapshot chunks emitted in the open transaction: told its end LSN at
    /// commit (rows, dropped).
    chunk_acks: Vec<(tokio::sync::oneshot::Sender<Outcome>, u64, u64)>,
}

/// How long a stop waits for the last Kafka commit (exactly-once) before leaving the open
/// transaction to the next instance, which aborts it.
const STOP_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

impl Stream<'_> {
    fn push_progress(&mut self) {
        push_progress(
            self.io.client,
            self.io.checkpointer,
            &self.io.writer,
            self.io.metrics,
            &mut self.pushed,
        );
    }

    /// Under exactly-once: commits the open Kafka transaction (only between Postgres
    /// transactions) and pushes the position it covers.
    async fn commit_kafka(&mut self) -> Result<(), RunError> {
        debug_assert!(self.txn.is_none());
        let writer = Arc::clone(&self.io.writer);
        tokio::select! {
            r = writer.commit() => r?,
            // Stopping while Kafka is away: the stop tries once more, with a timeout.
            () = self.shutdown.cancelled() => return Ok(()),
        }
        self.push_progress();
        Ok(())
    }

    /// A stop between transactions commits what Kafka holds of whole ones; a stop inside one
    /// aborts the Kafka transaction, so no part of it becomes visible.
    async fn stop(&mut self) -> Result<(), RunError> {
        let writer = Arc::clone(&self.io.writer);
        if !writer.exactly_once() {
            return Ok(());
        }
        let ended = if self.txn.is_none() {
            tokio::time::timeout(STOP_COMMIT_TIMEOUT, async {
                writer.commit().await?;
                self.push_progress();
                Ok::<_, RunError>(())
            })
            .await
        } else {
            tokio::time::timeout(STOP_COMMIT_TIMEOUT, async {
                writer.abort().await;
                Ok(())
            })
            .await
        };
        match ended {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(
                    "Kafka did not settle the open transaction within 30 s; the next start aborts it and sends its changes again."
                );
                Ok(())
            }
        }
    }

    /// The progress tick: push the confirmed LSN; log a summary every 10 s of activity.
    fn tick(&mut self) {
        self.push_progress();
        if self.last_log.elapsed() >= Duration::from_secs(10) && self.batch_txns > 0 {
            tracing::info!(events = self.batch_events, transactions = self.batch_txns,
                confirmed_lsn = %Lsn::from_u64(self.pushed), "Streamed.");
            self.batch_events = 0;
            self.batch_txns = 0;
            self.last_log = std::time::Instant::now();
        }
    }

    async fn event(&mut self, event: ReplicationEvent) -> Result<(), RunError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => self.begin(final_lsn.as_u64(), xid, commit_time_micros),
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => self.commit(end_lsn.as_u64(), commit_time_micros).await,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                self.keepalive(wal_end.as_u64());
                Ok(())
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.change(wal_start.as_u64(), &data).await,
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                transactional: true,
            } if prefix == MESSAGE_PREFIX => self.ddl_message(&content, lsn).await,
            ReplicationEvent::Message {
                prefix,
                content,
                lsn,
                transactional: true,
            } if prefix == WATERMARK_PREFIX => self.watermark(&content, lsn).await,
            // Other logical messages carry no row changes.
            ReplicationEvent::Message { .. } => Ok(()),
            ReplicationEvent::StoppedAt { .. } => Err(RunError::Replication(
                "the stream stopped at a stop LSN walrelay never sets".into(),
            )),
        }
    }

    fn begin(&mut self, final_lsn: u64, xid: u32, commit_time_micros: i64) -> Result<(), RunError> {
        if self.txn.is_some() {
            return Err(RunError::Protocol(format!(
                "Begin of xid {xid} inside an open transaction"
            )));
        }
        // The commit record starts at `final_lsn`; one that starts below the end of the last
        // transaction Kafka holds is that transaction or an earlier one.
        let muted = final_lsn < self.io.skip_through;
        self.io.writer.set_muted(muted);
        self.txn = Some(OpenTxn {
            muted,
            id: self.io.checkpointer.begin(),
            xid,
            commit_lsn: final_lsn,
            ts_ms: pg_micros_to_unix_ms(commit_time_micros),
            seq: 0,
            sent: 0,
            metadata: None,
        });
        Ok(())
    }

    async fn commit(&mut self, end_lsn: u64, commit_time_micros: i64) -> Result<(), RunError> {
        let Some(t) = self.txn.take() else {
            return Err(RunError::Protocol("Commit without Begin".into()));
        };
        let commit_us = commit_time_micros + PG_EPOCH_OFFSET_MICROS;
        let mut t = t;
        if let Some(m) = t.metadata.take() {
            let record = TransactionRecord {
                status: Status::End,
                id: transaction_id(u64::from(t.xid), t.commit_lsn),
                event_count: Some(m.data_events),
                data_collections: Some(
                    m.tables
                        .iter()
                        .map(|(oid, n)| DataCollection {
                            data_collection: self
                                .relations
                                .get(oid)
                                .map(|r| format!("{}.{}", r.namespace, r.name))
                                .unwrap_or_else(|| oid.to_string()),
                            event_count: *n,
                        })
                        .collect(),
                ),
                ts_ms: t.ts_ms,
            };
            let (emitter, mut on_wait) = self.io.emitter_and_progress(&mut self.pushed);
            t.sent += emitter
                .transaction_record(&record, t.id, &mut on_wait)
                .await?;
        }
        let sent = if t.muted { 0 } else { t.sent };
        self.io
            .checkpointer
            .commit_at(t.id, end_lsn, sent, commit_us);
        for (reply, rows, dropped) in self.chunk_acks.drain(..) {
            let _ = reply.send(Outcome::Emitted {
                rows,
                dropped,
                end_lsn,
            });
        }
        if t.muted {
            self.io.writer.set_muted(false);
        }
        self.io.writer.transaction_ended(end_lsn);
        if self
            .io
            .writer
            .commit_due()
            .is_some_and(|at| at <= std::time::Instant::now())
        {
            self.commit_kafka().await?;
        }
        let metrics = self.io.metrics;
        metrics.transactions.inc();
        metrics.source_lag_seconds.set(
            (walrelay_common::clock::now_ms() - pg_micros_to_unix_ms(commit_time_micros)) as f64
                / 1000.0,
        );
        self.batch_events += sent;
        self.batch_txns += 1;
        self.push_progress();
        Ok(())
    }

    fn keepalive(&mut self, server: u64) {
        if self.io.checkpointer.idle(server) {
            self.push_progress();
        }
        self.io
            .metrics
            .replication_lag_bytes
            .set(server.saturating_sub(self.io.checkpointer.confirmed()) as i64);
    }

    /// One pgoutput message.
    async fn change(&mut self, lsn: u64, data: &Bytes) -> Result<(), RunError> {
        let msg = pgoutput::decode(data).map_err(|source| RunError::Decode { lsn, source })?;
        match msg {
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
                ..
            } => self.relation(oid, namespace, name, &columns).await,
            Message::Insert { oid, new } => self.insert(oid, lsn, &new).await,
            Message::Update { oid, old, new } => self.update(oid, lsn, old.as_ref(), new).await,
            Message::Delete { oid, old } => self.delete(oid, lsn, old.0, &old.1).await,
            Message::Truncate { oids, .. } => self.truncate(lsn, &oids).await,
            Message::Type { .. }
            | Message::Origin { .. }
            | Message::Begin { .. }
            | Message::Commit { .. }
            | Message::LogicalMessage { .. } => Ok(()),
        }
    }

    async fn relation(
        &mut self,
        oid: u32,
        namespace: &str,
        name: &str,
        columns: &[pgoutput::Column<'_>],
    ) -> Result<(), RunError> {
        if namespace == crate::incremental::SIGNAL_TABLE.0 {
            // walrelay's own table in the publication: read, never emitted.
            self.walrelay_tables.insert(oid);
            return Ok(());
        }
        let mut shaped = Vec::with_capacity(columns.len());
        for c in columns {
            let kind = self
                .io
                .catalog
                .column_kind(c.type_oid, &format!("{namespace}.{name}"), c.name)
                .await?;
            shaped.push(
                ColumnShape::new(c.name, kind, c.is_key).with_type(c.type_oid, c.type_modifier),
            );
        }
        let keys = self.io.catalog.key_columns(oid).await?;
        let mut rel = Relation {
            namespace: namespace.to_string(),
            name: name.to_string(),
            columns: columns
                .iter()
                .map(|c| (c.name.to_string(), c.type_oid))
                .collect(),
            shape: build_shape(namespace, name, shaped, &keys),
            pending: None,
        };
        self.tag_relation(oid, &mut rel).await?;
        self.relations.insert(oid, rel);
        Ok(())
    }

    async fn insert(&mut self, oid: u32, lsn: u64, new: &Tuple<'_>) -> Result<(), RunError> {
        let change = RowChange {
            before: None,
            after: Some(Image::full(&new.0)),
            key_row: &new.0,
        };
        self.row(oid, lsn, Op::Create, &change).await
    }

    async fn update(
        &mut self,
        oid: u32,
        lsn: u64,
        old: Option<&(OldKind, Tuple<'_>)>,
        mut new: Tuple<'_>,
    ) -> Result<(), RunError> {
        // With the full old row (REPLICA IDENTITY FULL), an unchanged TOASTed value is known:
        // fill it in instead of marking it.
        if let Some((OldKind::Full, old_row)) = old {
            for (i, cell) in new.0.iter_mut().enumerate() {
                if let (Cell::UnchangedToast, Some(prev @ Cell::Text(_))) =
                    (*cell, old_row.0.get(i))
                {
                    *cell = *prev;
                }
            }
        }
        // An update that moved the row to another key: the old key's delete goes first, as
        // an event of its own keyed (and so partitioned) by the old key, so that every change
        // of a key stays in that key's partition, in order (a consumer applying partitions
        // independently would otherwise see the delete before the old key's earlier changes).
        // Postgres logs the old key when it changed, and also when a key value is stored out
        // of line (TOAST) though unchanged: the key cells are compared (a new cell sent as
        // unchanged TOAST is the old value).
        if let Some((kind, old_row)) = old {
            let shape = shape_of(&self.relations, oid)?;
            let moved = shape
                .key_columns
                .iter()
                .any(|&i| match (old_row.0.get(i), new.0.get(i)) {
                    (_, Some(Cell::UnchangedToast)) => false,
                    (a, b) => a != b,
                });
            if moved {
                self.delete(oid, lsn, *kind, old_row).await?;
            }
        }
        let change = RowChange {
            before: old.map(|(k, row)| Image {
                cells: &row.0,
                identity_only: *k == OldKind::Key,
            }),
            after: Some(Image::full(&new.0)),
            key_row: &new.0,
        };
        self.row(oid, lsn, Op::Update, &change).await
    }

    async fn delete(
        &mut self,
        oid: u32,
        lsn: u64,
        kind: OldKind,
        old: &Tuple<'_>,
    ) -> Result<(), RunError> {
        let change = RowChange {
            before: Some(Image {
                cells: &old.0,
                identity_only: kind == OldKind::Key,
            }),
            after: None,
            key_row: &old.0,
        };
        self.row(oid, lsn, Op::Delete, &change).await
    }

    /// What an insert, update and delete share: the pending schema first, then the row.
    async fn row(
        &mut self,
        oid: u32,
        lsn: u64,
        op: Op,
        change: &RowChange<'_, '_>,
    ) -> Result<(), RunError> {
        if self.walrelay_tables.contains(&oid) {
            if op == Op::Create
                && let Some(hub) = &self.io.incremental
            {
                hub.poke();
            }
            return Ok(());
        }
        self.settle(oid, lsn).await?;
        if let Some(hub) = &self.io.incremental
            && hub.watching()
        {
            let shape = shape_of(&self.relations, oid)?;
            let key: Vec<Cell<'_>> = shape
                .key_columns
                .iter()
                .map(|&i| change.key_row.get(i).copied().unwrap_or(Cell::Null))
                .collect();
            let xid = self.txn.as_ref().map_or(0, |t| t.xid);
            hub.changed(oid, xid, &key);
        }
        let Self {
            io,
            relations,
            txn,
            pushed,
            ..
        } = self;
        let t = open(txn)?;
        let shape = shape_of(relations, oid)?;
        t.seq += 1;
        let (emitter, mut on_wait) = io.emitter_and_progress(pushed);
        let order = transaction_order(emitter, t, oid, &mut on_wait).await?;
        let meta = EventMeta {
            transaction: order,
            ..meta(t, op, lsn)
        };
        t.sent += emitter
            .row(shape, &meta, change, t.id, &mut on_wait)
            .await?;
        Ok(())
    }

    async fn truncate(&mut self, lsn: u64, oids: &[u32]) -> Result<(), RunError> {
        let oids: Vec<u32> = oids
            .iter()
            .copied()
            .filter(|o| !self.walrelay_tables.contains(o))
            .collect();
        if let Some(hub) = &self.io.incremental {
            let xid = self.txn.as_ref().map_or(0, |t| t.xid);
            for &oid in &oids {
                hub.truncated(oid, xid);
            }
        }
        let oids = &oids[..];
        for &oid in oids {
            self.settle(oid, lsn).await?;
        }
        let Self {
            io,
            relations,
            txn,
            pushed,
            ..
        } = self;
        let t = open(txn)?;
        let (emitter, mut on_wait) = io.emitter_and_progress(pushed);
        for &oid in oids {
            let shape = shape_of(relations, oid)?;
            t.seq += 1;
            let order = transaction_order(emitter, t, oid, &mut on_wait).await?;
            let meta = EventMeta {
                transaction: order,
                ..meta(t, Op::Truncate, lsn)
            };
            t.sent += emitter.truncate(shape, &meta, t.id, &mut on_wait).await?;
        }
        Ok(())
    }
}

fn open(txn: &mut Option<OpenTxn>) -> Result<&mut OpenTxn, RunError> {
    txn.as_mut()
        .ok_or_else(|| RunError::Protocol("a change outside a transaction".into()))
}

fn shape_of(relations: &HashMap<u32, Relation>, oid: u32) -> Result<&TableShape, RunError> {
    relations.get(&oid).map(|r| &r.shape).ok_or_else(|| {
        RunError::Protocol(format!(
            "a change of relation {oid} before its Relation message"
        ))
    })
}

/// Under `--transaction-metadata`: the `BEGIN` record before the transaction's first data
/// event, and this event's place in it.
async fn transaction_order<F: FnMut()>(
    emitter: &mut Emitter,
    t: &mut OpenTxn,
    oid: u32,
    on_wait: &mut F,
) -> Result<Option<TxnOrder>, RunError> {
    if !emitter.transaction_metadata() {
        return Ok(None);
    }
    if t.metadata.is_none() {
        let record = TransactionRecord {
            status: Status::Begin,
            id: transaction_id(u64::from(t.xid), t.commit_lsn),
            event_count: None,
            data_collections: None,
            ts_ms: t.ts_ms,
        };
        t.sent += emitter.transaction_record(&record, t.id, on_wait).await?;
        t.metadata = Some(TxnMetadata::default());
    }
    Ok(t.metadata.as_mut().map(|m| m.count(oid)))
}

fn meta(t: &OpenTxn, op: Op, lsn: u64) -> EventMeta {
    EventMeta {
        op,
        lsn,
        commit_lsn: t.commit_lsn,
        txid: u64::from(t.xid),
        ts_ms: t.ts_ms,
        snapshot: false,
        incremental: false,
        seq: t.seq,
        transaction: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_epoch_conversion() {
        assert_eq!(pg_micros_to_unix_ms(0), 946_684_800_000);
        assert_eq!(pg_micros_to_unix_ms(1_500), 946_684_800_001);
    }
}
