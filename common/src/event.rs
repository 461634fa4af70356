//! The change-event envelope.
//!
//! Every Kafka record value walrelay writes is one JSON object shaped like Debezium's envelope:
//!
//! ```json
//! {"op":"u","before":{"id":1},"after":{"id":1,"name":"b"},
//!  "source":{"version":"0.1.0","connector":"walrelay","db":"app","schema":"public",
//!            "table":"users","lsn":23905680,"commit_lsn":23905744,"txid":742,
//!            "ts_ms":1700000000123,"snapshot":false,"seq":1},
//!  "ts_ms":1700000000123,"key":["id"],"types":{"id":"integer","name":"text"}}
//! ```
//!
//! `key` names the row's key columns and `types` gives each column's logical type, so a
//! consumer can address documents and derive index mappings without access to Postgres.
//!
//! `ts_ms` at the top level is the commit time, not the time the producer handled the event:
//! a re-delivery after a crash must be byte-identical to the first copy, so nothing in the
//! envelope depends on when or how often it was produced. Unchanged TOASTed values (the row was
//! updated but a large value was not, and the replica identity does not carry it) appear as
//! [`UNCHANGED_TOAST`] in `after` and are listed by name in `unchanged_toast`; consumers must
//! keep their stored value for those columns. The JSON Schema is `common/envelope.schema.json`.
//!
//! # Snapshot markers
//!
//! A snapshot can be taken more than once into one topic: a producer killed mid-snapshot drops
//! its slot on the next run and snapshots again under a new slot, with a new consistent point.
//! So each table's snapshot rows of one attempt are framed by two markers, envelopes with
//! `before`/`after` null and the table's `key`/`types`, written to **every partition**:
//! `op: "snapshot_start"` before the table's first snapshot row and `op: "snapshot_end"` after
//! its last one. Their `snapshot` field ([`SnapshotFrame`]) names the attempt, its consistent
//! point and, on the end marker, the rows read. On a partition, everything between a table's
//! start and end markers of one attempt is that attempt's snapshot of the table's rows keyed to
//! that partition; an end marker means the partition holds the whole table as of the consistent
//! point, so a consumer may drop what it keeps of the table from earlier attempts and was not
//! rewritten since (the search sink does: `consumer/src/sinks/search/sink.rs`). An attempt cut
//! short has start markers (and the end markers of tables it finished) but no end for the
//! others; the next attempt frames every table again.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Placeholder written in place of an unchanged TOASTed value (Debezium's spelling, so
/// existing consumers recognise it).
pub const UNCHANGED_TOAST: &str = "__debezium_unavailable_value";

/// Name written in `source.connector`.
pub const CONNECTOR: &str = "walrelay";

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Insert.
    #[serde(rename = "c")]
    Create,
    /// Update.
    #[serde(rename = "u")]
    Update,
    /// Delete.
    #[serde(rename = "d")]
    Delete,
    /// A row read by the initial snapshot.
    #[serde(rename = "r")]
    Read,
    /// The table was truncated.
    #[serde(rename = "t")]
    Truncate,
    /// A schema event: the table's schema from here on (`ddl` holds it).
    #[serde(rename = "ddl")]
    Ddl,
    /// A table's snapshot rows of one attempt begin (`snapshot` holds the frame); on every
    /// partition. See "Snapshot markers" above.
    #[serde(rename = "snapshot_start")]
    SnapshotStart,
    /// A table's snapshot rows of one attempt are complete on this partition (`snapshot` holds
    /// the frame and the rows read); on every partition.
    #[serde(rename = "snapshot_end")]
    SnapshotEnd,
}

impl Op {
    /// Every op, in declaration order (for metrics that pre-register a label per op).
    pub const ALL: [Op; 8] = [
        Op::Create,
        Op::Update,
        Op::Delete,
        Op::Read,
        Op::Truncate,
        Op::Ddl,
        Op::SnapshotStart,
        Op::SnapshotEnd,
    ];

    /// The code used on the wire and in metric labels (one letter for row changes).
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            Op::Ddl => "ddl",
            Op::SnapshotStart => "snapshot_start",
            Op::SnapshotEnd => "snapshot_end",
        }
    }

    /// The position of the op in [`Op::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A snapshot marker ([`Op::SnapshotStart`], [`Op::SnapshotEnd`]): no row, no schema.
    pub fn is_snapshot_marker(self) -> bool {
        matches!(self, Op::SnapshotStart | Op::SnapshotEnd)
    }
}

/// Where an event comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// walrelay version that wrote the event.
    pub version: String,
    /// Always `walrelay`.
    pub connector: String,
    /// Database name.
    pub db: String,
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// WAL position of the change itself (for snapshot rows: the snapshot's consistent point).
    pub lsn: u64,
    /// End LSN of the commit of the change's transaction (for snapshot rows: the consistent
    /// point). `(commit_lsn, seq)` orders every streamed change of a row.
    pub commit_lsn: u64,
    /// Transaction id (0 for snapshot rows).
    pub txid: u64,
    /// Commit time in milliseconds since the Unix epoch (snapshot rows: when the snapshot began).
    pub ts_ms: i64,
    /// True for rows read by a snapshot: the initial one, or an incremental one (those also
    /// carry `"incremental": true` in `source`, and the high watermark's LSNs and txid). Read
    /// from walrelay's `true`/`false` or from Debezium's strings (`"true"`, `"last"`,
    /// `"incremental"`; `"false"`), as `--compat debezium` writes it.
    #[serde(deserialize_with = "snapshot_flag")]
    pub snapshot: bool,
    /// 1-based position of the change in its transaction; 0 for snapshot rows.
    pub seq: u64,
}

fn snapshot_flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    Ok(match Flag::deserialize(d)? {
        Flag::Bool(b) => b,
        Flag::Text(t) => t != "false",
    })
}

/// A decoded change event.
///
/// `A` is the form of the `after` image: a map by default; the consumers' JSON decoder
/// ([`crate::codec::json`]) keeps it as the JSON text it arrived as (`Box<RawValue>`), so a sink
/// that forwards it builds no map. One definition serves both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<A = Map<String, Value>> {
    /// Operation.
    pub op: Op,
    /// Row before the change, as far as the replica identity provides it.
    pub before: Option<Map<String, Value>>,
    /// Row after the change (inserts, updates, snapshot rows).
    pub after: Option<A>,
    /// Origin of the event.
    pub source: Source,
    /// Commit time in milliseconds (equal to `source.ts_ms`).
    pub ts_ms: i64,
    /// Columns of `after` whose value was not sent because it is an unchanged TOASTed value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchanged_toast: Vec<String>,
    /// The row's key columns (primary key, else replica-identity index), in key order; empty
    /// for a table with neither.
    #[serde(default)]
    pub key: Vec<String>,
    /// Every column's type, as a logical name (`integer`, `text`, `timestamptz`, `text[]`, …;
    /// see `envelope.schema.json`).
    #[serde(default)]
    pub types: ColumnTypes,
    /// The version of the table's schema the row was written under (for a schema event: the
    /// version it starts). Versions of a table only grow; 0 from producers before schema events.
    #[serde(default)]
    pub schema_version: u64,
    /// Every column's stable id (its `attnum`): a rename keeps it, a drop retires it, an added
    /// column gets a new one.
    #[serde(default)]
    pub column_ids: ColumnIds,
    /// What a schema event (`op: "ddl"`) says; absent on row events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddl: Option<SchemaChange>,
    /// The frame of a snapshot marker (`op: "snapshot_start"` or `"snapshot_end"`); absent on
    /// every other event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotFrame>,
    /// The data event's place in its transaction, with `--transaction-metadata`
    /// ([`crate::transaction`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction: Option<crate::transaction::TransactionRef>,
    /// Where the whole event is when it was over `--max-event-bytes` and its largest values
    /// were replaced ([`crate::oversized`]); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oversized: Option<crate::oversized::Reference>,
}

/// The frame a snapshot marker carries: which snapshot attempt the table's rows belong to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFrame {
    /// Identifies the attempt (one slot creation and its snapshot): the same on every marker
    /// of the attempt, different for every other attempt. Opaque to consumers.
    pub attempt: String,
    /// The attempt's consistent point (equal to the marker's `source.commit_lsn`, and to the
    /// LSNs of the attempt's snapshot rows).
    pub consistent_lsn: u64,
    /// Rows read for the table in this attempt (on the end marker only; all partitions
    /// together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

/// A table's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableName {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
}

/// The body of a schema event: the table's whole schema from this version on, and what
/// changed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaChange {
    /// `trigger` (walrelay's event triggers saw the DDL), `relation` (no trigger message:
    /// derived from pgoutput's Relation message at the next row), `snapshot` (the schema the
    /// initial snapshot read).
    pub origin: String,
    /// Command tag (`ALTER TABLE`, `CREATE TABLE`, `DROP TABLE`, ...) when known.
    pub command: Option<String>,
    /// The object the command named, when known.
    pub object: Option<String>,
    /// The statement's text, when known and sent (the text of a query of several statements
    /// only under `--ddl-statement include`, whole).
    pub sql: Option<String>,
    /// The table's name before this change, when it was renamed or moved.
    pub previous: Option<TableName>,
    /// The table was dropped: no rows follow under this name and id.
    pub dropped: bool,
    /// The table's OID (stable across renames).
    pub table_oid: u32,
    /// Every column, in `attnum` order (generated columns included, flagged).
    pub columns: Vec<ColumnSchema>,
}

/// One column of a schema event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// Stable id (the column's `attnum`).
    pub id: i32,
    /// Name.
    pub name: String,
    /// The SQL type, as `format_type` writes it (`character varying(20)`, `integer[]`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// The type's OID.
    pub type_oid: u32,
    /// The logical type, as in the envelope's `types`.
    #[serde(default)]
    pub logical: String,
    /// Accepts nulls.
    pub nullable: bool,
    /// Default expression.
    pub default: Option<String>,
    /// 1-based position in the primary key (else replica-identity index); null otherwise.
    pub key_position: Option<i32>,
    /// A generated column (`GENERATED ALWAYS AS (...) STORED`): never in row images.
    pub generated: bool,
    /// An identity column.
    pub identity: bool,
}

/// A per-column JSON object of the envelope (`types`, `column_ids`), kept as it arrived and
/// parsed only on demand: it is the same for every event of a table, so consumers compare it as
/// text and parse it once per change. `M` is what [`ColumnObject::parse`] returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct ColumnObject<M> {
    text: Box<serde_json::value::RawValue>,
    #[serde(skip)]
    parsed_as: std::marker::PhantomData<fn() -> M>,
}

/// The envelope's `types`: column name to logical type.
pub type ColumnTypes = ColumnObject<Map<String, Value>>;

/// The envelope's `column_ids`: column name to stable id.
pub type ColumnIds = ColumnObject<std::collections::HashMap<String, i32>>;

impl<M: serde::de::DeserializeOwned + Default> ColumnObject<M> {
    /// The JSON text.
    pub fn raw(&self) -> &str {
        self.text.get()
    }

    /// The parsed object (empty when it does not parse).
    pub fn parse(&self) -> M {
        serde_json::from_str(self.text.get()).unwrap_or_default()
    }
}

impl<M> Default for ColumnObject<M> {
    fn default() -> Self {
        Self {
            text: serde_json::value::RawValue::from_string("{}".into())
                .unwrap_or_else(|_| unreachable!("{{}} is JSON")),
            parsed_as: std::marker::PhantomData,
        }
    }
}

impl<M> PartialEq for ColumnObject<M> {
    fn eq(&self, other: &Self) -> bool {
        self.text.get() == other.text.get()
    }
}

impl<A> Envelope<A> {
    /// Takes the `after` image out, leaving the rest of the envelope with `after: None`.
    pub fn split_after(self) -> (Envelope, Option<A>) {
        let Envelope {
            op,
            before,
            after,
            source,
            ts_ms,
            unchanged_toast,
            key,
            types,
            schema_version,
            column_ids,
            ddl,
            snapshot,
            transaction,
            oversized,
        } = self;
        let rest = Envelope {
            op,
            before,
            after: None,
            source,
            ts_ms,
            unchanged_toast,
            key,
            types,
            schema_version,
            column_ids,
            ddl,
            snapshot,
            transaction,
            oversized,
        };
        (rest, after)
    }
}

impl Envelope {
    /// Parses a Kafka record value.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// A stable identity of the event: equal on every re-delivery of the same change, different
    /// for different changes. Snapshot rows are identified by their table and key instead,
    /// which the caller adds.
    pub fn position(&self) -> (u64, u64) {
        (self.source.commit_lsn, self.source.seq)
    }
}

/// Appends `s` to `out` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip_through_serde() {
        for s in [
            "plain",
            "quote \" and \\ back",
            "ctl \u{1}\u{1f}\n\t\r",
            "ünïcødé ✓",
            "",
        ] {
            let mut out = Vec::new();
            write_json_str(&mut out, s);
            let back: String = serde_json::from_slice(&out).expect("valid JSON string");
            assert_eq!(back, s);
        }
    }

    #[test]
    fn the_shipped_json_schema_names_every_field() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../envelope.schema.json")).expect("schema is JSON");
        let required = |v: &serde_json::Value| -> Vec<String> {
            v["required"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            required(&schema),
            [
                "op",
                "before",
                "after",
                "source",
                "ts_ms",
                "key",
                "types",
                "schema_version",
                "column_ids"
            ]
        );
        let source = required(&schema["properties"]["source"]);
        let env: Envelope = Envelope {
            op: Op::Read,
            before: None,
            after: None,
            source: Source {
                version: "v".into(),
                connector: CONNECTOR.into(),
                db: "d".into(),
                schema: "s".into(),
                table: "t".into(),
                lsn: 1,
                commit_lsn: 1,
                txid: 0,
                ts_ms: 0,
                snapshot: true,
                seq: 0,
            },
            ts_ms: 0,
            unchanged_toast: vec![],
            key: vec!["id".into()],
            types: ColumnTypes::default(),
            schema_version: 1,
            column_ids: ColumnIds::default(),
            ddl: None,
            snapshot: None,
            transaction: None,
            oversized: None,
        };
        let json = serde_json::to_value(&env).expect("serialize");
        assert!(
            json.get("snapshot").is_none(),
            "no frame on a row event: existing events serialize as before"
        );
        let ops: Vec<&str> = schema["properties"]["op"]["enum"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(
            ops,
            Op::ALL.map(Op::code),
            "the schema's ops are the model's, in order"
        );
        let frame = &schema["properties"]["snapshot"];
        assert_eq!(required(frame), ["attempt", "consistent_lsn"]);
        let marker = Envelope {
            op: Op::SnapshotEnd,
            snapshot: Some(SnapshotFrame {
                attempt: "a".into(),
                consistent_lsn: 1,
                rows: Some(3),
            }),
            ..env
        };
        let marker_json = serde_json::to_value(&marker).expect("serialize");
        for f in frame["properties"]
            .as_object()
            .map(|o| o.keys())
            .into_iter()
            .flatten()
        {
            assert!(
                marker_json["snapshot"].get(f).is_some(),
                "snapshot.{f} in the schema but not the model"
            );
        }
        for f in source {
            assert!(
                json["source"].get(&f).is_some(),
                "source.{f} in the schema but not the model"
            );
        }
        assert_eq!(json["source"].as_object().map(|o| o.len()), Some(11));
        for f in required(&schema) {
            assert!(
                json.get(&f).is_some(),
                "{f} in the schema but not the model"
            );
        }
    }

    #[test]
    fn envelope_parses_with_and_without_unchanged_list() {
        let json = br#"{"op":"u","before":null,"after":{"id":1,"big":"__debezium_unavailable_value"},
            "source":{"version":"0.1.0","connector":"walrelay","db":"d","schema":"public","table":"t",
            "lsn":10,"commit_lsn":20,"txid":5,"ts_ms":1,"snapshot":false,"seq":1},"ts_ms":1,
            "unchanged_toast":["big"]}"#;
        let env = Envelope::from_slice(json).expect("parses");
        assert_eq!(env.op, Op::Update);
        assert_eq!(env.unchanged_toast, vec!["big".to_string()]);
        assert_eq!(env.position(), (20, 1));
        assert_eq!(env.snapshot, None);
    }

    #[test]
    fn snapshot_markers_read_back_and_have_their_own_codes() {
        let json = br#"{"op":"snapshot_end","before":null,"after":null,
            "source":{"version":"0.1.0","connector":"walrelay","db":"d","schema":"public","table":"t",
            "lsn":77,"commit_lsn":77,"txid":0,"ts_ms":1,"snapshot":true,"seq":0},"ts_ms":1,
            "key":["id"],"types":{"id":"integer"},"schema_version":77,"column_ids":{"id":1},
            "snapshot":{"attempt":"4D-1","consistent_lsn":77,"rows":12}}"#;
        let env = Envelope::from_slice(json).expect("parses");
        assert_eq!(env.op, Op::SnapshotEnd);
        assert!(env.op.is_snapshot_marker() && !Op::Read.is_snapshot_marker());
        assert_eq!(
            env.snapshot,
            Some(SnapshotFrame {
                attempt: "4D-1".into(),
                consistent_lsn: 77,
                rows: Some(12),
            })
        );
        let back: Envelope =
            serde_json::from_value(serde_json::to_value(&env).expect("serialize")).expect("parse");
        assert_eq!(back, env);
        let start = serde_json::to_value(SnapshotFrame {
            rows: None,
            ..env.snapshot.expect("frame")
        })
        .expect("serialize");
        assert_eq!(
            start,
            serde_json::json!({"attempt": "4D-1", "consistent_lsn": 77})
        );
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op.index(), i);
            let wire = serde_json::to_value(op).expect("serialize");
            assert_eq!(wire, op.code(), "the metric label is the wire name");
        }
    }
}
