//! The Avro schemas walrelay registers: a table's `Key` and `Envelope` (Debezium's layout),
//! and the fixed records of schema events, snapshot markers and transaction metadata.
//!
//! Avro names allow `[A-Za-z_][A-Za-z0-9_]*` per dotted part; other characters of a Postgres
//! or topic name become `_` (as Debezium's `schema.name.adjustment.mode=avro`). The original
//! names travel as `walrelay.*` properties, which consumers read back. Two columns whose names
//! adjust to the same field name are refused with both names.
//!
//! Unlike Debezium, every field of `Value` is nullable, the key columns' too: an old image
//! carries only the replica identity, which need not include the key, and an unchanged TOAST
//! value of a type that cannot carry Debezium's placeholder is written as null (and named in
//! `unchanged_toast`). The `Key` record's fields are not nullable.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::types::AvroType;
use crate::encode::{EncodeError, TableShape};

/// Full name of the schema-event record.
pub const SCHEMA_CHANGE_NAME: &str = "io.walrelay.SchemaChange";
/// Full name of the snapshot-marker record.
pub const SNAPSHOT_MARKER_NAME: &str = "io.walrelay.SnapshotMarker";
/// Full name of the transaction-metadata record (Debezium's).
pub const TRANSACTION_NAME: &str = "io.debezium.connector.common.TransactionMetadataValue";

/// A name part adjusted to Avro's rules.
pub fn avro_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// A dotted namespace with each part adjusted.
pub fn avro_namespace(parts: &[&str]) -> String {
    parts
        .iter()
        .flat_map(|p| p.split('.'))
        .map(avro_name)
        .collect::<Vec<_>>()
        .join(".")
}

/// A table's schemas.
#[derive(Debug)]
pub struct Built {
    /// The key schema (`None`: the table has no key).
    pub key: Option<String>,
    /// Full name of the key record.
    pub key_name: String,
    /// The value schema.
    pub value: String,
    /// Full name of the Envelope record.
    pub value_name: String,
    /// Each column's Avro type.
    pub columns: Vec<AvroType>,
    /// Whether each column's field is nullable.
    pub nullable: Vec<bool>,
}

/// `shape`'s Key and Envelope schemas, named under `prefix` (the topic prefix).
pub fn table(prefix: &str, shape: &TableShape) -> Result<Built, EncodeError> {
    let ns = avro_namespace(&[prefix, &shape.schema, &shape.table]);
    let mut seen = HashSet::new();
    let mut columns = Vec::with_capacity(shape.columns.len());
    let mut nullable = Vec::with_capacity(shape.columns.len());
    let mut fields = Vec::with_capacity(shape.columns.len());
    let mut named = false;
    let mut field_names = Vec::with_capacity(shape.columns.len());
    for (i, col) in shape.columns.iter().enumerate() {
        let name = avro_name(&col.name);
        if !seen.insert(name.clone()) {
            let other = shape
                .columns
                .iter()
                .find(|c| avro_name(&c.name) == name)
                .map_or("", |c| c.name.as_str());
            return Err(EncodeError::new(format!(
                "table {}: columns {other:?} and {:?} both become the Avro field {name:?}; rename one of them, or use --format json",
                shape.qualified(),
                col.name
            )));
        }
        let ty = AvroType::of(&col.kind, col.type_oid, col.typmod);
        // Every Value field is nullable: an old image carries only the replica identity,
        // which need not hold the key columns (REPLICA IDENTITY USING INDEX).
        let is_key = false;
        let mut t = if named && ty.names_a_record() {
            ty.schema_again()
        } else {
            ty.schema()
        };
        named |= ty.names_a_record();
        if !is_key {
            t = json!(["null", t]);
        }
        let mut field = json!({
            "name": name,
            "type": t,
            "walrelay.column": col.name,
            "walrelay.type": col.kind.label(),
        });
        if !is_key {
            field["default"] = Value::Null;
        }
        if let Some(id) = shape.column_ids.get(i) {
            field["walrelay.id"] = json!(id);
        }
        fields.push(field);
        field_names.push(name);
        columns.push(ty);
        nullable.push(!is_key);
    }
    let key_names: Vec<&str> = shape
        .key_columns
        .iter()
        .filter_map(|&i| shape.columns.get(i).map(|c| c.name.as_str()))
        .collect();
    let value_record = json!({
        "type": "record", "name": "Value", "namespace": ns,
        "fields": fields,
        "connect.name": format!("{ns}.Value"),
    });
    let value_name = format!("{ns}.Envelope");
    let envelope = json!({
        "type": "record", "name": "Envelope", "namespace": ns,
        "fields": [
            {"name": "before", "type": ["null", value_record], "default": null},
            {"name": "after", "type": ["null", format!("{ns}.Value")], "default": null},
            {"name": "source", "type": source()},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null},
            {"name": "transaction", "type": ["null", transaction_block()], "default": null},
            {"name": "unchanged_toast", "type": {"type": "array", "items": "string"}, "default": []},
        ],
        "connect.name": value_name,
        "connect.version": 1,
        "walrelay.table": shape.qualified(),
        "walrelay.key": key_names,
        "walrelay.schema_version": shape.schema_version,
    });
    let key_name = format!("{ns}.Key");
    let key = if shape.key_columns.is_empty() {
        None
    } else {
        let mut named = false;
        let fields: Vec<Value> = shape
            .key_columns
            .iter()
            .map(|&i| {
                let ty = &columns[i];
                let t = if named && ty.names_a_record() {
                    ty.schema_again()
                } else {
                    ty.schema()
                };
                named |= ty.names_a_record();
                json!({"name": field_names[i], "type": t, "walrelay.column": shape.columns[i].name})
            })
            .collect();
        Some(
            json!({
                "type": "record", "name": "Key", "namespace": ns, "fields": fields,
                "connect.name": key_name,
            })
            .to_string(),
        )
    };
    Ok(Built {
        key,
        key_name,
        value: envelope.to_string(),
        value_name,
        columns,
        nullable,
    })
}

/// Debezium's Postgres `Source` record, plus walrelay's `commit_lsn` and `seq`.
pub fn source() -> Value {
    json!({
        "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": [{
                "type": "string", "connect.version": 1,
                "connect.parameters": {"allowed": "true,last,false,incremental"},
                "connect.default": "false", "connect.name": "io.debezium.data.Enum"}, "null"],
             "default": "false"},
            {"name": "db", "type": "string"},
            {"name": "sequence", "type": ["null", "string"], "default": null},
            {"name": "schema", "type": "string"},
            {"name": "table", "type": "string"},
            {"name": "txId", "type": ["null", "long"], "default": null},
            {"name": "lsn", "type": ["null", "long"], "default": null},
            {"name": "xmin", "type": ["null", "long"], "default": null},
            {"name": "commit_lsn", "type": "long", "default": 0},
            {"name": "seq", "type": "long", "default": 0},
        ],
        "connect.name": "io.debezium.connector.postgresql.Source",
    })
}

fn transaction_block() -> Value {
    json!({
        "type": "record", "name": "block", "namespace": "event",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "total_order", "type": "long"},
            {"name": "data_collection_order", "type": "long"},
        ],
        "connect.name": "event.block",
    })
}

/// The fields every fixed record of a table starts with.
fn head() -> Vec<Value> {
    vec![
        json!({"name": "op", "type": "string"}),
        json!({"name": "source", "type": source()}),
        json!({"name": "ts_ms", "type": "long"}),
        json!({"name": "key", "type": {"type": "array", "items": "string"}}),
        json!({"name": "schema_version", "type": "long"}),
    ]
}

/// The schema-event record: the head and the change (walrelay's `ddl` block).
pub fn schema_change() -> String {
    let mut fields = head();
    fields.extend([
        json!({"name": "origin", "type": "string"}),
        json!({"name": "command", "type": ["null", "string"], "default": null}),
        json!({"name": "object", "type": ["null", "string"], "default": null}),
        json!({"name": "sql", "type": ["null", "string"], "default": null}),
        json!({"name": "previous", "type": ["null", {"type": "record", "name": "TableName", "fields": [
            {"name": "schema", "type": "string"}, {"name": "table", "type": "string"}]}], "default": null}),
        json!({"name": "dropped", "type": "boolean"}),
        json!({"name": "table_oid", "type": "long"}),
        json!({"name": "columns", "type": {"type": "array", "items": {"type": "record", "name": "Column", "fields": [
            {"name": "id", "type": "int"},
            {"name": "name", "type": "string"},
            {"name": "type", "type": "string"},
            {"name": "type_oid", "type": "long"},
            {"name": "logical", "type": "string"},
            {"name": "nullable", "type": "boolean"},
            {"name": "default", "type": ["null", "string"], "default": null},
            {"name": "key_position", "type": ["null", "int"], "default": null},
            {"name": "generated", "type": "boolean"},
            {"name": "identity", "type": "boolean"},
        ]}}}),
    ]);
    json!({"type": "record", "name": "SchemaChange", "namespace": "io.walrelay", "fields": fields})
        .to_string()
}

/// The snapshot-marker record: the head and the frame.
pub fn snapshot_marker() -> String {
    let mut fields = head();
    fields.extend([
        json!({"name": "attempt", "type": "string"}),
        json!({"name": "consistent_lsn", "type": "long"}),
        json!({"name": "rows", "type": ["null", "long"], "default": null}),
    ]);
    json!({"type": "record", "name": "SnapshotMarker", "namespace": "io.walrelay", "fields": fields})
        .to_string()
}

/// Debezium's transaction-metadata record.
pub fn transaction() -> String {
    json!({
        "type": "record", "name": "TransactionMetadataValue",
        "namespace": "io.debezium.connector.common",
        "fields": [
            {"name": "status", "type": "string"},
            {"name": "id", "type": "string"},
            {"name": "event_count", "type": ["null", "long"], "default": null},
            {"name": "data_collections", "type": ["null", {"type": "array", "items": {
                "type": "record", "name": "ConnectDefault",
                "namespace": "io.confluent.connect.avro",
                "fields": [
                    {"name": "data_collection", "type": "string"},
                    {"name": "event_count", "type": "long"},
                ]}}], "default": null},
            {"name": "ts_ms", "type": "long"},
        ],
        "connect.name": "io.debezium.connector.common.TransactionMetadataValue",
    })
    .to_string()
}
