//! A captured table's shape and how its rows become Kafka records (key and envelope).

use walrelay_common::event::{CONNECTOR, Op, SnapshotFrame, UNCHANGED_TOAST, write_json_str};

use crate::replication::pgoutput::Cell;
use crate::value::{self, Kind};

/// How records are keyed, and so partitioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionKey {
    /// The schema name: total order per schema.
    #[default]
    Schema,
    /// `schema.table`: order per table.
    Table,
    /// JSON of the primary-key values: order per row, most parallel.
    PrimaryKey,
}

/// One column of a captured table.
#[derive(Debug, Clone)]
pub struct ColumnShape {
    /// Column name.
    pub name: String,
    /// `"name":`, pre-encoded.
    name_json: Vec<u8>,
    /// How values convert.
    pub kind: Kind,
    /// Part of the replica identity (what a `K` old tuple carries).
    pub is_identity: bool,
    /// The column's type (0 when unknown): the Avro codec tells int4 from int8 by it.
    pub type_oid: u32,
    /// The type modifier (-1 when none): a numeric's precision and scale.
    pub typmod: i32,
}

impl ColumnShape {
    /// A column.
    pub fn new(name: &str, kind: Kind, is_identity: bool) -> Self {
        let mut name_json = Vec::with_capacity(name.len() + 3);
        write_json_str(&mut name_json, name);
        name_json.push(b':');
        Self {
            name: name.to_string(),
            name_json,
            kind,
            is_identity,
            type_oid: 0,
            typmod: -1,
        }
    }

    /// The column with its type and type modifier.
    pub fn with_type(mut self, type_oid: u32, typmod: i32) -> Self {
        self.type_oid = type_oid;
        self.typmod = typmod;
        self
    }
}

/// A captured table as the producer encodes it.
#[derive(Debug, Clone)]
pub struct TableShape {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Columns in tuple order.
    pub columns: Vec<ColumnShape>,
    /// Indexes of the primary-key columns (or of the replica-identity index); empty when the
    /// table has neither, in which case `primary-key` keying falls back to `schema.table`.
    pub key_columns: Vec<usize>,
    /// `"schema":"…","table":"…"`, pre-encoded.
    source_names: Vec<u8>,
    /// Version of the table's schema these columns belong to (0 until known).
    pub schema_version: u64,
    /// Stable id of each column (its `attnum`), in column order; empty until known.
    pub column_ids: Vec<i32>,
    /// `,"key":[…],"types":{…},"schema_version":…,"column_ids":{…}`, pre-encoded: what a
    /// consumer needs to address a row and to map its columns without asking Postgres.
    table_facts: Vec<u8>,
    /// A hash of everything that decides the table's Avro schemas (names, types, key, version):
    /// the emitter's cache key for registered schema ids.
    pub fingerprint: u64,
}

impl TableShape {
    /// A table shape.
    pub fn new(
        schema: &str,
        table: &str,
        columns: Vec<ColumnShape>,
        key_columns: Vec<usize>,
    ) -> Self {
        let mut source_names = Vec::new();
        source_names.extend_from_slice(b"\"schema\":");
        write_json_str(&mut source_names, schema);
        source_names.extend_from_slice(b",\"table\":");
        write_json_str(&mut source_names, table);
        let mut shape = Self {
            schema: schema.to_string(),
            table: table.to_string(),
            columns,
            key_columns,
            source_names,
            schema_version: 0,
            column_ids: Vec::new(),
            table_facts: Vec::new(),
            fingerprint: 0,
        };
        shape.encode_facts();
        shape
    }

    /// Tags the shape with its schema version and column ids (in column order).
    pub fn set_schema(&mut self, version: u64, column_ids: Vec<i32>) {
        self.schema_version = version;
        self.column_ids = column_ids;
        self.encode_facts();
    }

    fn encode_facts(&mut self) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &self.schema,
            &self.table,
            &self.key_columns,
            self.schema_version,
        )
            .hash(&mut h);
        self.column_ids.hash(&mut h);
        for c in &self.columns {
            (&c.name, c.kind.label(), c.type_oid, c.typmod, c.is_identity).hash(&mut h);
        }
        self.fingerprint = h.finish();
        let out = &mut self.table_facts;
        out.clear();
        out.extend_from_slice(b",\"key\":[");
        for (n, &i) in self.key_columns.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            if let Some(col) = self.columns.get(i) {
                write_json_str(out, &col.name);
            }
        }
        out.extend_from_slice(b"],\"types\":{");
        for (n, col) in self.columns.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&col.name_json);
            write_json_str(out, &col.kind.label());
        }
        out.extend_from_slice(b"},\"schema_version\":");
        out.extend_from_slice(self.schema_version.to_string().as_bytes());
        out.extend_from_slice(b",\"column_ids\":{");
        for (n, (col, id)) in self.columns.iter().zip(&self.column_ids).enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&col.name_json);
            out.extend_from_slice(id.to_string().as_bytes());
        }
        out.push(b'}');
    }

    /// `schema.table`, for logs and metric labels.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// Appends the Kafka key of a row to `out`.
    pub fn write_key(&self, out: &mut Vec<u8>, mode: PartitionKey, row: Option<&[Cell<'_>]>) {
        match (mode, row) {
            (PartitionKey::Schema, _) => out.extend_from_slice(self.schema.as_bytes()),
            (PartitionKey::PrimaryKey, Some(row)) if !self.key_columns.is_empty() => {
                out.push(b'{');
                for (n, &i) in self.key_columns.iter().enumerate() {
                    if n > 0 {
                        out.push(b',');
                    }
                    let col = &self.columns[i];
                    out.extend_from_slice(&col.name_json);
                    write_cell(out, &col.kind, row.get(i).copied().unwrap_or(Cell::Null));
                }
                out.push(b'}');
            }
            _ => {
                out.extend_from_slice(self.schema.as_bytes());
                out.push(b'.');
                out.extend_from_slice(self.table.as_bytes());
            }
        }
    }
}

fn write_cell(out: &mut Vec<u8>, kind: &Kind, cell: Cell<'_>) {
    match cell {
        Cell::Null => out.extend_from_slice(b"null"),
        Cell::UnchangedToast => write_json_str(out, UNCHANGED_TOAST),
        Cell::Text(t) => value::write(out, kind, t),
        // walrelay never asks for binary values; keep them rather than lose them.
        Cell::Binary(b) => value::write(out, &Kind::Bytea, format!("\\x{}", hex(b)).as_bytes()),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A row image to write: the cells and which columns to include.
#[derive(Clone, Copy)]
pub struct Image<'a, 'b> {
    /// Cells in column order.
    pub cells: &'b [Cell<'a>],
    /// Only the replica-identity columns (a `K` old tuple).
    pub identity_only: bool,
}

impl<'a, 'b> Image<'a, 'b> {
    /// Every column of `cells`.
    pub fn full(cells: &'b [Cell<'a>]) -> Self {
        Self {
            cells,
            identity_only: false,
        }
    }
}

/// Metadata of one event.
#[derive(Debug, Clone, Copy)]
pub struct EventMeta {
    /// Operation.
    pub op: Op,
    /// LSN of the change.
    pub lsn: u64,
    /// Commit LSN of its transaction.
    pub commit_lsn: u64,
    /// Transaction id.
    pub txid: u64,
    /// Commit time, ms since the Unix epoch.
    pub ts_ms: i64,
    /// From the snapshot.
    pub snapshot: bool,
    /// From an incremental snapshot (`snapshot` is true too): read while streaming, between
    /// two watermarks, and placed at the high watermark's position ([`crate::incremental`]).
    pub incremental: bool,
    /// Position in the transaction.
    pub seq: u64,
    /// Place among the transaction's data events (`--transaction-metadata`), or none.
    pub transaction: Option<TxnOrder>,
}

/// A data event's place in its transaction: the `transaction` block of
/// [`walrelay_common::transaction`] (the id is `<txid>:<commit_lsn>` of the event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOrder {
    /// 1-based among the transaction's data events.
    pub total: u64,
    /// 1-based among those of the same table.
    pub collection: u64,
}

/// How an event's value is written: the producer's half of a codec (the consumers' half is
/// `walrelay_common::codec`). The emitter holds one ([`crate::emit::Emitter`]); JSON
/// ([`EnvelopeWriter`]) is the one there is. Keys are not the codec's: they decide partitions
/// (`TableShape::write_key`), so they stay the same whatever format the values take.
pub trait Encoder: Send + Sync {
    /// Appends a row event (insert, update, delete, truncate, snapshot read) to `out`.
    fn row(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        before: Option<Image<'_, '_>>,
        after: Option<Image<'_, '_>>,
    );

    /// Appends a schema event to `out`.
    fn schema(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        change: &walrelay_common::event::SchemaChange,
    ) -> Result<(), EncodeError>;

    /// Appends a `BEGIN`/`END` record of `<topic>.transactions` to `out`.
    fn transaction(
        &self,
        out: &mut Vec<u8>,
        record: &walrelay_common::transaction::TransactionRecord,
    ) -> Result<(), EncodeError>;

    /// Appends a snapshot marker (`meta.op` is `SnapshotStart` or `SnapshotEnd`) of `shape`'s
    /// table to `out`: the envelope of a row event without images, and `frame`.
    fn snapshot_marker(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        frame: &SnapshotFrame,
    ) -> Result<(), EncodeError>;
}

/// An event the codec could not write (definite: the producer stops).
#[derive(Debug, thiserror::Error)]
#[error("encoding an event: {0}")]
pub struct EncodeError(String);

impl EncodeError {
    /// An error with this message.
    pub fn new(message: String) -> Self {
        Self(message)
    }
}

/// The JSON codec's encoder: Debezium-shaped envelopes written straight from Postgres' text
/// cells. Holds what is the same for every event of a database.
#[derive(Debug, Clone)]
pub struct EnvelopeWriter {
    /// `"version":"…","connector":"walrelay","db":"…"`, pre-encoded.
    prefix: Vec<u8>,
    /// `--compat debezium`: `source` also carries Debezium's `name`, `txId` and `sequence`,
    /// and `snapshot` is Debezium's string (`"true"`/`"false"`).
    debezium: bool,
}

impl EnvelopeWriter {
    /// A writer for database `db`.
    pub fn new(db: &str) -> Self {
        let mut prefix = Vec::new();
        prefix.extend_from_slice(b"\"version\":");
        write_json_str(&mut prefix, env!("CARGO_PKG_VERSION"));
        prefix.extend_from_slice(b",\"connector\":");
        write_json_str(&mut prefix, CONNECTOR);
        prefix.extend_from_slice(b",\"db\":");
        write_json_str(&mut prefix, db);
        Self {
            prefix,
            debezium: false,
        }
    }

    /// The writer of `--compat debezium`, `name` being the topic prefix (`source.name`).
    pub fn debezium(mut self, name: &str) -> Self {
        let mut prefix = Vec::new();
        prefix.extend_from_slice(b"\"version\":");
        write_json_str(&mut prefix, env!("CARGO_PKG_VERSION"));
        prefix.extend_from_slice(b",\"connector\":");
        write_json_str(&mut prefix, CONNECTOR);
        prefix.extend_from_slice(b",\"name\":");
        write_json_str(&mut prefix, name);
        // `db` was the last field written by `new`.
        if let Some(pos) = self.prefix.windows(6).position(|w| w == b"\"db\":\"") {
            prefix.push(b',');
            prefix.extend_from_slice(&self.prefix[pos..]);
        }
        self.prefix = prefix;
        self.debezium = true;
        self
    }
}

impl Encoder for EnvelopeWriter {
    fn row(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        before: Option<Image<'_, '_>>,
        after: Option<Image<'_, '_>>,
    ) {
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(meta.op.code().as_bytes());
        out.extend_from_slice(b"\",\"before\":");
        write_image(out, shape, before, &mut None);
        out.extend_from_slice(b",\"after\":");
        let mut unchanged = Some(Vec::new());
        write_image(out, shape, after, &mut unchanged);
        out.extend_from_slice(b",\"source\":{");
        out.extend_from_slice(&self.prefix);
        out.push(b',');
        out.extend_from_slice(&shape.source_names);
        let mut num = itoa_buf();
        out.extend_from_slice(b",\"lsn\":");
        out.extend_from_slice(num.u64(meta.lsn));
        out.extend_from_slice(b",\"commit_lsn\":");
        out.extend_from_slice(num.u64(meta.commit_lsn));
        out.extend_from_slice(b",\"txid\":");
        out.extend_from_slice(num.u64(meta.txid));
        if self.debezium {
            out.extend_from_slice(b",\"txId\":");
            out.extend_from_slice(num.u64(meta.txid));
            out.extend_from_slice(b",\"sequence\":\"[\\\"");
            out.extend_from_slice(num.u64(meta.commit_lsn));
            out.extend_from_slice(b"\\\",\\\"");
            out.extend_from_slice(num.u64(meta.lsn));
            out.extend_from_slice(b"\\\"]\"");
        }
        out.extend_from_slice(b",\"ts_ms\":");
        out.extend_from_slice(num.i64(meta.ts_ms));
        out.extend_from_slice(if self.debezium {
            if meta.incremental {
                b",\"snapshot\":\"incremental\",\"seq\":".as_slice()
            } else if meta.snapshot {
                b",\"snapshot\":\"true\",\"seq\":".as_slice()
            } else {
                b",\"snapshot\":\"false\",\"seq\":".as_slice()
            }
        } else if meta.incremental {
            b",\"snapshot\":true,\"incremental\":true,\"seq\":".as_slice()
        } else if meta.snapshot {
            b",\"snapshot\":true,\"seq\":".as_slice()
        } else {
            b",\"snapshot\":false,\"seq\":".as_slice()
        });
        out.extend_from_slice(num.u64(meta.seq));
        out.extend_from_slice(b"},\"ts_ms\":");
        out.extend_from_slice(num.i64(meta.ts_ms));
        if let Some(order) = meta.transaction {
            out.extend_from_slice(b",\"transaction\":{\"id\":\"");
            out.extend_from_slice(num.u64(meta.txid));
            out.push(b':');
            out.extend_from_slice(num.u64(meta.commit_lsn));
            out.extend_from_slice(b"\",\"total_order\":");
            out.extend_from_slice(num.u64(order.total));
            out.extend_from_slice(b",\"data_collection_order\":");
            out.extend_from_slice(num.u64(order.collection));
            out.push(b'}');
        }
        out.extend_from_slice(&shape.table_facts);
        if let Some(cols) = unchanged.filter(|c| !c.is_empty()) {
            out.extend_from_slice(b",\"unchanged_toast\":[");
            for (n, i) in cols.into_iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_json_str(out, &shape.columns[i].name);
            }
            out.push(b']');
        }
        out.push(b'}');
    }

    /// The row envelope with no images, and `"ddl"`: `change`.
    fn schema(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        change: &walrelay_common::event::SchemaChange,
    ) -> Result<(), EncodeError> {
        self.row_with(out, shape, meta, b"ddl", change)
    }

    fn transaction(
        &self,
        out: &mut Vec<u8>,
        record: &walrelay_common::transaction::TransactionRecord,
    ) -> Result<(), EncodeError> {
        serde_json::to_writer(&mut *out, record).map_err(|e| EncodeError(e.to_string()))
    }

    /// The row envelope with no images, and `"snapshot"`: `frame` (`rows` only when known).
    fn snapshot_marker(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        frame: &SnapshotFrame,
    ) -> Result<(), EncodeError> {
        self.row_with(out, shape, meta, b"snapshot", frame)
    }
}

impl EnvelopeWriter {
    /// The row envelope with no images and one more field, `name`: `value` (schema events and
    /// snapshot markers; neither is on the hot path, so serde writes the field).
    fn row_with<T: serde::Serialize>(
        &self,
        out: &mut Vec<u8>,
        shape: &TableShape,
        meta: &EventMeta,
        name: &[u8],
        value: &T,
    ) -> Result<(), EncodeError> {
        self.row(out, shape, meta, None, None);
        out.pop();
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name);
        out.extend_from_slice(b"\":");
        serde_json::to_writer(&mut *out, value).map_err(|e| EncodeError(e.to_string()))?;
        out.push(b'}');
        Ok(())
    }
}

fn write_image(
    out: &mut Vec<u8>,
    shape: &TableShape,
    image: Option<Image<'_, '_>>,
    unchanged: &mut Option<Vec<usize>>,
) {
    let Some(image) = image else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'{');
    let mut first = true;
    for (i, col) in shape.columns.iter().enumerate() {
        if image.identity_only && !col.is_identity {
            continue;
        }
        let cell = image.cells.get(i).copied().unwrap_or(Cell::Null);
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&col.name_json);
        if let (Cell::UnchangedToast, Some(list)) = (cell, unchanged.as_mut()) {
            list.push(i);
        }
        write_cell(out, &col.kind, cell);
    }
    out.push(b'}');
}

/// Integer formatting without allocation.
struct NumBuf([u8; 24]);

fn itoa_buf() -> NumBuf {
    NumBuf([0; 24])
}

impl NumBuf {
    fn u64(&mut self, mut v: u64) -> &[u8] {
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        &self.0[i..]
    }

    fn i64(&mut self, v: i64) -> &[u8] {
        if v >= 0 {
            return self.u64(v as u64);
        }
        let len = self.u64(v.unsigned_abs()).len();
        let start = self.0.len() - len - 1;
        self.0[start] = b'-';
        &self.0[start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walrelay_common::event::Envelope;

    fn users() -> TableShape {
        TableShape::new(
            "public",
            "users",
            vec![
                ColumnShape::new("id", Kind::Int, true),
                ColumnShape::new("name", Kind::Text, false),
                ColumnShape::new("bio", Kind::Text, false),
            ],
            vec![0],
        )
    }

    #[test]
    fn incremental_rows_say_so_and_read_back_as_snapshot_rows() {
        let shape = users();
        let row = [Cell::Text(b"7"), Cell::Text(b"Ann"), Cell::Null];
        let meta = EventMeta {
            op: Op::Read,
            lsn: 300,
            commit_lsn: 310,
            txid: 12,
            ts_ms: 1,
            snapshot: true,
            incremental: true,
            seq: 0,
            transaction: None,
        };
        for (w, flag) in [
            (EnvelopeWriter::new("app"), serde_json::json!(true)),
            (
                EnvelopeWriter::new("app").debezium("t"),
                serde_json::json!("incremental"),
            ),
        ] {
            let mut out = Vec::new();
            w.row(&mut out, &shape, &meta, None, Some(Image::full(&row)));
            let raw: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
            let env = Envelope::from_slice(&out).expect("an envelope");
            assert_eq!(env.op, Op::Read);
            assert!(env.source.snapshot, "consumers read it as a snapshot row");
            assert_eq!((env.source.commit_lsn, env.source.txid), (310, 12));
            if flag == true {
                assert_eq!(raw["source"]["incremental"], flag);
                assert_eq!(raw["source"]["snapshot"], true);
            } else {
                assert_eq!(raw["source"]["snapshot"], flag);
            }
        }
        // The initial snapshot's rows do not carry the field.
        let mut out = Vec::new();
        let initial = EventMeta {
            incremental: false,
            ..meta
        };
        EnvelopeWriter::new("app").row(&mut out, &shape, &initial, None, Some(Image::full(&row)));
        let raw: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert!(raw["source"].get("incremental").is_none());
    }

    #[test]
    fn envelope_is_valid_json_and_reads_back() {
        let shape = users();
        let w = EnvelopeWriter::new("app");
        let old = [Cell::Text(b"7"), Cell::Null, Cell::Null];
        let new = [Cell::Text(b"7"), Cell::Text(b"Ann"), Cell::UnchangedToast];
        let meta = EventMeta {
            op: Op::Update,
            lsn: 100,
            commit_lsn: 200,
            txid: 9,
            ts_ms: -5,
            snapshot: false,
            incremental: false,
            seq: 3,
            transaction: None,
        };
        let mut out = Vec::new();
        w.row(
            &mut out,
            &shape,
            &meta,
            Some(Image {
                cells: &old,
                identity_only: true,
            }),
            Some(Image {
                cells: &new,
                identity_only: false,
            }),
        );
        let env = Envelope::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        assert_eq!(env.op, Op::Update);
        assert_eq!(
            serde_json::Value::Object(env.before.clone().unwrap_or_default()),
            serde_json::json!({"id": 7})
        );
        assert_eq!(
            env.after
                .as_ref()
                .and_then(|a| a.get("bio"))
                .and_then(|v| v.as_str()),
            Some(UNCHANGED_TOAST)
        );
        assert_eq!(env.unchanged_toast, vec!["bio"]);
        assert_eq!(
            (
                env.source.lsn,
                env.source.commit_lsn,
                env.source.seq,
                env.ts_ms
            ),
            (100, 200, 3, -5)
        );
        assert_eq!(env.source.db, "app");
        assert_eq!(env.key, vec!["id"]);
        assert_eq!(
            serde_json::Value::Object(env.types.parse()),
            serde_json::json!({"id": "integer", "name": "text", "bio": "text"})
        );
    }

    #[test]
    fn keys_per_mode() {
        let shape = users();
        let row = [Cell::Text(b"42"), Cell::Null, Cell::Null];
        let key = |mode| {
            let mut out = Vec::new();
            shape.write_key(&mut out, mode, Some(&row));
            String::from_utf8(out).unwrap_or_default()
        };
        assert_eq!(key(PartitionKey::Schema), "public");
        assert_eq!(key(PartitionKey::Table), "public.users");
        assert_eq!(key(PartitionKey::PrimaryKey), r#"{"id":42}"#);
        let keyless = TableShape::new(
            "s",
            "t",
            vec![ColumnShape::new("a", Kind::Int, false)],
            vec![],
        );
        let mut out = Vec::new();
        keyless.write_key(&mut out, PartitionKey::PrimaryKey, Some(&row));
        assert_eq!(out, b"s.t");
    }

    mod round_trip {
        use proptest::prelude::*;

        use super::*;

        /// A column: its name, whether it is an integer (else text), whether it is a key.
        fn columns() -> impl Strategy<Value = Vec<(String, bool, bool)>> {
            prop::collection::vec(
                ("[a-zA-Z_\\\"' é€😀]{1,12}", any::<bool>(), any::<bool>()),
                1..8,
            )
            .prop_map(|cols| {
                // Column names are unique in a table.
                let mut seen = std::collections::HashSet::new();
                cols.into_iter()
                    .filter(|(n, _, _)| seen.insert(n.clone()))
                    .collect()
            })
        }

        proptest! {
            /// Whatever the table and values, the JSON codec's output reads back (with
            /// `walrelay_common::event::Envelope`, what consumers use) as the same event.
            #[test]
            fn json_envelope_reads_back_as_written(
                cols in columns(),
                values in prop::collection::vec(prop::option::of((any::<i64>(), "\\PC{0,20}")), 8),
                op in prop::sample::select(vec![
                    Op::Create, Op::Update, Op::Delete, Op::Read, Op::SnapshotStart, Op::SnapshotEnd,
                ]),
                (lsn, commit_lsn, txid, seq) in (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
                ts_ms in any::<i64>(),
                (attempt, consistent_lsn, rows) in ("\\PC{0,24}", any::<u64>(), any::<u64>()),
            ) {
                let keys: Vec<usize> = cols.iter().enumerate().filter(|(_, c)| c.2).map(|(i, _)| i).collect();
                let shape = TableShape::new(
                    "s\"q",
                    "t é",
                    cols.iter()
                        .map(|(n, int, key)| ColumnShape::new(n, if *int { Kind::Int } else { Kind::Text }, *key))
                        .collect(),
                    keys.clone(),
                );
                let texts: Vec<Option<Vec<u8>>> = cols
                    .iter()
                    .zip(&values)
                    .map(|((_, int, _), v)| {
                        v.as_ref().map(|(i, t)| if *int { i.to_string().into_bytes() } else { t.clone().into_bytes() })
                    })
                    .collect();
                let cells: Vec<Cell<'_>> = texts
                    .iter()
                    .map(|t| t.as_deref().map_or(Cell::Null, Cell::Text))
                    .collect();
                let meta = EventMeta {
                    op,
                    lsn: u64::from(lsn),
                    commit_lsn: u64::from(commit_lsn),
                    txid: u64::from(txid),
                    ts_ms,
                    snapshot: op == Op::Read || op.is_snapshot_marker(),
                    incremental: false,
                    seq: u64::from(seq),
                    transaction: None,
                };
                let image = Some(Image::full(&cells));
                let (before, after) = match op {
                    Op::Delete => (image, None),
                    Op::Update => (image, image),
                    op if op.is_snapshot_marker() => (None, None),
                    _ => (None, image),
                };
                let frame = op.is_snapshot_marker().then(|| SnapshotFrame {
                    attempt,
                    consistent_lsn,
                    rows: (op == Op::SnapshotEnd).then_some(rows),
                });
                let mut out = Vec::new();
                match &frame {
                    Some(frame) => EnvelopeWriter::new("db")
                        .snapshot_marker(&mut out, &shape, &meta, frame)
                        .expect("a frame encodes"),
                    None => EnvelopeWriter::new("db").row(&mut out, &shape, &meta, before, after),
                }
                let env = Envelope::from_slice(&out);
                prop_assert!(env.is_ok(), "{:?}: {}", env.err(), String::from_utf8_lossy(&out));
                let env = env.unwrap_or_else(|_| unreachable!());
                let expected: serde_json::Map<String, serde_json::Value> = cols
                    .iter()
                    .zip(&texts)
                    .map(|((n, int, _), t)| {
                        let v = match t {
                            None => serde_json::Value::Null,
                            Some(b) if *int => serde_json::Value::from(
                                String::from_utf8_lossy(b).parse::<i64>().unwrap_or_default(),
                            ),
                            Some(b) => serde_json::Value::from(String::from_utf8_lossy(b).into_owned()),
                        };
                        (n.clone(), v)
                    })
                    .collect();
                prop_assert_eq!(env.op, op);
                prop_assert_eq!(env.after.as_ref(), after.map(|_| &expected));
                prop_assert_eq!(env.before.as_ref(), before.map(|_| &expected));
                prop_assert_eq!(
                    (env.source.lsn, env.source.commit_lsn, env.source.txid, env.source.seq, env.ts_ms),
                    (meta.lsn, meta.commit_lsn, meta.txid, meta.seq, ts_ms)
                );
                prop_assert_eq!(env.source.snapshot, op == Op::Read || op.is_snapshot_marker());
                prop_assert_eq!(&env.snapshot, &frame);
                prop_assert_eq!(&env.source.schema, "s\"q");
                prop_assert_eq!(&env.source.table, "t é");
                let key_names: Vec<String> = keys.iter().map(|&i| cols[i].0.clone()).collect();
                prop_assert_eq!(env.key, key_names);
            }
        }
    }
}
