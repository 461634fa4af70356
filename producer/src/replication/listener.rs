//! The listener: reads the replication stream, turns changes into events, hands them to the
//! writer, and keeps the confirmed LSN flowing back to the server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::Op;

use super::pgoutput::{self, Cell, Message, OldKind};
use crate::catalog::{Catalog, build_shape};
use crate::checkpoint::{Checkpointer, TxnId};
use crate::ddl::capture::MESSAGE_PREFIX;
use crate::ddl::{self, Origin, Registry, TableSchema, TriggerMessage};
use crate::kafka::Writer;
use crate::metrics::Metrics;
use crate::pipeline::RunError;
use crate::shape::{ColumnShape, EnvelopeWriter, EventMeta, Image, PartitionKey, TableShape};

/// Microseconds between the Unix epoch and Postgres' epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// How often the confirmed LSN is pushed to the replication client when nothing else does.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// One event to hand to Kafka.
struct Change<'a, 'b> {
    before: Option<Image<'a, 'b>>,
    after: Option<Image<'a, 'b>>,
    /// The row the key is taken from; empty when there is none (a truncate).
    key_row: &'b [Cell<'a>],
    /// An explicit partition (a truncate under primary-key keying), else the key decides.
    partition: Option<i32>,
}

/// Encoding buffers reused for every event.
struct Buffers {
    key: Vec<u8>,
    value: Vec<u8>,
}

struct OpenTxn {
    id: TxnId,
    xid: u32,
    commit_lsn: u64,
    ts_ms: i64,
    seq: u64,
    sent: u64,
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
    /// Kafka writer.
    pub writer: &'a Writer,
    /// Progress tracker.
    pub checkpointer: &'a Checkpointer,
    /// Metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Envelope encoder.
    pub envelope: EnvelopeWriter,
    /// Keying.
    pub partition_key: PartitionKey,
    /// Partitions of the topic (a truncate goes to each under primary-key keying; a schema
    /// event to each always).
    pub partitions: i32,
    /// Schemas of the captured tables as of the stream position.
    pub registry: Registry,
    /// The publication streamed (schema messages of other publications are skipped).
    pub publication: String,
    /// The key trigger messages are authenticated with (`None`: none is accepted).
    pub ddl_key: Option<Vec<u8>>,
    /// What schema events carry of the DDL text.
    pub ddl_statement: crate::config::DdlStatement,
}

/// Rejected DDL-channel messages: the first is logged in full, later ones once a minute.
struct Rejections {
    last_log: Option<std::time::Instant>,
    since_log: u64,
}

impl Rejections {
    fn record(&mut self, metrics: &Metrics, lsn: Lsn, xid: u32, why: &ddl::ChannelError) {
        metrics.errors.with_label_values(&["ddl_rejected"]).inc();
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                %lsn,
                xid,
                rejected = self.since_log,
                reason = %why,
                "Skipped a message in walrelay's DDL channel: {why}. Only walrelay's event triggers can write schema events; see walrelay_producer_errors_total{{kind=\"ddl_rejected\"}}."
            );
            self.last_log = Some(std::time::Instant::now());
            self.since_log = 0;
        }
    }
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

struct Pushed(u64);

fn push_progress(
    client: &ReplicationClient,
    ckpt: &Checkpointer,
    metrics: &Metrics,
    pushed: &mut Pushed,
) {
    let c = ckpt.confirmed();
    if c > pushed.0 {
        client.update_applied_lsn(Lsn::from_u64(c));
        pushed.0 = c;
        metrics.confirmed_lsn.set(c as f64);
    }
}

impl Listener<'_> {
    /// Runs until `shutdown` is cancelled (returns `Ok`) or a failure.
    pub async fn run(mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let mut relations: HashMap<u32, Relation> = HashMap::new();
        let mut txn: Option<OpenTxn> = None;
        let mut bufs = Buffers {
            key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
        };
        let mut pushed = Pushed(self.checkpointer.confirmed());
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut batch_events = 0u64;
        let mut batch_txns = 0u64;
        let mut last_log = std::time::Instant::now();
        let mut rejections = Rejections {
            last_log: None,
            since_log: 0,
        };
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                failure = self.writer.failed() => return Err(failure.into()),
                _ = tick.tick() => {
                    push_progress(self.client, self.checkpointer, self.metrics, &mut pushed);
                    if last_log.elapsed() >= Duration::from_secs(10) && batch_txns > 0 {
                        tracing::info!(events = batch_events, transactions = batch_txns,
                            confirmed_lsn = %Lsn::from_u64(pushed.0), "Streamed.");
                        batch_events = 0;
                        batch_txns = 0;
                        last_log = std::time::Instant::now();
                    }
                    continue;
                }
                ev = self.client.recv() => ev,
            };
            let event = match event {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(RunError::Replication("the replication stream ended".into()));
                }
                Err(e) => return Err(RunError::from_pgwire(e)),
            };
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    if txn.is_some() {
                        return Err(RunError::Protocol(format!(
                            "Begin of xid {xid} inside an open transaction"
                        )));
                    }
                    txn = Some(OpenTxn {
                        id: self.checkpointer.begin(),
                        xid,
                        commit_lsn: final_lsn.as_u64(),
                        ts_ms: pg_micros_to_unix_ms(commit_time_micros),
                        seq: 0,
                        sent: 0,
                    });
                }
                ReplicationEvent::Commit {
                    end_lsn,
                    commit_time_micros,
                    ..
                } => {
                    let Some(t) = txn.take() else {
                        return Err(RunError::Protocol("Commit without Begin".into()));
                    };
                    let commit_us = commit_time_micros + PG_EPOCH_OFFSET_MICROS;
                    self.checkpointer
                        .commit_at(t.id, end_lsn.as_u64(), t.sent, commit_us);
                    self.metrics.transactions.inc();
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0);
                    self.metrics
                        .source_lag_seconds
                        .set((now_ms - pg_micros_to_unix_ms(commit_time_micros)) as f64 / 1000.0);
                    batch_events += t.sent;
                    batch_txns += 1;
                    push_progress(self.client, self.checkpointer, self.metrics, &mut pushed);
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    let server = wal_end.as_u64();
                    if self.checkpointer.idle(server) {
                        push_progress(self.client, self.checkpointer, self.metrics, &mut pushed);
                    }
                    self.metrics
                        .replication_lag_bytes
                        .set(server.saturating_sub(self.checkpointer.confirmed()) as i64);
                }
                ReplicationEvent::XLogData {
                    wal_start, data, ..
                } => {
                    let msg = pgoutput::decode(&data).map_err(|source| RunError::Decode {
                        lsn: wal_start.as_u64(),
                        source,
                    })?;
                    let lsn = wal_start.as_u64();
                    match msg {
                        Message::Relation {
                            oid,
                            namespace,
                            name,
                            columns,
                            ..
                        } => {
                            let mut shaped = Vec::with_capacity(columns.len());
                            for c in &columns {
                                let kind = self
                                    .catalog
                                    .column_kind(c.type_oid, &format!("{namespace}.{name}"), c.name)
                                    .await?;
                                shaped.push(ColumnShape::new(c.name, kind, c.is_key));
                            }
                            let keys = self.catalog.key_columns(oid).await?;
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
                            relations.insert(oid, rel);
                        }
                        Message::Insert { oid, new } => {
                            self.settle(oid, lsn, &mut txn, &mut relations, &mut pushed)
                                .await?;
                            let t = open(&mut txn)?;
                            let shape = shape_of(&relations, oid)?;
                            t.seq += 1;
                            let meta = meta(t, Op::Create, lsn);
                            let change = Change {
                                before: None,
                                after: Some(Image::full(&new.0)),
                                key_row: &new.0,
                                partition: None,
                            };
                            self.emit(&mut bufs, shape, &meta, &change, t, &mut pushed)
                                .await?;
                        }
                        Message::Update { oid, old, mut new } => {
                            self.settle(oid, lsn, &mut txn, &mut relations, &mut pushed)
                                .await?;
                            let t = open(&mut txn)?;
                            let shape = shape_of(&relations, oid)?;
                            // With the full old row (REPLICA IDENTITY FULL), an unchanged
                            // TOASTed value is known: fill it in instead of marking it.
                            if let Some((OldKind::Full, old_row)) = &old {
                                for (i, cell) in new.0.iter_mut().enumerate() {
                                    if let (Cell::UnchangedToast, Some(prev @ Cell::Text(_))) =
                                        (*cell, old_row.0.get(i))
                                    {
                                        *cell = *prev;
                                    }
                                }
                            }
                            t.seq += 1;
                            let meta = meta(t, Op::Update, lsn);
                            let before = old.as_ref().map(|(k, row)| Image {
                                cells: &row.0,
                                identity_only: *k == OldKind::Key,
                            });
                            let change = Change {
                                before,
                                after: Some(Image::full(&new.0)),
                                key_row: &new.0,
                                partition: None,
                            };
                            self.emit(&mut bufs, shape, &meta, &change, t, &mut pushed)
                                .await?;
                        }
                        Message::Delete {
                            oid,
                            old: (kind, old_row),
                        } => {
                            self.settle(oid, lsn, &mut txn, &mut relations, &mut pushed)
                                .await?;
                            let t = open(&mut txn)?;
                            let shape = shape_of(&relations, oid)?;
                            t.seq += 1;
                            let meta = meta(t, Op::Delete, lsn);
                            let change = Change {
                                before: Some(Image {
                                    cells: &old_row.0,
                                    identity_only: kind == OldKind::Key,
                                }),
                                after: None,
                                key_row: &old_row.0,
                                partition: None,
                            };
                            self.emit(&mut bufs, shape, &meta, &change, t, &mut pushed)
                                .await?;
                        }
                        Message::Truncate { oids, .. } => {
                            for &oid in &oids {
                                self.settle(oid, lsn, &mut txn, &mut relations, &mut pushed)
                                    .await?;
                            }
                            let t = open(&mut txn)?;
                            for oid in oids {
                                let shape = shape_of(&relations, oid)?;
                                t.seq += 1;
                                let meta = meta(t, Op::Truncate, lsn);
                                // Under primary-key keying a table's rows are on every
                                // partition: the truncate goes to each, so it is ordered
                                // with all of them.
                                let targets: Vec<Option<i32>> =
                                    if self.partition_key == PartitionKey::PrimaryKey {
                                        (0..self.partitions).map(Some).collect()
                                    } else {
                                        vec![None]
                                    };
                                for partition in targets {
                                    let change = Change {
                                        before: None,
                                        after: None,
                                        key_row: &[],
                                        partition,
                                    };
                                    self.emit(&mut bufs, shape, &meta, &change, t, &mut pushed)
                                        .await?;
                                }
                            }
                        }
                        Message::Type { .. }
                        | Message::Origin { .. }
                        | Message::Begin { .. }
                        | Message::Commit { .. } => {}
                        Message::LogicalMessage { .. } => {}
                    }
                }
                ReplicationEvent::Message {
                    prefix,
                    content,
                    lsn,
                    transactional: true,
                } if prefix == MESSAGE_PREFIX => {
                    let xid = txn.as_ref().map_or(0, |t| t.xid);
                    let message: TriggerMessage =
                        match ddl::verify_message(&content, xid, self.ddl_key.as_deref()) {
                            Ok(mut m) => {
                                m.sql = match self.ddl_statement {
                                    crate::config::DdlStatement::Include => m.sql,
                                    crate::config::DdlStatement::Redact => {
                                        ddl::redact_statement(&m.sql)
                                    }
                                    crate::config::DdlStatement::Omit => String::new(),
                                };
                                m
                            }
                            Err(why) => {
                                rejections.record(self.metrics, lsn, xid, &why);
                                continue;
                            }
                        };
                    self.apply_ddl(
                        &message,
                        lsn.as_u64(),
                        &mut txn,
                        &mut relations,
                        &mut pushed,
                    )
                    .await?;
                }
                // Other logical messages carry no row changes.
                ReplicationEvent::Message { .. } => {}
                ReplicationEvent::StoppedAt { .. } => {
                    return Err(RunError::Replication(
                        "the stream stopped at a stop LSN walrelay never sets".into(),
                    ));
                }
            }
        }
    }

    /// Tags a Relation's shape with the registry's schema when they agree; otherwise the schema
    /// changed without a trigger message (or the table is new to walrelay): the schema the
    /// Relation shows waits for the table's next change ([`Self::settle`]).
    async fn tag_relation(&mut self, oid: u32, rel: &mut Relation) -> Result<(), RunError> {
        if let Some(v) = self.registry.get(oid)
            && v.schema.matches(&rel.namespace, &rel.name, &rel.columns)
        {
            let ids = v.schema.ids_of(rel.columns.iter().map(|(n, _)| n.as_str()));
            rel.shape.set_schema(v.version, ids);
            return Ok(());
        }
        let current = ddl::read_schema(self.catalog.client(), oid).await?;
        rel.pending = Some(TableSchema::from_relation(
            oid,
            &rel.namespace,
            &rel.name,
            &rel.columns,
            current.as_ref(),
        ));
        Ok(())
    }

    /// Before a change of `oid`: emits the schema event of a pending (fallback) schema, with
    /// the change's LSN as its version (a Relation message has no LSN of its own; the first
    /// change under a schema is the same on every replay).
    async fn settle(
        &mut self,
        oid: u32,
        lsn: u64,
        txn: &mut Option<OpenTxn>,
        relations: &mut HashMap<u32, Relation>,
        pushed: &mut Pushed,
    ) -> Result<(), RunError> {
        let Some(schema) = relations.get_mut(&oid).and_then(|r| r.pending.take()) else {
            return Ok(());
        };
        let t = open(txn)?;
        let before = self.registry.get(oid).map(|v| v.schema.clone());
        let origin = Origin {
            kind: "relation",
            message: None,
            before: before.as_ref(),
        };
        let ctl = self.catalog.client();
        let event = ddl::schema_event(&mut self.catalog, &schema, lsn, origin, false).await?;
        self.registry
            .record(ctl, lsn, t.commit_lsn, schema, false)
            .await?;
        if before.is_some() {
            tracing::info!(table = %event.shape.qualified(), "A schema change without a trigger message: derived from the Relation message.");
        }
        self.send_schema(&event, lsn, t, pushed).await?;
        if let Some(rel) = relations.get_mut(&oid) {
            rel.shape.set_schema(lsn, event.shape.column_ids.clone());
        }
        Ok(())
    }

    /// Applies a trigger message: records the table's new schema and emits its schema event.
    async fn apply_ddl(
        &mut self,
        message: &TriggerMessage,
        lsn: u64,
        txn: &mut Option<OpenTxn>,
        relations: &mut HashMap<u32, Relation>,
        pushed: &mut Pushed,
    ) -> Result<(), RunError> {
        let t = open(txn)?;
        let oid = message.table.table_oid;
        let before = self.registry.get(oid).map(|v| v.schema.clone());
        let captured = if message.dropped {
            before.is_some()
        } else {
            message.publications.contains(&self.publication)
        };
        if !captured || (!message.dropped && before.as_ref() == Some(&message.table)) {
            // Another publication's table, or nothing a consumer sees changed (an index, a
            // comment, a partition attached).
            return Ok(());
        }
        let schema = match (&before, message.dropped) {
            // A drop carries only names: keep the last columns for the event.
            (Some(b), true) => TableSchema {
                columns: Vec::new(),
                ..b.clone()
            },
            _ => message.table.clone(),
        };
        let origin = Origin {
            kind: "trigger",
            message: Some(message),
            before: before.as_ref(),
        };
        let ctl = self.catalog.client();
        let event =
            ddl::schema_event(&mut self.catalog, &schema, lsn, origin, message.dropped).await?;
        self.registry
            .record(ctl, lsn, t.commit_lsn, schema.clone(), message.dropped)
            .await?;
        self.send_schema(&event, lsn, t, pushed).await?;
        if message.dropped {
            relations.remove(&oid);
        } else if let Some(rel) = relations.get_mut(&oid)
            && schema.matches(&rel.namespace, &rel.name, &rel.columns)
        {
            // Columns unchanged for pgoutput (a rename of the table arrives with a new
            // Relation anyway): later rows carry the new version even without one.
            let ids = schema.ids_of(rel.columns.iter().map(|(n, _)| n.as_str()));
            rel.shape.set_schema(lsn, ids);
            rel.pending = None;
        }
        Ok(())
    }

    async fn send_schema(
        &self,
        event: &ddl::SchemaEvent,
        lsn: u64,
        t: &mut OpenTxn,
        pushed: &mut Pushed,
    ) -> Result<(), RunError> {
        t.seq += 1;
        let meta = meta(t, Op::Ddl, lsn);
        let client: &ReplicationClient = self.client;
        let (ckpt, metrics) = (self.checkpointer, self.metrics);
        let mut on_wait = || push_progress(client, ckpt, metrics, pushed);
        let sent = ddl::send_schema_event(
            self.writer,
            &self.envelope,
            event,
            &meta,
            self.partition_key,
            self.partitions,
            t.id,
            &mut on_wait,
        )
        .await?;
        t.sent += sent;
        self.metrics.events_of(Op::Ddl).inc_by(sent);
        self.metrics
            .schema_events
            .with_label_values(&[&event.change.origin])
            .inc();
        Ok(())
    }

    /// Encodes one change and hands it to Kafka; counts it as sent by `txn`.
    async fn emit(
        &self,
        bufs: &mut Buffers,
        shape: &TableShape,
        meta: &EventMeta,
        change: &Change<'_, '_>,
        txn: &mut OpenTxn,
        pushed: &mut Pushed,
    ) -> Result<(), RunError> {
        let Buffers { key, value } = bufs;
        key.clear();
        value.clear();
        let key_cells = (!change.key_row.is_empty()).then_some(change.key_row);
        shape.write_key(key, self.partition_key, key_cells);
        self.envelope
            .write(value, shape, meta, change.before, change.after);
        self.metrics.events_of(meta.op).inc();
        self.metrics.event_bytes.inc_by(value.len() as u64);
        let client: &ReplicationClient = self.client;
        let (ckpt, metrics) = (self.checkpointer, self.metrics);
        let mut on_wait = || push_progress(client, ckpt, metrics, pushed);
        self.writer
            .send_to(
                &shape.table,
                key,
                value,
                txn.id,
                change.partition,
                &mut on_wait,
            )
            .await?;
        txn.sent += 1;
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

fn meta(t: &OpenTxn, op: Op, lsn: u64) -> EventMeta {
    EventMeta {
        op,
        lsn,
        commit_lsn: t.commit_lsn,
        txid: u64::from(t.xid),
        ts_ms: t.ts_ms,
        snapshot: false,
        seq: t.seq,
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
