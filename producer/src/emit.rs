//! The emitter: the one way an event leaves the producer.
//!
//! The listener (streaming), the snapshot workers and the schema-event code all hand their
//! events here; none of them touches the encoder or the Kafka writer. The emitter owns:
//!
//! ```text
//!   row images + shape + metadata ──▶ key (routing) and value (the codec, an encode::Encoder)
//!                                 ──▶ route: by key, to one partition, or to every partition
//!                                 ──▶ kafka::Writer (byte budget; acks → checkpointer)
//!                                 ──▶ count: events per op, bytes; records per transaction
//! ```
//!
//! Routing rules, kept here once: a row change goes where its key hashes; a truncate under
//! `primary-key` keying goes to every partition (the table's rows are on all of them, and the
//! truncate must be ordered with each); a schema event always goes to every partition (each
//! partition's consumer must see it before the rows after it). Every call returns how many
//! records it handed over, which the caller adds to its transaction's count for the
//! [`crate::checkpoint::Checkpointer`].
//!
//! Each emitter has its own encoding buffers; [`Emitter::fork`] makes another for a parallel
//! snapshot worker.

use std::sync::Arc;

use walrelay_common::event::{Op, SchemaChange};

use crate::checkpoint::TxnId;
use crate::encode::{Encoder, EventMeta, Image, PartitionKey, TableShape};
use crate::error::RunError;
use crate::kafka::Writer;
use crate::metrics::Metrics;
use crate::replication::pgoutput::Cell;

/// One row change: the images the envelope carries and the row its key is taken from.
#[derive(Clone, Copy)]
pub struct RowChange<'a, 'b> {
    /// The old row (updates with an identity, deletes).
    pub before: Option<Image<'a, 'b>>,
    /// The new row (inserts, updates, snapshot reads).
    pub after: Option<Image<'a, 'b>>,
    /// The row the key is taken from.
    pub key_row: &'b [Cell<'a>],
}

/// Encodes events and hands them to Kafka.
pub struct Emitter {
    writer: Arc<Writer>,
    encoder: Arc<dyn Encoder>,
    partition_key: PartitionKey,
    partitions: i32,
    metrics: Arc<Metrics>,
    /// `<topic>.transactions` under `--transaction-metadata`.
    transactions_topic: Option<Arc<str>>,
    key: Vec<u8>,
    value: Vec<u8>,
}

impl Emitter {
    /// An emitter writing through `writer` to a topic of `partitions` partitions.
    pub fn new(
        writer: Arc<Writer>,
        encoder: Arc<dyn Encoder>,
        partition_key: PartitionKey,
        partitions: i32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            writer,
            encoder,
            partition_key,
            partitions,
            metrics,
            transactions_topic: None,
            key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
        }
    }

    /// Another emitter to the same writer and topic, with buffers of its own.
    pub fn fork(&self) -> Self {
        let mut e = Self::new(
            Arc::clone(&self.writer),
            Arc::clone(&self.encoder),
            self.partition_key,
            self.partitions,
            Arc::clone(&self.metrics),
        );
        e.transactions_topic = self.transactions_topic.clone();
        e
    }

    /// Writes transaction metadata records to `topic` (`--transaction-metadata`).
    pub fn set_transactions_topic(&mut self, topic: &str) {
        self.transactions_topic = Some(Arc::from(topic));
    }

    /// Whether transaction metadata is written.
    pub fn transaction_metadata(&self) -> bool {
        self.transactions_topic.is_some()
    }

    /// A `BEGIN`/`END` record of `<topic>.transactions` (partition 0, keyed `{"id":…}`).
    /// Returns the records sent (0 without `--transaction-metadata`).
    pub async fn transaction_record<F: FnMut()>(
        &mut self,
        record: &walrelay_common::transaction::TransactionRecord,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        let Some(topic) = self.transactions_topic.clone() else {
            return Ok(0);
        };
        if self.writer.is_muted() {
            return Ok(0);
        }
        self.key.clear();
        self.value.clear();
        self.key.extend_from_slice(b"{\"id\":");
        walrelay_common::event::write_json_str(&mut self.key, &record.id);
        self.key.push(b'}');
        self.encoder
            .transaction(&mut self.value, record)
            .map_err(|e| RunError::Protocol(e.to_string()))?;
        self.writer
            .send_to_topic(&topic, &self.key, &self.value, txn, Some(0), on_wait)
            .await?;
        Ok(1)
    }

    /// The writer (for its failure and in-flight state, and Kafka transactions).
    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// A row change (insert, update, delete or snapshot read), routed by its key. `on_wait`
    /// runs while the byte budget is spent. Returns the records sent (1).
    pub async fn row<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        change: &RowChange<'_, '_>,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        self.key.clear();
        self.value.clear();
        let key_cells = (!change.key_row.is_empty()).then_some(change.key_row);
        shape.write_key(&mut self.key, self.partition_key, key_cells);
        self.encoder
            .row(&mut self.value, shape, meta, change.before, change.after);
        self.send(shape, meta.op, txn, None, on_wait).await?;
        Ok(1)
    }

    /// A truncate of `shape`'s table: to the key's partition, or to every partition under
    /// `primary-key` keying. Returns the records sent.
    pub async fn truncate<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        self.encoder.row(&mut self.value, shape, meta, None, None);
        if self.partition_key == PartitionKey::PrimaryKey {
            self.send_to_every_partition(shape, meta.op, txn, on_wait)
                .await
        } else {
            self.send(shape, meta.op, txn, None, on_wait).await?;
            Ok(1)
        }
    }

    /// A schema event of `shape` (tagged with its new version), to every partition. Returns
    /// the records sent.
    pub async fn schema<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        change: &SchemaChange,
        meta: &EventMeta,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        debug_assert_eq!(meta.op, Op::Ddl);
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        self.encoder
            .schema(&mut self.value, shape, meta, change)
            .map_err(|e| RunError::Protocol(e.to_string()))?;
        let sent = self
            .send_to_every_partition(shape, meta.op, txn, on_wait)
            .await?;
        tracing::info!(
            table = %shape.qualified(),
            version = shape.schema_version,
            origin = %change.origin,
            command = change.command.as_deref().unwrap_or(""),
            dropped = change.dropped,
            partitions = self.partitions,
            "Schema event."
        );
        Ok(sent)
    }

    /// A snapshot marker of `shape`'s table (`meta.op` is [`Op::SnapshotStart`] or
    /// [`Op::SnapshotEnd`]), to every partition like a schema event: under any keying a table's
    /// snapshot rows may be on any partition, and each partition's consumer must see where one
    /// attempt's rows of the table begin and end among them. Returns the records sent.
    pub async fn snapshot_marker<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        frame: &walrelay_common::event::SnapshotFrame,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        debug_assert!(meta.op.is_snapshot_marker());
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        self.encoder
            .snapshot_marker(&mut self.value, shape, meta, frame)
            .map_err(|e| RunError::Protocol(e.to_string()))?;
        self.send_to_every_partition(shape, meta.op, txn, on_wait)
            .await
    }

    async fn send_to_every_partition<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        op: Op,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        for p in 0..self.partitions {
            self.send(shape, op, txn, Some(p), on_wait).await?;
        }
        Ok(u64::try_from(self.partitions).unwrap_or(0))
    }

    /// Hands the encoded key and value to the writer and counts them.
    async fn send<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        op: Op,
        txn: TxnId,
        partition: Option<i32>,
        on_wait: &mut F,
    ) -> Result<(), RunError> {
        // A Postgres transaction Kafka already holds (exactly-once, after a restart): decoded
        // again for its schema effects, written and counted nowhere.
        if self.writer.is_muted() {
            return Ok(());
        }
        self.writer
            .send_to(
                &shape.table,
                &self.key,
                &self.value,
                txn,
                partition,
                on_wait,
            )
            .await?;
        self.metrics.events_of(op).inc();
        self.metrics.event_bytes.inc_by(self.value.len() as u64);
        Ok(())
    }
}
