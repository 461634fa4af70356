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
//!
//! # Topics (`--topic-routing`, `--schema-events`, `--compat`)
//!
//! ```text
//!   single:    every table ──▶ <topic>
//!   per-table: schema.table ──▶ <topic>.<schema>.<table>   (created on first use, as <topic> is)
//!   schema events ──▶ the table's topic, every partition   (inline, the default)
//!                 ──▶ <topic>.schema-changes, one partition (--schema-events topic)
//! ```
//!
//! A per-table topic name keeps `[A-Za-z0-9._-]` and turns every other character into `_`.
//! Under `--compat debezium` schema events go to `<topic>.schema-changes` and snapshot markers
//! are not written, so a data topic holds only what a Debezium reader knows.
//!
//! # What leaves the database (`--columns-exclude`, `--columns-mask`)
//!
//! Every method here first projects the table's shape (and a row's cells, a schema event's
//! columns) through the [`ColumnPolicy`]: excluded columns dropped, masked ones rewritten, so
//! no codec, key or topic ever sees what the policy withholds ([`crate::policy`] holds the
//! invariant). Projections are cached per source shape (its fingerprint); a table no rule
//! touches costs one cache look-up per event.
//!
//! # Formats
//!
//! JSON: the key is the routing key, librdkafka's partitioner (murmur2, Kafka's) places it.
//! Avro ([`crate::avro`]): the key is the table's Avro `Key` record, and the partition is
//! computed here with the same murmur2 over the routing key, so a row lands where JSON would
//! put it and the per-schema/per-table orders are kept whatever the record key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use walrelay_common::event::{Op, SchemaChange};
use walrelay_common::retry::Backoff;

use crate::avro::{AvroCodec, Fixed, PrepareError, Prepared};
use crate::checkpoint::TxnId;
use crate::encode::{EncodeError, Encoder, EventMeta, Image, PartitionKey, TableShape};
use crate::error::RunError;
use crate::kafka::Writer;
use crate::metrics::Metrics;
use crate::policy::{ColumnPolicy, Projection};
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

/// The record format.
#[derive(Clone)]
pub enum Codec {
    /// JSON envelopes.
    Json(Arc<dyn Encoder>),
    /// Avro with a schema registry.
    Avro(Arc<AvroCodec>),
}

/// Where events go.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `--topic`.
    pub topic: Arc<str>,
    /// `--topic-routing per-table`.
    pub per_table: bool,
    /// `<topic>.schema-changes` under `--schema-events topic`.
    pub schema_topic: Option<Arc<str>>,
    /// Whether snapshot markers are written (not under `--compat debezium`).
    pub markers: bool,
}

impl Routing {
    /// Everything to `topic`, schema events and markers inline.
    pub fn single(topic: &str) -> Self {
        Self {
            topic: Arc::from(topic),
            per_table: false,
            schema_topic: None,
            markers: true,
        }
    }
}

/// The topic of a table under per-table routing: `<topic>.<schema>.<table>`, with characters
/// Kafka refuses in a topic name turned into `_`.
pub fn table_topic(topic: &str, schema: &str, table: &str) -> Result<String, EncodeError> {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let name = format!("{topic}.{}.{}", clean(schema), clean(table));
    if name.len() > 249 {
        return Err(EncodeError::new(format!(
            "table {schema}.{table}: its topic name {name:?} is longer than Kafka's 249 characters; use a shorter --topic or --topic-routing single"
        )));
    }
    Ok(name)
}

/// An image of projected cells.
fn image_of<'a, 'b>(x: &'b Option<(Vec<Cell<'a>>, bool)>) -> Option<Image<'a, 'b>> {
    x.as_ref().map(|(cells, identity_only)| Image {
        cells: cells.as_slice(),
        identity_only: *identity_only,
    })
}

/// Kafka's murmur2 (the Java client's and librdkafka's `murmur2` partitioner).
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition Kafka's murmur2 partitioner gives `key` among `partitions`.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    let n = partitions.max(1) as u32;
    ((murmur2(key) & 0x7fff_ffff) % n) as i32
}

/// A topic and its partition count.
#[derive(Debug, Clone)]
struct Topic {
    name: Arc<str>,
    partitions: i32,
}

/// Records up to this size are handed over without asking the topic's limit: below Kafka's
/// default max.message.bytes (1 MB), which a topic is rarely set under. Only a larger record
/// makes the emitter read the limit (once per topic, [`Writer::event_limit`]), so small events
/// never wait on a DescribeConfigs request.
const WHOLE_WITHOUT_LOOKUP_BYTES: usize = 960 << 10;

/// Encodes events and hands them to Kafka.
pub struct Emitter {
    writer: Arc<Writer>,
    codec: Codec,
    partition_key: PartitionKey,
    partitions: i32,
    metrics: Arc<Metrics>,
    routing: Arc<Routing>,
    /// `<topic>.transactions` under `--transaction-metadata`.
    transactions_topic: Option<Arc<str>>,
    /// Per-table topics known to exist, by `schema.table`.
    topics: HashMap<(String, String), Topic>,
    /// Chunk topics (`<topic>.oversized`) known to exist, by their topic.
    chunk_topics: HashMap<Arc<str>, Arc<str>>,
    /// Registered Avro schemas by shape fingerprint (which names the table, and so its topic).
    prepared: HashMap<u64, Arc<Prepared>>,
    /// Excluded and masked columns.
    columns: Arc<ColumnPolicy>,
    /// Projections by source shape fingerprint; `None`: the table is written as it is.
    projections: HashMap<u64, Option<Arc<Projection>>>,
    /// Registered fixed Avro schemas by (topic, record).
    fixed: HashMap<(Arc<str>, Fixed), u32>,
    /// The routing key (the Kafka key under JSON).
    key: Vec<u8>,
    /// The Kafka key under Avro.
    record_key: Vec<u8>,
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
        let topic = writer.topic().to_string();
        Self::with(
            writer,
            Codec::Json(encoder),
            Routing::single(&topic),
            partition_key,
            partitions,
            metrics,
        )
    }

    /// An emitter with a codec and routing of its own.
    pub fn with(
        writer: Arc<Writer>,
        codec: Codec,
        routing: Routing,
        partition_key: PartitionKey,
        partitions: i32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            writer,
            codec,
            partition_key,
            partitions,
            metrics,
            routing: Arc::new(routing),
            transactions_topic: None,
            topics: HashMap::new(),
            chunk_topics: HashMap::new(),
            prepared: HashMap::new(),
            columns: Arc::new(ColumnPolicy::default()),
            projections: HashMap::new(),
            fixed: HashMap::new(),
            key: Vec::with_capacity(256),
            record_key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
        }
    }

    /// Another emitter to the same writer and topics, with buffers of its own.
    pub fn fork(&self) -> Self {
        let mut e = Self {
            writer: Arc::clone(&self.writer),
            codec: self.codec.clone(),
            partition_key: self.partition_key,
            partitions: self.partitions,
            metrics: Arc::clone(&self.metrics),
            routing: Arc::clone(&self.routing),
            transactions_topic: self.transactions_topic.clone(),
            topics: self.topics.clone(),
            chunk_topics: self.chunk_topics.clone(),
            prepared: self.prepared.clone(),
            columns: Arc::clone(&self.columns),
            projections: self.projections.clone(),
            fixed: self.fixed.clone(),
            key: Vec::with_capacity(256),
            record_key: Vec::with_capacity(256),
            value: Vec::with_capacity(4096),
        };
        e.transactions_topic = self.transactions_topic.clone();
        e
    }

    /// Writes transaction metadata records to `topic` (`--transaction-metadata`).
    pub fn set_transactions_topic(&mut self, topic: &str) {
        self.transactions_topic = Some(Arc::from(topic));
    }

    /// Applies `--columns-exclude` and `--columns-mask` to every event from now on.
    pub fn set_columns(&mut self, policy: Arc<ColumnPolicy>) {
        self.columns = policy;
        self.projections.clear();
    }

    /// `shape`'s projection through the column policy (cached): `None` when the table is
    /// written as it is. A key the policy would break stops the producer (definite).
    fn projection(&mut self, shape: &TableShape) -> Result<Option<Arc<Projection>>, RunError> {
        if self.columns.is_empty() {
            return Ok(None);
        }
        if let Some(p) = self.projections.get(&shape.fingerprint) {
            return Ok(p.clone());
        }
        let p = self
            .columns
            .project(shape)
            .map_err(|e| RunError::Setup(e.to_string()))?
            .map(Arc::new);
        if let Some(p) = &p {
            tracing::info!(
                table = %shape.qualified(),
                columns_in = shape.columns.len(),
                columns_out = p.shape.columns.len(),
                "Column policy applies to the table: excluded columns dropped, masked ones rewritten."
            );
        }
        self.projections.insert(shape.fingerprint, p.clone());
        Ok(p)
    }

    /// Whether transaction metadata is written.
    pub fn transaction_metadata(&self) -> bool {
        self.transactions_topic.is_some()
    }

    /// The writer (for its failure and in-flight state, and Kafka transactions).
    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// The topic of `shape`'s table, created first under per-table routing.
    async fn topic_of(&mut self, shape: &TableShape) -> Result<Topic, RunError> {
        if !self.routing.per_table {
            return Ok(Topic {
                name: Arc::clone(&self.routing.topic),
                partitions: self.partitions,
            });
        }
        let id = (shape.schema.clone(), shape.table.clone());
        if let Some(t) = self.topics.get(&id) {
            return Ok(t.clone());
        }
        let name = table_topic(&self.routing.topic, &shape.schema, &shape.table)?;
        let partitions = self.writer.ensure_topic(&name, self.partitions).await?;
        let t = Topic {
            name: Arc::from(name),
            partitions,
        };
        self.topics.insert(id, t.clone());
        Ok(t)
    }

    /// `shape`'s registered Avro schemas for `topic`: cached, else registered now.
    async fn prepared<F: FnMut()>(
        &mut self,
        avro: &AvroCodec,
        shape: &TableShape,
        topic: &Arc<str>,
        on_wait: &mut F,
    ) -> Result<Arc<Prepared>, RunError> {
        let id = shape.fingerprint;
        if let Some(p) = self.prepared.get(&id) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(
            self.with_registry(on_wait, || avro.prepare(shape, topic))
                .await?,
        );
        self.prepared.insert(id, Arc::clone(&p));
        Ok(p)
    }

    /// The id of a fixed record's schema under `topic`: cached, else registered now.
    async fn fixed_id<F: FnMut()>(
        &mut self,
        avro: &AvroCodec,
        topic: &Arc<str>,
        which: Fixed,
        on_wait: &mut F,
    ) -> Result<u32, RunError> {
        if let Some(id) = self.fixed.get(&(Arc::clone(topic), which)) {
            return Ok(*id);
        }
        let id = self
            .with_registry(on_wait, || async {
                avro.fixed(topic, which).await.map_err(PrepareError::from)
            })
            .await?;
        self.fixed.insert((Arc::clone(topic), which), id);
        Ok(id)
    }

    /// Runs a registry call until it succeeds or fails definitely. While the registry is
    /// unavailable this waits and retries like a send while Kafka is down: reading pauses,
    /// nothing more is confirmed; the waits go in 200 ms steps, each running `on_wait`, and a
    /// Kafka failure meanwhile ends them.
    async fn with_registry<T, Fut, F>(
        &self,
        on_wait: &mut F,
        mut call: impl FnMut() -> Fut,
    ) -> Result<T, RunError>
    where
        Fut: std::future::Future<Output = Result<T, PrepareError>>,
        F: FnMut(),
    {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut failures = 0u32;
        loop {
            let e = match call().await {
                Ok(v) => {
                    if failures > 0 {
                        tracing::info!(failures, "The schema registry answers again.");
                    }
                    return Ok(v);
                }
                Err(PrepareError::Registry(e)) if e.is_transient() => e,
                Err(PrepareError::Registry(e)) => return Err(e.into()),
                Err(PrepareError::Encode(e)) => return Err(e.into()),
            };
            failures += 1;
            self.metrics.registry_errors.inc();
            if failures == 1 || failures.is_power_of_two() {
                tracing::warn!(error = %e, failures, "Schema registry unavailable: reading pauses and retries.");
            }
            let mut left = backoff.next_wait();
            while !left.is_zero() {
                let step = left.min(Duration::from_millis(200));
                tokio::time::sleep(step).await;
                left -= step;
                on_wait();
                if let Some(f) = self.writer.failure() {
                    return Err(f.into());
                }
            }
        }
    }

    /// A `BEGIN`/`END` record of `<topic>.transactions` (partition 0, keyed `{"id":…}` under
    /// JSON, without a key under Avro). Returns the records sent (0 without
    /// `--transaction-metadata`).
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
        match self.codec.clone() {
            Codec::Json(enc) => {
                self.key.extend_from_slice(b"{\"id\":");
                walrelay_common::event::write_json_str(&mut self.key, &record.id);
                self.key.push(b'}');
                enc.transaction(&mut self.value, record)?;
            }
            Codec::Avro(avro) => {
                let id = self
                    .fixed_id(&avro, &topic, Fixed::Transaction, on_wait)
                    .await?;
                avro.transaction(&mut self.value, id, record);
            }
        }
        self.writer
            .send_to_topic(&topic, &self.key, &self.value, txn, Some(0), on_wait)
            .await?;
        Ok(1)
    }

    /// A row change (insert, update, delete or snapshot read), routed by its key. `on_wait`
    /// runs while the byte budget is spent. Returns the records sent: 1, or with the chunks of
    /// an event over the topic's limit (see `Emitter::oversized_row`).
    pub async fn row<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        change: &RowChange<'_, '_>,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        let Some(p) = self.projection(shape)? else {
            return self.row_as_is(shape, meta, change, txn, on_wait).await;
        };
        let masked = (
            change.before.map(|i| p.mask(i.cells)),
            change.after.map(|i| p.mask(i.cells)),
            p.mask(change.key_row),
        );
        let before = change
            .before
            .zip(masked.0.as_ref())
            .map(|(i, m)| (p.cells(i.cells, m), i.identity_only));
        let after = change
            .after
            .zip(masked.1.as_ref())
            .map(|(i, m)| (p.cells(i.cells, m), i.identity_only));
        let key_row = p.cells(change.key_row, &masked.2);
        let projected = RowChange {
            before: image_of(&before),
            after: image_of(&after),
            key_row: if change.key_row.is_empty() {
                &[]
            } else {
                key_row.as_slice()
            },
        };
        self.row_as_is(&p.shape, meta, &projected, txn, on_wait)
            .await
    }

    /// A row change of a shape already projected.
    async fn row_as_is<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        change: &RowChange<'_, '_>,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        let topic = self.topic_of(shape).await?;
        let partition = self
            .encode_row(
                &topic,
                shape,
                meta,
                change.before,
                change.after,
                change.key_row,
                on_wait,
            )
            .await?;
        let len = self.record_len();
        if len > WHOLE_WITHOUT_LOOKUP_BYTES.min(self.writer.max_event_bytes())
            && !self.writer.is_muted()
        {
            let limit = self.writer.event_limit(&topic.name).await;
            if len > limit {
                return self
                    .oversized_row(&topic, limit, shape, meta, change, txn, on_wait)
                    .await;
            }
        }
        self.send(&topic, shape, meta.op, txn, partition, on_wait)
            .await?;
        Ok(1)
    }

    /// Encodes a row event into the key and value buffers; returns the partition it must go
    /// to when the codec fixes it (Avro).
    #[allow(clippy::too_many_arguments)]
    async fn encode_row<F: FnMut()>(
        &mut self,
        topic: &Topic,
        shape: &TableShape,
        meta: &EventMeta,
        before: Option<Image<'_, '_>>,
        after: Option<Image<'_, '_>>,
        key_row: &[Cell<'_>],
        on_wait: &mut F,
    ) -> Result<Option<i32>, RunError> {
        self.key.clear();
        self.value.clear();
        let key_cells = (!key_row.is_empty()).then_some(key_row);
        shape.write_key(&mut self.key, self.partition_key, key_cells);
        match self.codec.clone() {
            Codec::Json(enc) => {
                enc.row(&mut self.value, shape, meta, before, after);
                Ok(None)
            }
            Codec::Avro(avro) => {
                let p = self.prepared(&avro, shape, &topic.name, on_wait).await?;
                self.record_key.clear();
                avro.row(
                    &mut self.record_key,
                    &mut self.value,
                    &p,
                    shape,
                    meta,
                    (before, after),
                    key_cells,
                )?;
                Ok(Some(partition_of(&self.key, topic.partitions)))
            }
        }
    }

    /// The size of the encoded record (key and value).
    fn record_len(&self) -> usize {
        self.kafka_key().len() + self.value.len()
    }

    /// The encoded record's Kafka key: the routing key under JSON, the Avro key record under
    /// Avro.
    fn kafka_key(&self) -> &[u8] {
        match self.codec {
            Codec::Json(_) => &self.key,
            Codec::Avro(_) => &self.record_key,
        }
    }

    /// An event over its topic's limit (see `walrelay_common::oversized`): the whole event in
    /// chunks to `<topic>.oversized` on the partition the row's key gives, then the row with
    /// its largest values (never key columns) replaced as unchanged TOAST and a reference to
    /// the chunks. Returns the records sent.
    #[allow(clippy::too_many_arguments)]
    async fn oversized_row<F: FnMut()>(
        &mut self,
        topic: &Topic,
        limit: usize,
        shape: &TableShape,
        meta: &EventMeta,
        change: &RowChange<'_, '_>,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        use walrelay_common::oversized::{self, ChunkHeader, Reference};
        let whole = std::mem::take(&mut self.value);
        let partition = partition_of(&self.key, topic.partitions);
        let chunk_topic = self.chunk_topic(topic).await?;
        let chunk_limit = self.writer.event_limit(&chunk_topic).await;
        let chunk_size = (chunk_limit / 2).clamp(16 << 10, 1 << 20);
        let count = u32::try_from(whole.len().div_ceil(chunk_size)).unwrap_or(u32::MAX);
        let id = oversized_id(meta);
        let mut frame = Vec::with_capacity(chunk_size + 256);
        for (index, piece) in whole.chunks(chunk_size).enumerate() {
            frame.clear();
            let header = ChunkHeader {
                id: id.clone(),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                count,
                bytes: whole.len() as u64,
            };
            oversized::write_chunk(&mut frame, &header, piece);
            self.writer
                .send_routed(
                    &chunk_topic,
                    &shape.table,
                    id.as_bytes(),
                    &frame,
                    txn,
                    Some(partition),
                    on_wait,
                )
                .await?;
        }
        // The row with its largest values replaced, largest first, until it fits.
        let mut before: Option<Vec<Cell<'_>>> = change.before.map(|i| i.cells.to_vec());
        let mut after: Option<Vec<Cell<'_>>> = change.after.map(|i| i.cells.to_vec());
        let mut columns: Vec<String> = Vec::new();
        let mut reference = Reference {
            topic: chunk_topic.to_string(),
            partition,
            id,
            columns: Vec::new(),
            chunks: count,
            bytes: whole.len() as u64,
        };
        let mut header = Vec::new();
        // Bytes to take off: first estimated from the whole event, then from each attempt.
        let mut excess = (whole.len() + 1024).saturating_sub(limit);
        loop {
            // Replace values, largest first, until their raw sizes cover the excess.
            let mut removed = 0usize;
            while removed < excess.max(1) {
                let Some((image, i, len)) =
                    largest_cell(shape, before.as_deref(), after.as_deref())
                else {
                    return Err(RunError::from(crate::kafka::WriteError::TooLarge {
                        table: shape.qualified(),
                        bytes: whole.len(),
                        limit,
                        which: "--max-event-bytes, with every value but the key's replaced",
                    }));
                };
                let cells = if image == 0 {
                    before.as_mut()
                } else {
                    after.as_mut()
                };
                if let Some(c) = cells.and_then(|c| c.get_mut(i)) {
                    *c = Cell::UnchangedToast;
                }
                removed += len;
                let name = &shape.columns[i].name;
                if !columns.contains(name) {
                    columns.push(name.clone());
                }
            }
            reference.columns.clone_from(&columns);
            let b = change
                .before
                .zip(before.as_deref())
                .map(|(img, cells)| Image { cells, ..img });
            let a = change
                .after
                .zip(after.as_deref())
                .map(|(img, cells)| Image { cells, ..img });
            self.encode_row(topic, shape, meta, b, a, change.key_row, on_wait)
                .await?;
            header.clear();
            serde_json::to_writer(&mut header, &reference)
                .map_err(|e| crate::encode::EncodeError::new(e.to_string()))?;
            if let Codec::Json(_) = self.codec
                && self.value.last() == Some(&b'}')
            {
                self.value.pop();
                self.value.extend_from_slice(b",\"oversized\":");
                self.value.extend_from_slice(&header);
                self.value.push(b'}');
            }
            let len = self.record_len() + header.len() + oversized::HEADER.len();
            if len <= limit {
                break;
            }
            excess = len - limit + 1024;
        }
        let key = self.kafka_key();
        self.writer
            .send_with_header(
                &topic.name,
                &shape.table,
                (key, &self.value),
                (oversized::HEADER, &header),
                txn,
                Some(partition),
                on_wait,
            )
            .await?;
        self.metrics.events_of(meta.op).inc();
        self.metrics.event_bytes.inc_by(self.value.len() as u64);
        self.metrics.oversized_events.inc();
        self.metrics.oversized_bytes.inc_by(whole.len() as u64);
        tracing::info!(
            table = %shape.qualified(),
            bytes = whole.len(),
            limit = limit,
            chunks = count,
            chunk_topic = %chunk_topic,
            columns = ?columns,
            "An event over the limit went to the chunk topic; its row carries a reference."
        );
        Ok(u64::from(count) + 1)
    }

    /// `<topic>.oversized` of `topic`, created (with as many partitions) on first use.
    async fn chunk_topic(&mut self, topic: &Topic) -> Result<Arc<str>, RunError> {
        if let Some(t) = self.chunk_topics.get(&topic.name) {
            return Ok(Arc::clone(t));
        }
        let name = walrelay_common::oversized::chunk_topic(&topic.name);
        let partitions = self.writer.ensure_topic(&name, topic.partitions).await?;
        if partitions < topic.partitions {
            return Err(RunError::from(crate::kafka::WriteError::Client(format!(
                "topic {name} has {partitions} partitions, fewer than {}'s {}: chunks go to the \
                 partition number of their row; add partitions to {name}",
                topic.name, topic.partitions
            ))));
        }
        let name: Arc<str> = Arc::from(name);
        self.chunk_topics
            .insert(Arc::clone(&topic.name), Arc::clone(&name));
        Ok(name)
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
        let projection = self.projection(shape)?;
        let shape = projection.as_ref().map_or(shape, |p| &p.shape);
        let topic = self.topic_of(shape).await?;
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        let mut partition = None;
        match self.codec.clone() {
            Codec::Json(enc) => enc.row(&mut self.value, shape, meta, None, None),
            Codec::Avro(avro) => {
                let p = self.prepared(&avro, shape, &topic.name, on_wait).await?;
                self.record_key.clear();
                avro.row(
                    &mut self.record_key,
                    &mut self.value,
                    &p,
                    shape,
                    meta,
                    (None, None),
                    None,
                )?;
                partition = Some(partition_of(&self.key, topic.partitions));
            }
        }
        if self.partition_key == PartitionKey::PrimaryKey {
            self.send_to_every_partition(&topic, shape, meta.op, txn, on_wait)
                .await
        } else {
            self.send(&topic, shape, meta.op, txn, partition, on_wait)
                .await?;
            Ok(1)
        }
    }

    /// A schema event of `shape` (tagged with its new version): to every partition of the
    /// table's topic, or to `<topic>.schema-changes`. Returns the records sent.
    pub async fn schema<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        change: &SchemaChange,
        meta: &EventMeta,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        debug_assert_eq!(meta.op, Op::Ddl);
        let projection = self.projection(shape)?;
        let columns = Arc::clone(&self.columns);
        let change = columns.schema_change(&shape.schema, &shape.table, change);
        let change = &*change;
        let shape = projection.as_ref().map_or(shape, |p| &p.shape);
        let topic = match &self.routing.schema_topic {
            Some(t) => Topic {
                name: Arc::clone(t),
                partitions: 1,
            },
            None => self.topic_of(shape).await?,
        };
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        match self.codec.clone() {
            Codec::Json(enc) => enc.schema(&mut self.value, shape, meta, change)?,
            Codec::Avro(avro) => {
                let id = self
                    .fixed_id(&avro, &topic.name, Fixed::SchemaChange, on_wait)
                    .await?;
                avro.schema_change(&mut self.value, id, shape, meta, change);
                self.record_key.clear();
            }
        }
        let sent = if self.routing.schema_topic.is_some() {
            self.send(&topic, shape, meta.op, txn, Some(0), on_wait)
                .await?;
            1
        } else {
            self.send_to_every_partition(&topic, shape, meta.op, txn, on_wait)
                .await?
        };
        tracing::info!(
            table = %shape.qualified(),
            version = shape.schema_version,
            origin = %change.origin,
            command = change.command.as_deref().unwrap_or(""),
            dropped = change.dropped,
            topic = %topic.name,
            records = sent,
            "Schema event."
        );
        Ok(sent)
    }

    /// A snapshot marker of `shape`'s table (`meta.op` is [`Op::SnapshotStart`] or
    /// [`Op::SnapshotEnd`]), to every partition like a schema event: under any keying a table's
    /// snapshot rows may be on any partition, and each partition's consumer must see where one
    /// attempt's rows of the table begin and end among them. Not written under
    /// `--compat debezium`. Returns the records sent.
    pub async fn snapshot_marker<F: FnMut()>(
        &mut self,
        shape: &TableShape,
        meta: &EventMeta,
        frame: &walrelay_common::event::SnapshotFrame,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        debug_assert!(meta.op.is_snapshot_marker());
        if !self.routing.markers {
            return Ok(0);
        }
        let projection = self.projection(shape)?;
        let shape = projection.as_ref().map_or(shape, |p| &p.shape);
        let topic = self.topic_of(shape).await?;
        self.key.clear();
        self.value.clear();
        shape.write_key(&mut self.key, self.partition_key, None);
        match self.codec.clone() {
            Codec::Json(enc) => enc.snapshot_marker(&mut self.value, shape, meta, frame)?,
            Codec::Avro(avro) => {
                let id = self
                    .fixed_id(&avro, &topic.name, Fixed::SnapshotMarker, on_wait)
                    .await?;
                avro.snapshot_marker(&mut self.value, id, shape, meta, frame);
                self.record_key.clear();
            }
        }
        self.send_to_every_partition(&topic, shape, meta.op, txn, on_wait)
            .await
    }

    async fn send_to_every_partition<F: FnMut()>(
        &mut self,
        topic: &Topic,
        shape: &TableShape,
        op: Op,
        txn: TxnId,
        on_wait: &mut F,
    ) -> Result<u64, RunError> {
        for p in 0..topic.partitions {
            self.send(topic, shape, op, txn, Some(p), on_wait).await?;
        }
        Ok(u64::try_from(topic.partitions).unwrap_or(0))
    }

    /// Hands the encoded key and value to the writer and counts them.
    async fn send<F: FnMut()>(
        &mut self,
        topic: &Topic,
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
        let key = self.kafka_key();
        self.writer
            .send_routed(
                &topic.name,
                &shape.table,
                key,
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

/// The id of an oversized event's chunks: its position and a number unique in this process
/// (snapshot rows share a position).
fn oversized_id(meta: &EventMeta) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let started = walrelay_common::clock::now_us();
    format!(
        "{:X}-{:X}-{}-{started:x}-{n}",
        meta.commit_lsn, meta.lsn, meta.seq
    )
}

/// The largest value of the images that may be replaced (not a key or identity column, not
/// null or already replaced): (0 before / 1 after, column, its size).
fn largest_cell(
    shape: &TableShape,
    before: Option<&[Cell<'_>]>,
    after: Option<&[Cell<'_>]>,
) -> Option<(u8, usize, usize)> {
    let mut best: Option<(u8, usize, usize)> = None;
    for (image, cells) in [(0u8, before), (1u8, after)] {
        for (i, cell) in cells.into_iter().flatten().enumerate() {
            let len = match cell {
                Cell::Text(t) | Cell::Binary(t) => t.len(),
                Cell::Null | Cell::UnchangedToast => continue,
            };
            let col = shape.columns.get(i);
            if col.is_none_or(|c| c.is_identity) || shape.key_columns.contains(&i) {
                continue;
            }
            if best.is_none_or(|(_, _, l)| len > l) {
                best = Some((image, i, len));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas() {
        // Values from Kafka's UtilsTest (Java's murmur2, as signed ints).
        for (input, expected) in [
            ("21", -973_932_308_i32),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ] {
            assert_eq!(murmur2(input.as_bytes()) as i32, expected, "{input}");
        }
    }

    #[test]
    fn table_topics_keep_what_kafka_allows() {
        assert_eq!(
            table_topic("app", "public", "Order Items").ok().as_deref(),
            Some("app.public.Order_Items")
        );
        assert!(table_topic("app", "public", &"x".repeat(300)).is_err());
    }
}
