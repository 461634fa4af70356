//! The target database: the session, walrelay's bookkeeping in it, and catalog lookups.
//!
//! Bookkeeping (schema `walrelay`, created when missing):
//!
//! | table | one row per | holds |
//! |---|---|---|
//! | `walrelay.applied` | (group, topic, partition) | `next_offset`: every record below it is applied; `events_applied`: records handled, each once |
//! | `walrelay.replicated_tables` | source table (database, OID) | its target name and the columns of the last schema event applied; a dropped table stays as a tombstone (`dropped`, with the drop's version), so that a lagging copy of an older schema event of it is recognised as applied |
//! | `walrelay.replicated_names` | name a source table had | its OID: rows still arriving under an old name (from a partition behind its copy of the rename or drop) find the table, or that it was dropped |
//!
//! Both change only inside the transactions that apply rows and schema changes, so they are
//! exactly as current as the target's data.

use std::collections::HashMap;

use tokio_postgres::{Client, GenericClient};
use walrelay_common::event::ColumnSchema;
use walrelay_common::postgres::{PgConnectError, PgTarget};

use super::encode::{TargetTable, qualified};

/// Why the target failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target could not be reached, or a session failed (retried).
    #[error("target database: {0}")]
    Connect(#[from] PgConnectError),
    /// A statement failed with its session (the connection lost, the server shutting down):
    /// retried.
    #[error("target database: {0}")]
    Session(String),
    /// A statement failed.
    #[error("target database: {0}")]
    Sql(String),
}

impl TargetError {
    /// A statement's failure, with Postgres' message, detail and hint (never the values).
    pub fn sql(e: &tokio_postgres::Error) -> Self {
        if transient(e) {
            TargetError::Session(describe(e))
        } else {
            TargetError::Sql(describe(e))
        }
    }

    /// Whether retrying may succeed: a lost connection, a serialization failure or deadlock,
    /// too many connections, the server shutting down.
    pub fn is_transient(&self) -> bool {
        match self {
            TargetError::Connect(e) => e.is_transient(),
            TargetError::Session(_) => true,
            TargetError::Sql(_) => false,
        }
    }
}

/// Whether a statement error is worth a retry (the connection, not the statement).
pub fn transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => true,
        Some(code) => {
            let c = code.code();
            // connection_exception, serialization_failure, deadlock_detected,
            // too_many_connections, admin/crash shutdown, cannot_connect_now
            c.starts_with("08")
                || c == "40001"
                || c == "40P01"
                || c == "53300"
                || c.starts_with("57P")
        }
    }
}

/// Postgres' error with its hint (not its detail, which can quote row values: "Failing row
/// contains …").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// Opens a session to the target.
pub async fn connect(target: &PgTarget) -> Result<Client, TargetError> {
    Ok(target.connect("walrelay-replicator").await?)
}

/// Creates the bookkeeping tables when missing.
pub async fn prepare(client: &Client) -> Result<(), TargetError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS walrelay;
             CREATE TABLE IF NOT EXISTS walrelay.applied (
                 consumer_group text NOT NULL,
                 topic text NOT NULL,
                 kafka_partition integer NOT NULL,
                 next_offset bigint NOT NULL,
                 events_applied bigint NOT NULL DEFAULT 0,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (consumer_group, topic, kafka_partition));
             CREATE TABLE IF NOT EXISTS walrelay.replicated_tables (
                 source_db text NOT NULL,
                 table_oid bigint NOT NULL,
                 source_schema text NOT NULL,
                 source_table text NOT NULL,
                 target_schema text NOT NULL,
                 target_table text NOT NULL,
                 schema_version bigint NOT NULL,
                 columns jsonb NOT NULL,
                 truncated_lsn bigint NOT NULL DEFAULT 0,
                 truncated_seq bigint NOT NULL DEFAULT 0,
                 updated_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (source_db, table_oid));
             ALTER TABLE walrelay.replicated_tables
                 ADD COLUMN IF NOT EXISTS dropped boolean NOT NULL DEFAULT false;
             CREATE TABLE IF NOT EXISTS walrelay.replicated_names (
                 source_db text NOT NULL,
                 source_schema text NOT NULL,
                 source_table text NOT NULL,
                 table_oid bigint NOT NULL,
                 PRIMARY KEY (source_db, source_schema, source_table));",
        )
        .await
        .map_err(|e| TargetError::sql(&e))
}

/// Locks the applied rows of `parts` for this transaction (creating them) and returns their
/// `next_offset`s. Locked in (topic, partition) order, so two replicators never deadlock on
/// them within one call.
pub async fn lock_positions(
    tx: &impl GenericClient,
    group: &str,
    parts: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, tokio_postgres::Error> {
    let mut sorted = parts.to_vec();
    sorted.sort();
    sorted.dedup();
    let topics: Vec<&str> = sorted.iter().map(|(t, _)| t.as_str()).collect();
    let partitions: Vec<i32> = sorted.iter().map(|(_, p)| *p).collect();
    tx.execute(
        "INSERT INTO walrelay.applied (consumer_group, topic, kafka_partition, next_offset)
         SELECT $1, t, p, 0 FROM unnest($2::text[], $3::int[]) AS u(t, p)
         ON CONFLICT DO NOTHING",
        &[&group, &topics, &partitions],
    )
    .await?;
    let rows = tx
        .query(
            "SELECT a.topic, a.kafka_partition, a.next_offset FROM walrelay.applied a
             JOIN unnest($2::text[], $3::int[]) AS u(t, p) ON a.topic = u.t AND a.kafka_partition = u.p
             WHERE a.consumer_group = $1
             ORDER BY a.topic, a.kafka_partition FOR UPDATE OF a",
            &[&group, &topics, &partitions],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                (r.get::<_, String>(0), r.get::<_, i32>(1)),
                r.get::<_, i64>(2),
            )
        })
        .collect())
}

/// Moves the applied positions: `(topic, partition, next_offset, records handled)`.
pub async fn advance(
    tx: &impl GenericClient,
    group: &str,
    moves: &[(String, i32, i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    if moves.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = moves.iter().map(|m| m.0.as_str()).collect();
    let partitions: Vec<i32> = moves.iter().map(|m| m.1).collect();
    let next: Vec<i64> = moves.iter().map(|m| m.2).collect();
    let counts: Vec<i64> = moves.iter().map(|m| m.3).collect();
    tx.execute(
        "UPDATE walrelay.applied a SET next_offset = u.n, events_applied = a.events_applied + u.c,
                updated_at = now()
         FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bigint[]) AS u(t, p, n, c)
         WHERE a.consumer_group = $1 AND a.topic = u.t AND a.kafka_partition = u.p",
        &[&group, &topics, &partitions, &next, &counts],
    )
    .await?;
    Ok(())
}

/// What the target knows of a source table.
#[derive(Debug, Clone)]
pub struct Replicated {
    /// The source table's OID.
    pub oid: u32,
    /// Source schema.
    pub source_schema: String,
    /// Source table.
    pub source_table: String,
    /// The schema version of the last schema event applied.
    pub version: u64,
    /// Target schema.
    pub schema: String,
    /// Target table.
    pub table: String,
    /// The columns of the last schema event applied.
    pub columns: Vec<ColumnSchema>,
    /// Where the last truncate applied was in the log (commit LSN, sequence): row changes
    /// from before it, still arriving from partitions behind their copy of it, are skipped.
    pub truncated: (u64, u64),
    /// Dropped (a tombstone: `version` is the drop's).
    pub dropped: bool,
}

/// The bookkeeping row of a source table, by OID or (when `oid` is `None`) by source name.
pub async fn replicated(
    tx: &impl GenericClient,
    db: &str,
    oid: Option<u32>,
    name: (&str, &str),
) -> Result<Option<Replicated>, tokio_postgres::Error> {
    let oid = oid.map(i64::from);
    let row = tx
        .query_opt(
            "SELECT table_oid, source_schema, source_table, schema_version, target_schema,
                    target_table, columns::text, truncated_lsn, truncated_seq, dropped
             FROM walrelay.replicated_tables
             WHERE source_db = $1 AND CASE WHEN $2::bigint IS NULL
                   THEN source_schema = $3 AND source_table = $4 ELSE table_oid = $2 END",
            &[&db, &oid, &name.0, &name.1],
        )
        .await?;
    Ok(row.and_then(|r| {
        let columns: Vec<ColumnSchema> = serde_json::from_str(r.get::<_, &str>(6)).ok()?;
        Some(Replicated {
            oid: u32::try_from(r.get::<_, i64>(0)).ok()?,
            source_schema: r.get(1),
            source_table: r.get(2),
            version: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            schema: r.get(4),
            table: r.get(5),
            columns,
            truncated: (
                u64::try_from(r.get::<_, i64>(7)).unwrap_or(0),
                u64::try_from(r.get::<_, i64>(8)).unwrap_or(0),
            ),
            dropped: r.get(9),
        })
    }))
}

/// The version of a dropped table's tombstone.
pub async fn mark_dropped_version(
    tx: &impl GenericClient,
    db: &str,
    oid: u32,
    version: u64,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE walrelay.replicated_tables SET schema_version = greatest(schema_version, $3)
         WHERE source_db = $1 AND table_oid = $2 AND dropped",
        &[
            &db,
            &i64::from(oid),
            &i64::try_from(version).unwrap_or(i64::MAX),
        ],
    )
    .await?;
    Ok(())
}

/// A source table by any name it had: its OID, and what is known of it (`None`, or a
/// tombstone: dropped).
pub async fn by_name(
    tx: &impl GenericClient,
    db: &str,
    schema: &str,
    table: &str,
) -> Result<Option<(u32, Option<Replicated>)>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT table_oid FROM walrelay.replicated_names
             WHERE source_db = $1 AND source_schema = $2 AND source_table = $3",
            &[&db, &schema, &table],
        )
        .await?;
    let Some(oid) = row.and_then(|r| u32::try_from(r.get::<_, i64>(0)).ok()) else {
        return Ok(None);
    };
    Ok(Some((oid, replicated(tx, db, Some(oid), ("", "")).await?)))
}

/// Records what the target holds of a source table, or (when `r` is `None`) that it was
/// dropped (the row stays, as a tombstone; [`mark_dropped_version`] sets its version).
pub async fn remember(
    tx: &impl GenericClient,
    db: &str,
    oid: u32,
    r: Option<&Replicated>,
) -> Result<(), tokio_postgres::Error> {
    match r {
        None => {
            tx.execute(
                "UPDATE walrelay.replicated_tables SET dropped = true, updated_at = now()
                 WHERE source_db = $1 AND table_oid = $2",
                &[&db, &i64::from(oid)],
            )
            .await?;
        }
        Some(r) => {
            let columns = serde_json::to_string(&r.columns).unwrap_or_else(|_| "[]".into());
            tx.execute(
                "INSERT INTO walrelay.replicated_tables (source_db, table_oid, target_schema,
                     target_table, schema_version, columns, source_schema, source_table)
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8)
                 ON CONFLICT (source_db, table_oid) DO UPDATE SET dropped = false,
                     target_schema = EXCLUDED.target_schema,
                     source_schema = EXCLUDED.source_schema, source_table = EXCLUDED.source_table,
                     target_table = EXCLUDED.target_table, schema_version = EXCLUDED.schema_version,
                     columns = EXCLUDED.columns, updated_at = now()",
                &[
                    &db,
                    &i64::from(oid),
                    &r.schema,
                    &r.table,
                    &i64::try_from(r.version).unwrap_or(i64::MAX),
                    &columns,
                    &r.source_schema,
                    &r.source_table,
                ],
            )
            .await?;
            tx.execute(
                "INSERT INTO walrelay.replicated_names (source_db, source_schema, source_table, table_oid)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (source_db, source_schema, source_table) DO UPDATE SET table_oid = EXCLUDED.table_oid",
                &[&db, &r.source_schema, &r.source_table, &i64::from(oid)],
            )
            .await?;
        }
    }
    Ok(())
}

/// Records where a truncate of a source table was applied.
pub async fn truncated(
    tx: &impl GenericClient,
    db: &str,
    oid: u32,
    at: (u64, u64),
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "UPDATE walrelay.replicated_tables SET truncated_lsn = $3, truncated_seq = $4, updated_at = now()
         WHERE source_db = $1 AND table_oid = $2",
        &[
            &db,
            &i64::from(oid),
            &i64::try_from(at.0).unwrap_or(i64::MAX),
            &i64::try_from(at.1).unwrap_or(i64::MAX),
        ],
    )
    .await?;
    Ok(())
}

/// The target table's columns and primary key, `None` when it does not exist.
pub async fn table(
    tx: &impl GenericClient,
    schema: &str,
    table: &str,
) -> Result<Option<TargetTable>, tokio_postgres::Error> {
    let name = qualified(schema, table);
    let cols = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    coalesce(a.attnum = ANY(i.indkey::int2[]), false)
             FROM pg_attribute a
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&name],
        )
        .await?;
    if cols.is_empty() {
        let exists = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await?
            .get::<_, bool>(0);
        if !exists {
            return Ok(None);
        }
    }
    Ok(Some(TargetTable {
        name,
        columns: cols.iter().map(|r| (r.get(0), r.get(1))).collect(),
        primary_key: cols
            .iter()
            .filter(|r| r.get::<_, bool>(2))
            .map(|r| r.get(0))
            .collect(),
    }))
}

/// Serialises the members of all groups on one source table's schema changes and truncates,
/// until the transaction ends.
pub async fn lock_table(tx: &impl GenericClient, oid: u32) -> Result<(), tokio_postgres::Error> {
    // Two int4 keys: walrelay's namespace ("WRLY") and the OID's bits.
    let oid = i32::from_ne_bytes(oid.to_ne_bytes());
    tx.execute("SELECT pg_advisory_xact_lock(1465011289, $1)", &[&oid])
        .await?;
    Ok(())
}

/// Whether the target knows a type name.
pub async fn has_type(tx: &impl GenericClient, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .query_one("SELECT to_regtype($1) IS NOT NULL", &[&name])
        .await?
        .get::<_, bool>(0))
}
