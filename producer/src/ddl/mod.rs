//! Schema events: DDL in the same ordered log as the rows.
//!
//! pgoutput carries no DDL. walrelay learns a table's schema three ways, all ending in the same
//! schema event (`op: "ddl"`, the table's whole schema in `ddl`, a new `schema_version`):
//!
//! ```text
//!   snapshot ─────────────┐  (each table, before its first snapshot row)
//!   event trigger message ┼─▶ Registry ──▶ schema event to every partition ──▶ rows tagged
//!   Relation mismatch ────┘  (fallback)     (before any row under it)           with the version
//! ```
//!
//! **Versions.** A schema's version is the LSN where it took effect: the trigger's logical
//! message, the snapshot's consistent point, or (fallback) the first row seen under it. So a
//! table's versions only grow, a replay after a crash produces the same versions, and nothing
//! needs a counter. **Column ids** are `attnum`s: Postgres keeps a column's `attnum` through
//! renames and type changes, never reuses a dropped one, and gives an added column a new one.
//!
//! **Order.** A trigger message is transactional: it is decoded at its place inside the DDL's
//! transaction, in commit order. Every row written under the new schema is decoded after it
//! (DDL that changes columns takes an ACCESS EXCLUSIVE lock, so no transaction that wrote under
//! the old schema commits after it). The schema event is sent to every partition of the topic
//! before the listener reads on, so under any `--partition-key` each partition carries the
//! schema before the rows that depend on it.
//!
//! **Restart.** The registry is persisted in `walrelay.schema_history` as each schema event is
//! produced, with the commit LSN of its transaction. A new session loads, per table, the latest
//! schema whose transaction committed before the slot's confirmed position; everything after
//! is replayed from the slot and recorded again (idempotently), so row events carry the same
//! version on every delivery.
//!
//! **Fallback.** When a Relation message's columns (names, type OIDs) or name differ from the
//! registry's schema for that table, the change was not captured by a trigger (no triggers
//! installed, or a table walrelay has not seen): walrelay reads the table from the catalog,
//! keeps the Relation's columns, and emits a schema event with `origin: "relation"`.

pub mod capture;
mod redact;

pub use redact::{has_several_statements, redact_statement};

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use walrelay_common::event::{ColumnSchema, SchemaChange, TableName};

use crate::catalog::{Catalog, PgError, build_shape};
use crate::encode::{ColumnShape, TableShape};

/// A table's schema as the catalog function describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableSchema {
    /// OID (stable across renames).
    pub table_oid: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Columns in `attnum` order.
    pub columns: Vec<ColumnSchema>,
}

impl TableSchema {
    /// Whether a Relation message (namespace, name, published columns) describes this schema.
    pub fn matches(&self, namespace: &str, name: &str, columns: &[(String, u32)]) -> bool {
        self.schema == namespace
            && self.table == name
            && self
                .columns
                .iter()
                .filter(|c| !c.generated)
                .map(|c| (c.name.as_str(), c.type_oid))
                .eq(columns.iter().map(|(n, t)| (n.as_str(), *t)))
    }

    /// The id of each of `names` (0 when a name is unknown).
    pub fn ids_of<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<i32> {
        names
            .map(|n| {
                self.columns
                    .iter()
                    .find(|c| c.name == n)
                    .map_or(0, |c| c.id)
            })
            .collect()
    }

    /// The schema a Relation message shows, completed from the catalog's current description
    /// (`current`, matched by name) where the message is silent.
    pub fn from_relation(
        oid: u32,
        namespace: &str,
        name: &str,
        columns: &[(String, u32)],
        current: Option<&TableSchema>,
    ) -> Self {
        let next_id = current
            .and_then(|c| c.columns.iter().map(|c| c.id).max())
            .unwrap_or(0);
        let columns = columns
            .iter()
            .enumerate()
            .map(|(i, (col, type_oid))| {
                let known = current.and_then(|c| {
                    c.columns
                        .iter()
                        .find(|k| &k.name == col && k.type_oid == *type_oid)
                });
                match known {
                    Some(k) => k.clone(),
                    // Renamed or retyped again since: the id cannot be known; give one no
                    // catalog column has.
                    None => ColumnSchema {
                        id: next_id + 1 + i as i32,
                        name: col.clone(),
                        type_name: String::new(),
                        type_oid: *type_oid,
                        logical: String::new(),
                        nullable: true,
                        default: None,
                        key_position: None,
                        generated: false,
                        identity: false,
                    },
                }
            })
            .collect();
        Self {
            table_oid: oid,
            schema: namespace.to_string(),
            table: name.to_string(),
            columns,
        }
    }

    fn name(&self) -> TableName {
        TableName {
            schema: self.schema.clone(),
            table: self.table.clone(),
        }
    }
}

/// Why a message in the DDL channel was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The producer cannot read `walrelay.ddl_key`, so no message can be verified.
    #[error("no DDL key to verify it with (the producer's role cannot read walrelay.ddl_key)")]
    NoKey,
    /// Not `v1:<mac>:<body>`.
    #[error("not in the form walrelay's trigger writes")]
    Malformed,
    /// The MAC does not match: not written by walrelay's trigger in this transaction.
    #[error(
        "its MAC does not verify: it was not written by walrelay's trigger in this transaction"
    )]
    Forged,
    /// Verified, but the body does not parse (a trigger of another walrelay version).
    #[error("its body does not parse ({0}); run `walrelay-producer init` with this version")]
    Body(String),
}

/// Checks a trigger message of transaction `xid` with `key` and parses it (see
/// [`capture`]'s essay for the format).
pub fn verify_message(
    content: &[u8],
    xid: u32,
    key: Option<&[u8]>,
) -> Result<TriggerMessage, ChannelError> {
    verify_channel(content, xid, key)
}

/// Checks a `v1:<mac>:<body>` message of transaction `xid` with `key` and parses its JSON
/// body: the format of every authenticated channel (DDL triggers, incremental-snapshot
/// watermarks).
pub fn verify_channel<T: serde::de::DeserializeOwned>(
    content: &[u8],
    xid: u32,
    key: Option<&[u8]>,
) -> Result<T, ChannelError> {
    use hmac::Mac as _;
    let key = key.ok_or(ChannelError::NoKey)?;
    let rest = content
        .strip_prefix(b"v1:")
        .ok_or(ChannelError::Malformed)?;
    let (mac_hex, body) = rest
        .get(..64)
        .zip(rest.get(64..).and_then(|r| r.strip_prefix(b":")))
        .ok_or(ChannelError::Malformed)?;
    let mut mac = [0u8; 32];
    for (i, pair) in mac_hex.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).map_err(|_| ChannelError::Malformed)?;
        mac[i] = u8::from_str_radix(hex, 16).map_err(|_| ChannelError::Malformed)?;
    }
    let mut expected =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).map_err(|_| ChannelError::NoKey)?;
    expected.update(format!("{xid}:").as_bytes());
    expected.update(body);
    expected
        .verify_slice(&mac)
        .map_err(|_| ChannelError::Forged)?;
    serde_json::from_slice(body).map_err(|e| ChannelError::Body(e.to_string()))
}

/// What the event triggers send.
#[derive(Debug, Deserialize)]
pub struct TriggerMessage {
    /// Command tag.
    pub command: String,
    /// Object identity.
    pub object: String,
    /// Statement text.
    pub sql: String,
    /// Publications the table is in (after the command).
    #[serde(default)]
    pub publications: Vec<String>,
    /// A dropped table.
    #[serde(default)]
    pub dropped: bool,
    /// The table after the command (for a drop: only its names and OID).
    pub table: TableSchema,
}

/// A table's current schema and its version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Versioned {
    /// The LSN where it took effect.
    pub version: u64,
    /// The schema.
    pub schema: TableSchema,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    dropped: bool,
    schema: TableSchema,
}

/// Reads a table's schema from the catalog (`None` when the table is gone).
pub async fn read_schema(ctl: &Client, oid: u32) -> Result<Option<TableSchema>, PgError> {
    let row = ctl
        .query_one("SELECT walrelay.table_schema($1)::text", &[&oid])
        .await
        .map_err(PgError::query(format!(
            "reading the schema of relation {oid}"
        )))?;
    let text: Option<String> = row.get(0);
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            PgError::Catalog(format!(
                "walrelay.table_schema({oid}) returned an unexpected shape ({e}): run `walrelay-producer init` again"
            ))
        })
    })
    .transpose()
}

/// The schema of every captured table, as of the stream position.
pub struct Registry {
    slot: String,
    tables: HashMap<u32, Versioned>,
}

impl Registry {
    /// An empty registry.
    pub fn new(slot: &str) -> Self {
        Self {
            slot: slot.to_string(),
            tables: HashMap::new(),
        }
    }

    /// Loads, per table, the latest schema whose transaction committed before `confirmed`.
    pub async fn load(ctl: &Client, slot: &str, confirmed: u64) -> Result<Self, PgError> {
        let rows = ctl
            .query(
                "SELECT DISTINCT ON (relid) version, schema::text FROM walrelay.schema_history \
                 WHERE slot_name = $1 AND commit_lsn < $2 ORDER BY relid, version DESC",
                &[&slot, &(confirmed.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(PgError::query("reading walrelay.schema_history"))?;
        let mut tables = HashMap::new();
        for r in rows {
            let version: i64 = r.get(0);
            let text: String = r.get(1);
            let stored: Stored = serde_json::from_str(&text).map_err(|e| {
                PgError::Catalog(format!(
                    "walrelay.schema_history holds an unreadable entry ({e})"
                ))
            })?;
            if !stored.dropped {
                tables.insert(
                    stored.schema.table_oid,
                    Versioned {
                        version: version as u64,
                        schema: stored.schema,
                    },
                );
            }
        }
        Ok(Self {
            slot: slot.to_string(),
            tables,
        })
    }

    /// The current schema of `oid`.
    pub fn get(&self, oid: u32) -> Option<&Versioned> {
        self.tables.get(&oid)
    }

    /// Records a new schema (or a drop) produced inside the transaction committing at
    /// `commit_lsn` (0: always part of the state, as the snapshot's are).
    pub async fn record(
        &mut self,
        ctl: &Client,
        version: u64,
        commit_lsn: u64,
        schema: TableSchema,
        dropped: bool,
    ) -> Result<(), PgError> {
        let oid = schema.table_oid;
        let stored = Stored { dropped, schema };
        let text = serde_json::to_string(&stored)
            .map_err(|e| PgError::Catalog(format!("encoding a schema: {e}")))?;
        ctl.execute(
            "INSERT INTO walrelay.schema_history (slot_name, relid, version, commit_lsn, schema) \
             VALUES ($1, $2, $3, $4, $5::text::jsonb) ON CONFLICT DO NOTHING",
            &[
                &self.slot,
                &oid,
                &(version as i64),
                &(commit_lsn as i64),
                &text,
            ],
        )
        .await
        .map_err(PgError::query("writing walrelay.schema_history"))?;
        if dropped {
            self.tables.remove(&oid);
        } else {
            self.tables.insert(
                oid,
                Versioned {
                    version,
                    schema: stored.schema,
                },
            );
        }
        Ok(())
    }
}

/// A schema event ready to encode.
pub struct SchemaEvent {
    /// The table's shape under the new schema (tagged with its version).
    pub shape: TableShape,
    /// The `ddl` body.
    pub change: SchemaChange,
}

/// Where a schema event comes from, and what is known of the command.
pub struct Origin<'a> {
    /// `trigger`, `relation` or `snapshot`.
    pub kind: &'static str,
    /// The trigger's message, when there is one.
    pub message: Option<&'a TriggerMessage>,
    /// The table's schema before (for `previous`).
    pub before: Option<&'a TableSchema>,
}

/// Builds the schema event of `schema` at `version`.
pub async fn schema_event(
    catalog: &mut Catalog<'_>,
    schema: &TableSchema,
    version: u64,
    origin: Origin<'_>,
    dropped: bool,
) -> Result<SchemaEvent, PgError> {
    let mut columns = Vec::with_capacity(schema.columns.len());
    let mut shaped = Vec::new();
    let mut keys: Vec<(i32, String)> = Vec::new();
    for c in &schema.columns {
        let kind = catalog
            .column_kind(
                c.type_oid,
                &format!("{}.{}", schema.schema, schema.table),
                &c.name,
            )
            .await?;
        let mut col = c.clone();
        col.logical = kind.label();
        columns.push(col);
        if !c.generated {
            shaped.push(
                ColumnShape::new(&c.name, kind, c.key_position.is_some())
                    .with_type(c.type_oid, crate::avro::types::typmod_of_name(&c.type_name)),
            );
            if let Some(p) = c.key_position {
                keys.push((p, c.name.clone()));
            }
        }
    }
    keys.sort();
    let keys: Vec<String> = keys.into_iter().map(|(_, n)| n).collect();
    let mut shape = build_shape(&schema.schema, &schema.table, shaped, &keys);
    let ids = schema.ids_of(shape.columns.iter().map(|c| c.name.as_str()));
    shape.set_schema(version, ids);
    let previous = origin
        .before
        .map(TableSchema::name)
        .filter(|prev| *prev != schema.name());
    let change = SchemaChange {
        origin: origin.kind.to_string(),
        command: origin.message.map(|m| m.command.clone()),
        object: origin.message.map(|m| m.object.clone()),
        sql: origin
            .message
            .map(|m| m.sql.clone())
            .filter(|s| !s.is_empty()),
        previous,
        dropped,
        table_oid: schema.table_oid,
        columns,
    };
    Ok(SchemaEvent { shape, change })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(key: &[u8], xid: u32, body: &str) -> Vec<u8> {
        use hmac::Mac as _;
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("key");
        m.update(format!("{xid}:{body}").as_bytes());
        let hex: String = m
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("v1:{hex}:{body}").into_bytes()
    }

    #[test]
    fn passwords_are_redacted_from_statements() {
        for (sql, want) in [
            (
                "CREATE ROLE app LOGIN PASSWORD 'hunter2'; ALTER TABLE t ADD c int",
                "CREATE ROLE app LOGIN PASSWORD '***'; ALTER TABLE t ADD c int",
            ),
            (
                "alter user app with encrypted password E'it''s\\'secret'",
                "alter user app with encrypted password '***'",
            ),
            (
                "CREATE USER MAPPING FOR x SERVER s OPTIONS (user 'u', password 'p@ss')",
                "CREATE USER MAPPING FOR x SERVER s OPTIONS (user 'u', password '***')",
            ),
            (
                "CREATE SUBSCRIPTION s CONNECTION 'host=h password=topsecret dbname=d' PUBLICATION p",
                "CREATE SUBSCRIPTION s CONNECTION 'host=h password=*** dbname=d' PUBLICATION p",
            ),
            (
                "ALTER ROLE r PASSWORD $x$dollar$x$",
                "ALTER ROLE r PASSWORD '***'",
            ),
            (
                "ALTER TABLE password_hints ADD COLUMN password text DEFAULT 'none'",
                "ALTER TABLE password_hints ADD COLUMN password text DEFAULT 'none'",
            ),
            (
                "ALTER TABLE t ADD c text DEFAULT 'é'",
                "ALTER TABLE t ADD c text DEFAULT 'é'",
            ),
        ] {
            assert_eq!(redact_statement(sql), want, "{sql}");
        }
    }

    #[test]
    fn only_messages_signed_for_their_transaction_verify() {
        let key = [7u8; 32];
        let body = r#"{"command":"DROP TABLE","object":"public.t","sql":"","dropped":true,
            "table":{"table_oid":1,"schema":"public","table":"t","columns":[]}}"#;
        let good = signed(&key, 42, body);
        let m = verify_message(&good, 42, Some(&key)).expect("verifies");
        assert!(m.dropped);
        assert!(matches!(
            verify_message(&good, 43, Some(&key)),
            Err(ChannelError::Forged)
        ));
        assert!(matches!(
            verify_message(&signed(&[8u8; 32], 42, body), 42, Some(&key)),
            Err(ChannelError::Forged)
        ));
        assert!(matches!(
            verify_message(body.as_bytes(), 42, Some(&key)),
            Err(ChannelError::Malformed)
        ));
        assert!(matches!(
            verify_message(b"v1:zz", 42, Some(&key)),
            Err(ChannelError::Malformed)
        ));
        assert!(matches!(
            verify_message(&good, 42, None),
            Err(ChannelError::NoKey)
        ));
        assert!(matches!(
            verify_message(&signed(&key, 42, "{not json"), 42, Some(&key)),
            Err(ChannelError::Body(_))
        ));
    }

    fn col(id: i32, name: &str, type_oid: u32, generated: bool) -> ColumnSchema {
        ColumnSchema {
            id,
            name: name.into(),
            type_name: String::new(),
            type_oid,
            logical: String::new(),
            nullable: true,
            default: None,
            key_position: (id == 1).then_some(1),
            generated,
            identity: false,
        }
    }

    fn users() -> TableSchema {
        TableSchema {
            table_oid: 42,
            schema: "public".into(),
            table: "users".into(),
            columns: vec![
                col(1, "id", 20, false),
                col(3, "name", 25, false),
                col(4, "upper_name", 25, true),
            ],
        }
    }

    #[test]
    fn relation_matches_published_columns_only() {
        let s = users();
        let rel = vec![("id".to_string(), 20), ("name".to_string(), 25)];
        assert!(s.matches("public", "users", &rel));
        assert!(!s.matches("public", "people", &rel));
        let retyped = vec![("id".to_string(), 20), ("name".to_string(), 1043)];
        assert!(!s.matches("public", "users", &retyped));
        assert_eq!(s.ids_of(["name", "id", "gone"].into_iter()), vec![3, 1, 0]);
    }

    #[test]
    fn relation_fallback_keeps_ids_by_name_and_invents_unknown_ones() {
        let current = users();
        let rel = vec![("id".to_string(), 20), ("nick".to_string(), 25)];
        let s = TableSchema::from_relation(42, "public", "users", &rel, Some(&current));
        assert_eq!(s.columns[0].id, 1);
        assert!(s.columns[1].id > 4, "a new id no catalog column has");
        assert!(s.matches("public", "users", &rel));
    }

    #[test]
    fn trigger_message_parses() {
        let text = r#"{"command":"ALTER TABLE","object":"public.users","sql":"alter table users add c int",
            "publications":["p"],"dropped":false,"table":{"table_oid":42,"schema":"public","table":"users",
            "columns":[{"id":1,"name":"id","type":"bigint","type_oid":20,"nullable":false,"default":null,
            "key_position":1,"generated":false,"identity":false}]}}"#;
        let m: TriggerMessage = serde_json::from_str(text).expect("parses");
        assert_eq!(m.table.columns[0].key_position, Some(1));
        assert_eq!(m.publications, vec!["p"]);
    }
}
