//! `check` (in [`check`]), `init`, `status` and `destroy`.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog::{self, PgError, TableRef, quote_ident};
use crate::config::Settings;
use crate::ddl::capture;
use crate::replication::slot::{self, STATE_SCHEMA};

mod check;

pub use check::{CapturePlan, CheckItem, PlannedMask, PlannedTable, check, plan};

/// What `init` did.
#[derive(Debug)]
pub struct InitReport {
    /// Captured tables.
    pub tables: Vec<String>,
    /// `None` when the DDL event triggers are installed, else why not.
    pub triggers_missing: Option<String>,
}

/// Creates walrelay's state, the DDL capture and the publication; re-running adds newly
/// matching tables and reinstalls the triggers.
pub async fn init(s: &Settings) -> Result<InitReport, PgError> {
    let mut c = catalog::connect(&s.postgres).await?;
    c.batch_execute(STATE_SCHEMA)
        .await
        .map_err(PgError::query("creating walrelay's state schema"))?;
    c.batch_execute(capture::FUNCTIONS)
        .await
        .map_err(PgError::query("creating walrelay's schema functions"))?;
    c.batch_execute(crate::incremental::STATE)
        .await
        .map_err(PgError::query(
            "creating walrelay's incremental-snapshot state",
        ))?;
    // The key that authenticates trigger messages: random, readable by its owner only.
    let key: [u8; 32] = rand::random();
    c.execute(
        "INSERT INTO walrelay.ddl_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&key.as_slice()],
    )
    .await
    .map_err(PgError::query("writing walrelay.ddl_key"))?;
    slot::clear(&c, "capture_rule", "publication", &s.publication).await?;
    for (schema, table) in s.tables.patterns() {
        c.execute(
            "INSERT INTO walrelay.capture_rule (publication, schema_like, table_like)              VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[
                &s.publication,
                &capture::like_pattern(schema),
                &capture::like_pattern(table),
            ],
        )
        .await
        .map_err(PgError::query("writing walrelay.capture_rule"))?;
    }
    let triggers_missing = match c.batch_execute(capture::TRIGGERS).await {
        Ok(()) => None,
        Err(e) if e.as_db_error().map(|d| d.code().code()) == Some("42501") => Some(format!(
            "DDL event triggers not installed ({}): they need a superuser; {}",
            catalog::describe(&e),
            capture::WITHOUT_TRIGGERS
        )),
        Err(e) => return Err(PgError::query("installing the DDL event triggers")(e)),
    };
    let tables: Vec<TableRef> = catalog::user_tables(&c)
        .await?
        .into_iter()
        .filter(|t| s.tables.matches(t))
        .collect();
    if tables.is_empty() {
        return Err(PgError::Catalog(
            "no table matches --tables: nothing to capture".into(),
        ));
    }
    crate::policy::check_keys(&c, &s.columns, &tables).await?;
    let filtered = crate::policy::filters_of(&s.row_filters, &tables)?;
    // walrelay's signal table rides in the publication: requests are ordered with the stream.
    let list = tables
        .iter()
        .map(TableRef::sql_name)
        .chain(std::iter::once("walrelay.snapshot_signal".to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    let exists = catalog::publication_exists(&c, &s.publication).await?;
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {} SET TABLE {list}",
            quote_ident(&s.publication)
        )
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list} WITH (publish_via_partition_root = true)",
            quote_ident(&s.publication)
        )
    };
    // The table list and the row filters change in one transaction: the stream sees the old
    // publication or the new one, never a table briefly unfiltered.
    let tx = c
        .transaction()
        .await
        .map_err(PgError::query("starting the publication's transaction"))?;
    tx.batch_execute(&sql)
        .await
        .map_err(PgError::query(format!(
            "creating publication {}",
            s.publication
        )))?;
    crate::policy::apply_row_filters(&tx, &s.publication, &s.row_filters, &filtered).await?;
    tx.commit().await.map_err(PgError::query(format!(
        "committing publication {}",
        s.publication
    )))?;
    Ok(InitReport {
        tables: tables.iter().map(TableRef::qualified).collect(),
        triggers_missing,
    })
}

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Slot name.
    pub slot: String,
    /// The slot, if it exists.
    pub slot_info: Option<slot::SlotInfo>,
    /// `pending`, `done`, or null before the first run.
    pub snapshot_status: Option<String>,
    /// Per-table snapshot progress.
    pub snapshot_tables: Vec<TableProgress>,
    /// Incremental snapshots of this slot, newest first.
    pub incremental: Vec<crate::incremental::RequestProgress>,
}

/// Snapshot progress of one table.
#[derive(Debug, Serialize)]
pub struct TableProgress {
    /// `schema.table`.
    pub table: String,
    /// Rows read.
    pub rows: i64,
    /// Chunks done / total.
    pub chunks_done: i32,
    /// Total chunks.
    pub chunks_total: i32,
    /// 0–100.
    pub percent: f64,
}

/// Reads the slot and snapshot state.
pub async fn status(s: &Settings) -> Result<Status, PgError> {
    let c = catalog::connect(&s.postgres).await?;
    let info = slot::slot_info(&c, &s.slot).await?;
    let mut snapshot_status = None;
    let mut snapshot_tables = Vec::new();
    let mut incremental = Vec::new();
    if slot::state_exists(&c).await? {
        incremental = crate::incremental::progress(&c, &s.slot).await?;
        let row = c
            .query_opt(
                "SELECT snapshot_status FROM walrelay.slot_state WHERE slot_name = $1",
                &[&s.slot],
            )
            .await
            .map_err(PgError::query("reading walrelay.slot_state"))?;
        snapshot_status = row.map(|r| r.get(0));
        for r in c
            .query(
                "SELECT schema_name || '.' || table_name, rows_done, chunks_done, chunks_total \
                 FROM walrelay.snapshot_progress WHERE slot_name = $1 ORDER BY 1",
                &[&s.slot],
            )
            .await
            .map_err(PgError::query("reading walrelay.snapshot_progress"))?
        {
            let (done, total): (i32, i32) = (r.get(2), r.get(3));
            snapshot_tables.push(TableProgress {
                table: r.get(0),
                rows: r.get(1),
                chunks_done: done,
                chunks_total: total,
                percent: if total > 0 {
                    f64::from(done) * 100.0 / f64::from(total)
                } else {
                    0.0
                },
            });
        }
    }
    Ok(Status {
        slot: s.slot.clone(),
        slot_info: info,
        snapshot_status,
        snapshot_tables,
        incremental,
    })
}

/// Why `destroy` did not run.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    /// The slot is in use.
    #[error(
        "slot {slot} is active (pid {pid:?}): stop the producer first, or pass --force to disconnect it"
    )]
    Active {
        /// Slot.
        slot: String,
        /// Holder.
        pid: Option<i32>,
    },
    /// Postgres.
    #[error(transparent)]
    Postgres(#[from] PgError),
}

/// Drops the slot, the publication and walrelay's state for this slot.
pub async fn destroy(s: &Settings, force: bool) -> Result<Vec<String>, DestroyError> {
    let c = catalog::connect(&s.postgres).await?;
    let mut done = Vec::new();
    if let Some(info) = slot::slot_info(&c, &s.slot).await? {
        if info.active {
            if !force {
                return Err(DestroyError::Active {
                    slot: s.slot.clone(),
                    pid: info.active_pid,
                });
            }
            c.execute("SELECT pg_terminate_backend($1)", &[&info.active_pid])
                .await
                .map_err(PgError::query("disconnecting the slot's holder"))?;
        }
        let mut dropped = false;
        for _ in 0..50 {
            match slot::drop_slot(&c, &s.slot).await {
                Ok(()) => {
                    dropped = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if !dropped {
            slot::drop_slot(&c, &s.slot).await?;
        }
        done.push(format!("dropped slot {}", s.slot));
    }
    c.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {}",
        quote_ident(&s.publication)
    ))
    .await
    .map_err(PgError::query("dropping the publication"))?;
    done.push(format!("dropped publication {}", s.publication));
    if slot::state_exists(&c).await? {
        slot::clear(&c, "slot_state", "slot_name", &s.slot).await?;
        slot::clear(&c, "snapshot_progress", "slot_name", &s.slot).await?;
        if schema_functions_exist(&c).await? {
            slot::clear(&c, "schema_history", "slot_name", &s.slot).await?;
            slot::clear(&c, "capture_rule", "publication", &s.publication).await?;
            let filters: bool = c
                .query_one(
                    "SELECT to_regclass('walrelay.capture_filter') IS NOT NULL",
                    &[],
                )
                .await
                .map_err(PgError::query("looking for walrelay.capture_filter"))?
                .get(0);
            if filters {
                slot::clear(&c, "capture_filter", "publication", &s.publication).await?;
            }
            if crate::incremental::installed(&c).await? {
                slot::clear(&c, "incremental_snapshot", "slot_name", &s.slot).await?;
                slot::clear(&c, "snapshot_signal", "slot_name", &s.slot).await?;
            }
        }
        let left: i64 = c
            .query_one("SELECT count(*) FROM walrelay.slot_state", &[])
            .await
            .map_err(PgError::query("reading walrelay.slot_state"))?
            .get(0);
        if left == 0 {
            let triggers: bool = c
                .query_one(capture::TRIGGERS_ACTIVE, &[])
                .await
                .map_err(PgError::query("reading pg_event_trigger"))?
                .get(0);
            if triggers {
                c.batch_execute(capture::REMOVE_TRIGGERS)
                    .await
                    .map_err(PgError::query("removing the DDL event triggers"))?;
                done.push("removed the DDL event triggers".into());
            }
            c.batch_execute("DROP SCHEMA walrelay CASCADE")
                .await
                .map_err(PgError::query("dropping schema walrelay"))?;
            done.push("dropped schema walrelay".into());
        } else {
            done.push(format!(
                "removed slot {} from walrelay's state ({left} other slot(s) remain)",
                s.slot
            ));
        }
    }
    Ok(done)
}

/// Whether `init` of this version ran (the schema functions and history exist).
pub async fn schema_functions_exist(c: &Client) -> Result<bool, PgError> {
    Ok(c.query_one(
        "SELECT to_regclass('walrelay.schema_history') IS NOT NULL \
                AND to_regprocedure('walrelay.table_schema(oid)') IS NOT NULL",
        &[],
    )
    .await
    .map_err(PgError::query("looking for walrelay.table_schema"))?
    .get(0))
}
