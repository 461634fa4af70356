//! The Avro codec: Debezium's Avro layout, Confluent's wire format, a schema registry.
//!
//! # What a record holds
//!
//! ```text
//!   key   = 0x00 | key schema id (4 bytes, big-endian)   | Avro <prefix>.<schema>.<table>.Key
//!   value = 0x00 | value schema id (4 bytes, big-endian) | Avro <prefix>.<schema>.<table>.Envelope
//!           Envelope { before: Value?, after: Value?, source: Source, op, ts_ms?, transaction?,
//!                      unchanged_toast: [string] }
//! ```
//!
//! `Value` has one field per column (types: [`types`]); `Source` is Debezium's
//! `io.debezium.connector.postgresql.Source` plus walrelay's `commit_lsn` and `seq`. A keyless
//! table's records have no key. Schema events, snapshot markers and `BEGIN`/`END` records have
//! records of their own ([`schema::schema_change`], [`schema::snapshot_marker`],
//! [`schema::transaction`]).
//!
//! What walrelay's consumers need beyond Debezium's layout (the original column names, the
//! `types` labels, the key columns, the schema version, column ids) travels in the *schema*,
//! as properties of the Envelope record and of each field (`walrelay.*`), so the records carry
//! data only.
//!
//! # When schemas are registered
//!
//! ```text
//!   row of (table, shape) ──▶ emitter's cache hit? ──yes──▶ encode with the cached ids
//!                                   │ no (a new table, or a new schema version)
//!                                   ▼
//!                  schemas from the shape ──register key, value──▶ registry (retried)
//! ```
//!
//! A table shape registers once per topic, before the first record under it; a later schema
//! version of the table has another shape and registers a new version of the subject before
//! its first row. The emitter keeps the ids ([`Prepared`]); the registry client caches the
//! answers, so forks (snapshot workers) do not ask again. The hot path never calls the
//! registry. While the registry is unreachable the emitter waits and retries (reading pauses,
//! nothing is confirmed); a refusal (incompatible, invalid) stops the producer naming the
//! subject.

pub mod binary;
pub mod schema;
pub mod types;

use std::fmt::Write as _;
use std::sync::Arc;

use walrelay_common::event::{CONNECTOR, Op, SchemaChange, SnapshotFrame, UNCHANGED_TOAST};
use walrelay_common::registry::{Registry, RegistryError, frame};
use walrelay_common::transaction::{Status, TransactionRecord};

use crate::encode::{EncodeError, EventMeta, Image, TableShape};
use crate::replication::pgoutput::Cell;
use types::AvroType;

/// How subjects are named (Confluent's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SubjectStrategy {
    /// `topic-record-name` when several tables share the topic, `topic-name` with per-table
    /// topics.
    #[default]
    Auto,
    /// `<topic>-key` / `<topic>-value`.
    TopicName,
    /// `<record full name>`.
    RecordName,
    /// `<topic>-<record full name>`.
    TopicRecordName,
}

/// The Avro codec of one producer.
pub struct AvroCodec {
    registry: Arc<Registry>,
    strategy: SubjectStrategy,
    /// Whether each table has a topic of its own (for [`SubjectStrategy::Auto`]).
    per_table: bool,
    /// The topic prefix (`--topic`), as Avro names use it and as `source.name` carries it.
    prefix: String,
    db: String,
}

/// A table shape's registered schemas, what the emitter caches per (topic, shape).
#[derive(Debug)]
pub struct Prepared {
    /// Key schema id; `None` for a keyless table.
    pub key_id: Option<u32>,
    /// Value schema id.
    pub value_id: u32,
    /// The Avro type of each column.
    pub columns: Vec<AvroType>,
    /// Whether each column's field is nullable.
    pub nullable: Vec<bool>,
}

/// One of the fixed records (schema event, snapshot marker, transaction record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fixed {
    /// `io.walrelay.SchemaChange`.
    SchemaChange,
    /// `io.walrelay.SnapshotMarker`.
    SnapshotMarker,
    /// `io.debezium.connector.common.TransactionMetadataValue`.
    Transaction,
}

impl AvroCodec {
    /// A codec registering through `registry`.
    pub fn new(
        registry: Arc<Registry>,
        strategy: SubjectStrategy,
        per_table: bool,
        prefix: &str,
        db: &str,
    ) -> Self {
        Self {
            registry,
            strategy,
            per_table,
            prefix: prefix.to_string(),
            db: db.to_string(),
        }
    }

    fn subject(&self, topic: &str, full_name: &str, role: &str, fixed: bool) -> String {
        let strategy = match self.strategy {
            SubjectStrategy::Auto if self.per_table => SubjectStrategy::TopicName,
            SubjectStrategy::Auto => SubjectStrategy::TopicRecordName,
            s => s,
        };
        match strategy {
            // A fixed record beside a table's Envelope under one `<topic>-value` subject would
            // fail every compatibility check: it takes the record-name form.
            SubjectStrategy::TopicName if !fixed => format!("{topic}-{role}"),
            SubjectStrategy::RecordName => full_name.to_string(),
            _ => format!("{topic}-{full_name}"),
        }
    }

    /// Registers `shape`'s key and value schemas for `topic` (a new version of the subjects
    /// when the shape changed). Transient errors are for the caller to retry.
    pub async fn prepare(&self, shape: &TableShape, topic: &str) -> Result<Prepared, PrepareError> {
        let built = schema::table(&self.prefix, shape).map_err(PrepareError::Encode)?;
        // A refusal names the table and the schema version that the change made.
        let change = |e: RegistryError| match e {
            RegistryError::Incompatible { subject, message } => RegistryError::Incompatible {
                subject,
                message: format!(
                    "table {} at schema version {} ({} columns: {}): {message}",
                    shape.qualified(),
                    shape.schema_version,
                    shape.columns.len(),
                    shape
                        .columns
                        .iter()
                        .map(|c| format!("{} {}", c.name, c.kind.label()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            other => other,
        };
        let key_id = match &built.key {
            Some(key) => Some(
                self.registry
                    .register(&self.subject(topic, &built.key_name, "key", false), key)
                    .await
                    .map_err(change)?,
            ),
            None => None,
        };
        let value_id = self
            .registry
            .register(
                &self.subject(topic, &built.value_name, "value", false),
                &built.value,
            )
            .await
            .map_err(change)?;
        tracing::info!(
            table = %shape.qualified(),
            topic,
            schema_version = shape.schema_version,
            value_schema_id = value_id,
            key_schema_id = ?key_id,
            "Avro schemas registered."
        );
        Ok(Prepared {
            key_id,
            value_id,
            columns: built.columns,
            nullable: built.nullable,
        })
    }

    /// The id of a fixed record's schema under `topic`.
    pub async fn fixed(&self, topic: &str, which: Fixed) -> Result<u32, RegistryError> {
        let (name, text) = match which {
            Fixed::SchemaChange => (schema::SCHEMA_CHANGE_NAME, schema::schema_change()),
            Fixed::SnapshotMarker => (schema::SNAPSHOT_MARKER_NAME, schema::snapshot_marker()),
            Fixed::Transaction => (schema::TRANSACTION_NAME, schema::transaction()),
        };
        self.registry
            .register(&self.subject(topic, name, "value", true), &text)
            .await
    }

    /// Appends a row event's key (empty for a keyless table) and value.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &self,
        key: &mut Vec<u8>,
        value: &mut Vec<u8>,
        p: &Prepared,
        shape: &TableShape,
        meta: &EventMeta,
        (before, after): (Option<Image<'_, '_>>, Option<Image<'_, '_>>),
        key_row: Option<&[Cell<'_>]>,
    ) -> Result<(), EncodeError> {
        if let (Some(id), Some(row)) = (p.key_id, key_row) {
            frame(key, id);
            for &i in &shape.key_columns {
                let cell = row.get(i).copied().unwrap_or(Cell::Null);
                write_cell(key, p, shape, i, cell, false, &mut None)?;
            }
        }
        frame(value, p.value_id);
        write_image(value, p, shape, before, &mut None)?;
        let mut unchanged = Some(Vec::new());
        write_image(value, p, shape, after, &mut unchanged)?;
        self.write_source(value, shape, meta);
        binary::bytes(value, meta.op.code().as_bytes());
        binary::branch(value, 1);
        binary::long(value, meta.ts_ms);
        match meta.transaction {
            Some(order) => {
                binary::branch(value, 1);
                let mut id = Scratch::default();
                let _ = write!(id, "{}:{}", meta.txid, meta.commit_lsn);
                binary::bytes(value, id.bytes());
                binary::long(value, order.total as i64);
                binary::long(value, order.collection as i64);
            }
            None => binary::branch(value, 0),
        }
        let cols = unchanged.unwrap_or_default();
        if !cols.is_empty() {
            binary::long(value, cols.len() as i64);
            for i in cols {
                binary::bytes(value, shape.columns[i].name.as_bytes());
            }
        }
        binary::long(value, 0);
        Ok(())
    }

    /// `Source`, in the field order of [`schema::source`].
    fn write_source(&self, out: &mut Vec<u8>, shape: &TableShape, meta: &EventMeta) {
        binary::bytes(out, env!("CARGO_PKG_VERSION").as_bytes());
        binary::bytes(out, CONNECTOR.as_bytes());
        binary::bytes(out, self.prefix.as_bytes());
        binary::long(out, meta.ts_ms);
        binary::branch(out, 0);
        binary::bytes(
            out,
            if meta.incremental {
                b"incremental".as_slice()
            } else if meta.snapshot {
                b"true".as_slice()
            } else {
                b"false".as_slice()
            },
        );
        binary::bytes(out, self.db.as_bytes());
        binary::branch(out, 1);
        let mut sequence = Scratch::default();
        let _ = write!(sequence, "[\"{}\",\"{}\"]", meta.commit_lsn, meta.lsn);
        binary::bytes(out, sequence.bytes());
        binary::bytes(out, shape.schema.as_bytes());
        binary::bytes(out, shape.table.as_bytes());
        binary::branch(out, 1);
        binary::long(out, meta.txid as i64);
        binary::branch(out, 1);
        binary::long(out, meta.lsn as i64);
        binary::branch(out, 0);
        binary::long(out, meta.commit_lsn as i64);
        binary::long(out, meta.seq as i64);
    }

    /// The common head of the fixed records: `op`, `source`, `ts_ms`, the table's key columns
    /// and schema version.
    fn write_head(&self, out: &mut Vec<u8>, shape: &TableShape, meta: &EventMeta) {
        binary::bytes(out, meta.op.code().as_bytes());
        self.write_source(out, shape, meta);
        binary::long(out, meta.ts_ms);
        write_strings(
            out,
            shape
                .key_columns
                .iter()
                .map(|&i| shape.columns[i].name.as_str()),
        );
        binary::long(out, shape.schema_version as i64);
    }

    /// Appends a schema event (`io.walrelay.SchemaChange`) under schema `id`.
    pub fn schema_change(
        &self,
        out: &mut Vec<u8>,
        id: u32,
        shape: &TableShape,
        meta: &EventMeta,
        change: &SchemaChange,
    ) {
        frame(out, id);
        self.write_head(out, shape, meta);
        binary::bytes(out, change.origin.as_bytes());
        opt_str(out, change.command.as_deref());
        opt_str(out, change.object.as_deref());
        opt_str(out, change.sql.as_deref());
        match &change.previous {
            Some(p) => {
                binary::branch(out, 1);
                binary::bytes(out, p.schema.as_bytes());
                binary::bytes(out, p.table.as_bytes());
            }
            None => binary::branch(out, 0),
        }
        out.push(u8::from(change.dropped));
        binary::long(out, i64::from(change.table_oid));
        if !change.columns.is_empty() {
            binary::long(out, change.columns.len() as i64);
            for c in &change.columns {
                binary::long(out, i64::from(c.id));
                binary::bytes(out, c.name.as_bytes());
                binary::bytes(out, c.type_name.as_bytes());
                binary::long(out, i64::from(c.type_oid));
                binary::bytes(out, c.logical.as_bytes());
                out.push(u8::from(c.nullable));
                opt_str(out, c.default.as_deref());
                match c.key_position {
                    Some(k) => {
                        binary::branch(out, 1);
                        binary::long(out, i64::from(k));
                    }
                    None => binary::branch(out, 0),
                }
                out.push(u8::from(c.generated));
                out.push(u8::from(c.identity));
            }
        }
        binary::long(out, 0);
    }

    /// Appends a snapshot marker (`io.walrelay.SnapshotMarker`) under schema `id`.
    pub fn snapshot_marker(
        &self,
        out: &mut Vec<u8>,
        id: u32,
        shape: &TableShape,
        meta: &EventMeta,
        f: &SnapshotFrame,
    ) {
        frame(out, id);
        self.write_head(out, shape, meta);
        binary::bytes(out, f.attempt.as_bytes());
        binary::long(out, f.consistent_lsn as i64);
        match f.rows {
            Some(n) => {
                binary::branch(out, 1);
                binary::long(out, n as i64);
            }
            None => binary::branch(out, 0),
        }
    }

    /// Appends a `BEGIN`/`END` record (Debezium's `TransactionMetadataValue`) under schema `id`.
    pub fn transaction(&self, out: &mut Vec<u8>, id: u32, r: &TransactionRecord) {
        frame(out, id);
        binary::bytes(
            out,
            match r.status {
                Status::Begin => b"BEGIN".as_slice(),
                Status::End => b"END".as_slice(),
            },
        );
        binary::bytes(out, r.id.as_bytes());
        match r.event_count {
            Some(n) => {
                binary::branch(out, 1);
                binary::long(out, n as i64);
            }
            None => binary::branch(out, 0),
        }
        match &r.data_collections {
            Some(list) => {
                binary::branch(out, 1);
                if !list.is_empty() {
                    binary::long(out, list.len() as i64);
                    for d in list {
                        binary::bytes(out, d.data_collection.as_bytes());
                        binary::long(out, d.event_count as i64);
                    }
                }
                binary::long(out, 0);
            }
            None => binary::branch(out, 0),
        }
        binary::long(out, r.ts_ms);
    }
}

/// A short text formatted on the stack (the hot path allocates nothing per event).
struct Scratch {
    buf: [u8; 64],
    len: usize,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl Scratch {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for Scratch {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Why a table's schemas could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The registry failed (transient or not: [`RegistryError::is_transient`]).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The table has no Avro form (definite).
    #[error(transparent)]
    Encode(EncodeError),
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            binary::branch(out, 1);
            binary::bytes(out, s.as_bytes());
        }
        None => binary::branch(out, 0),
    }
}

fn write_strings<'a>(out: &mut Vec<u8>, items: impl ExactSizeIterator<Item = &'a str>) {
    if items.len() > 0 {
        binary::long(out, items.len() as i64);
        for s in items {
            binary::bytes(out, s.as_bytes());
        }
    }
    binary::long(out, 0);
}

/// A nullable `Value` image.
fn write_image(
    out: &mut Vec<u8>,
    p: &Prepared,
    shape: &TableShape,
    image: Option<Image<'_, '_>>,
    unchanged: &mut Option<Vec<usize>>,
) -> Result<(), EncodeError> {
    let Some(image) = image else {
        binary::branch(out, 0);
        return Ok(());
    };
    binary::branch(out, 1);
    for i in 0..shape.columns.len() {
        let present = !image.identity_only || shape.columns[i].is_identity;
        let cell = if present {
            image.cells.get(i).copied().unwrap_or(Cell::Null)
        } else {
            Cell::Null
        };
        write_cell(out, p, shape, i, cell, p.nullable[i], unchanged)?;
    }
    Ok(())
}

/// One field: the union branch when nullable, then the value.
fn write_cell(
    out: &mut Vec<u8>,
    p: &Prepared,
    shape: &TableShape,
    i: usize,
    cell: Cell<'_>,
    nullable: bool,
    unchanged: &mut Option<Vec<usize>>,
) -> Result<(), EncodeError> {
    let ty = &p.columns[i];
    let fail = |reason: String| {
        EncodeError::new(format!(
            "table {}, column {:?}: {reason}; the event cannot be written as Avro (use --format json for this table, or change the value)",
            shape.qualified(),
            shape.columns[i].name
        ))
    };
    match cell {
        Cell::Null if nullable => binary::branch(out, 0),
        Cell::Null => return Err(fail("a null value in a field that is not nullable".into())),
        Cell::UnchangedToast => {
            if let Some(list) = unchanged.as_mut() {
                list.push(i);
            }
            if nullable {
                let mark = out.len();
                binary::branch(out, 1);
                if !ty.placeholder(out) {
                    out.truncate(mark);
                    binary::branch(out, 0);
                }
            } else if !ty.placeholder(out) {
                return Err(fail(format!(
                    "an unchanged TOAST value ({UNCHANGED_TOAST}) in a key field whose type cannot carry the placeholder"
                )));
            }
        }
        Cell::Text(t) => {
            if nullable {
                binary::branch(out, 1);
            }
            ty.write(out, t).map_err(fail)?;
        }
        Cell::Binary(_) => {
            return Err(fail(
                "a binary-format value (walrelay asks for text)".into(),
            ));
        }
    }
    Ok(())
}

/// Whether `op` is one of the row operations the Envelope carries.
pub fn is_row_op(op: Op) -> bool {
    matches!(
        op,
        Op::Create | Op::Update | Op::Delete | Op::Read | Op::Truncate
    )
}
