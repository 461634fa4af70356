//! The slot, the publication, and walrelay's state in `walrelay.*`.

use tokio_postgres::Client;

use crate::catalog::PgError;

/// The statements `init` runs to create walrelay's state (idempotent).
pub const STATE_SCHEMA: &str = "
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS walrelay;
CREATE TABLE IF NOT EXISTS walrelay.slot_state (
    slot_name text PRIMARY KEY,
    publication text NOT NULL,
    snapshot_status text NOT NULL CHECK (snapshot_status IN ('pending', 'done')),
    consistent_lsn pg_lsn,
    snapshot_started_at timestamptz,
    snapshot_finished_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS walrelay.snapshot_progress (
    slot_name text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    rows_done bigint NOT NULL DEFAULT 0,
    chunks_total integer NOT NULL,
    chunks_done integer NOT NULL DEFAULT 0,
    PRIMARY KEY (slot_name, schema_name, table_name)
);";

/// Parses `X/Y`.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some(u64::from_str_radix(hi, 16).ok()? << 32 | u64::from_str_radix(lo, 16).ok()?)
}

/// Formats `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// What `pg_replication_slots` says of a slot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    /// Held by a connection.
    pub active: bool,
    /// PID of the holder.
    pub active_pid: Option<i32>,
    /// Confirmed position.
    pub confirmed_flush_lsn: Option<String>,
    /// Oldest WAL kept.
    pub restart_lsn: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Current WAL position minus restart_lsn.
    pub retained_wal_bytes: Option<i64>,
    /// Current WAL position minus confirmed_flush_lsn.
    pub lag_bytes: Option<i64>,
    /// WAL that can still be written before the slot is lost (`safe_wal_size`; null when
    /// `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_bytes: Option<i64>,
    /// Output plugin.
    pub plugin: Option<String>,
}

/// Reads the slot, if it exists.
pub async fn slot_info(client: &Client, slot: &str) -> Result<Option<SlotInfo>, PgError> {
    let row = client
        .query_opt(
            "SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, wal_status, \
                    (pg_current_wal_lsn() - restart_lsn)::int8, \
                    (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, plugin::text, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query(format!("reading slot {slot}")))?;
    Ok(row.map(|r| SlotInfo {
        active: r.get(0),
        active_pid: r.get(1),
        confirmed_flush_lsn: r.get(2),
        restart_lsn: r.get(3),
        wal_status: r.get(4),
        retained_wal_bytes: r.get(5),
        lag_bytes: r.get(6),
        plugin: r.get(7),
        safe_wal_bytes: r.get(8),
    }))
}

/// Snapshot status of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStatus {
    /// Created; its snapshot has not completed.
    Pending,
    /// Snapshot complete (or skipped): safe to stream.
    Done,
}

/// walrelay's record of a slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Snapshot status.
    pub status: SnapshotStatus,
    /// Consistent point of the slot's snapshot.
    pub consistent_lsn: Option<u64>,
    /// When the snapshot began, ms since the epoch.
    pub snapshot_started_ms: Option<i64>,
}

/// Whether `init` has created walrelay's state.
pub async fn state_exists(client: &Client) -> Result<bool, PgError> {
    let row = client
        .query_one("SELECT to_regclass('walrelay.slot_state') IS NOT NULL", &[])
        .await
        .map_err(PgError::query("looking for walrelay.slot_state"))?;
    Ok(row.get(0))
}

/// Reads walrelay's record of `slot`.
pub async fn read_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT snapshot_status, consistent_lsn::text, \
                    (extract(epoch FROM snapshot_started_at) * 1000)::int8 \
             FROM walrelay.slot_state WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query("reading walrelay.slot_state"))?;
    Ok(row.map(|r| SlotState {
        status: if r.get::<_, String>(0) == "done" {
            SnapshotStatus::Done
        } else {
            SnapshotStatus::Pending
        },
        consistent_lsn: r.get::<_, Option<String>>(1).as_deref().and_then(parse_lsn),
        snapshot_started_ms: r.get(2),
    }))
}

/// Records that `slot` is about to be created and its snapshot has not completed.
pub async fn mark_pending(client: &Client, slot: &str, publication: &str) -> Result<(), PgError> {
    client
        .execute(
            "INSERT INTO walrelay.slot_state (slot_name, publication, snapshot_status) \
             VALUES ($1, $2, 'pending') \
             ON CONFLICT (slot_name) DO UPDATE SET publication = $2, snapshot_status = 'pending', \
               consistent_lsn = NULL, snapshot_started_at = NULL, snapshot_finished_at = NULL, updated_at = now()",
            &[&slot, &publication],
        )
        .await
        .map_err(PgError::query("writing walrelay.slot_state"))?;
    clear(client, "snapshot_progress", "slot_name", slot).await?;
    clear(client, "schema_history", "slot_name", slot).await
}

/// Deletes the rows of walrelay's state table `table` whose `column` is `value` (both names are
/// walrelay's own, never input).
pub async fn clear(
    client: &Client,
    table: &'static str,
    column: &'static str,
    value: &str,
) -> Result<(), PgError> {
    client
        .execute(
            &format!("DELETE FROM walrelay.{table} WHERE {column} = $1"),
            &[&value],
        )
        .await
        .map_err(PgError::query(format!("clearing walrelay.{table}")))?;
    Ok(())
}

/// Records the slot's consistent point and snapshot start time.
pub async fn mark_created(
    client: &Client,
    slot: &str,
    consistent_lsn: u64,
    started_ms: i64,
) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.slot_state SET consistent_lsn = $2::text::pg_lsn, \
               snapshot_started_at = to_timestamp($3::float8 / 1000), updated_at = now() \
             WHERE slot_name = $1",
            &[&slot, &format_lsn(consistent_lsn), &(started_ms as f64)],
        )
        .await
        .map_err(PgError::query("writing walrelay.slot_state"))?;
    Ok(())
}

/// Records that the snapshot is complete: every snapshot event is acknowledged by Kafka.
pub async fn mark_done(client: &Client, slot: &str) -> Result<(), PgError> {
    client
        .execute(
            "UPDATE walrelay.slot_state SET snapshot_status = 'done', snapshot_finished_at = now(), \
               updated_at = now() WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PgError::query("writing walrelay.slot_state"))?;
    Ok(())
}

/// Drops the slot (it must be inactive).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), PgError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(PgError::query(format!("dropping slot {slot}")))?;
    Ok(())
}

/// Moves the slot's confirmed position to `lsn` if it is behind; used at shutdown, after the
/// replication connection closed, because its last status update can be lost.
pub async fn advance_slot(client: &Client, slot: &str, lsn: u64) -> Result<bool, PgError> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn < $2::text::pg_lsn AND NOT active \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &format_lsn(lsn)],
        )
        .await
        .map_err(PgError::query(format!("reading slot {slot}")))?;
    if !row.get::<_, Option<bool>>(0).unwrap_or(false) {
        return Ok(false);
    }
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot, &format_lsn(lsn)],
        )
        .await
        .map_err(PgError::query(format!("advancing slot {slot}")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("zz"), None);
    }
}
