//! The listener's half of incremental snapshots (the design is in [`crate::incremental`]):
//! watermark messages open and close a chunk's window; at the high watermark the chunk's rows
//! whose key the stream did not change inside the window go out as `op: "r"`, inside the
//! watermark's transaction, so the checkpointer confirms it only once Kafka acknowledged them.

use pgwire_replication::Lsn;
use walrelay_common::event::Op;

use super::{Stream, open, shape_of};
use crate::catalog::{Catalog, PgError};
use crate::ddl;
use crate::emit::RowChange;
use crate::encode::{EventMeta, Image};
use crate::error::RunError;
use crate::incremental::{Closed, Key, Outcome, Watermark, published_columns};
use crate::replication::pgoutput::{self, Cell};

impl Stream<'_> {
    /// A message in the watermark channel: verified like the DDL channel (HMAC with the xid),
    /// then applied when it is this session's; anything else is counted and skipped.
    pub(super) async fn watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<(), RunError> {
        let Some(hub) = self.io.incremental.clone() else {
            return Ok(());
        };
        let xid = self.txn.as_ref().map_or(0, |t| t.xid);
        let mark: Watermark = match ddl::verify_channel(content, xid, self.io.ddl_key.as_deref()) {
            Ok(m) => m,
            Err(why) => {
                self.io
                    .metrics
                    .errors
                    .with_label_values(&["watermark_rejected"])
                    .inc();
                tracing::warn!(%lsn, xid, reason = %why, "Skipped a message in walrelay's watermark channel: {why}.");
                return Ok(());
            }
        };
        // A watermark of an earlier session (replayed after a restart) has no window here.
        if !hub.owns(&mark) {
            return Ok(());
        }
        match mark.mark.as_str() {
            "low" => hub.low(mark.chunk),
            "high" => {
                if let Some(closed) = hub.high(mark.chunk) {
                    self.emit_chunk(closed, lsn.as_u64()).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn emit_chunk(&mut self, closed: Closed, lsn: u64) -> Result<(), RunError> {
        let Closed {
            oid,
            changed,
            truncated,
            spoiled,
            rows,
            reply,
        } = closed;
        let Some(reply) = reply else {
            return Ok(());
        };
        let retry = |reply: tokio::sync::oneshot::Sender<Outcome>, why: String| {
            let _ = reply.send(Outcome::Retry(why));
            Ok(())
        };
        if let Some(why) = spoiled {
            return retry(reply, why);
        }
        let Some(chunk) = rows else {
            return retry(
                reply,
                "the chunk was not read before its high watermark".into(),
            );
        };
        if !self.relations.contains_key(&oid) && !self.load_relation(oid).await? {
            return retry(reply, "the table is gone".into());
        }
        // The chunk's columns in the order of the stream's Relation.
        let perm: Option<Vec<usize>> = self.relations.get(&oid).and_then(|rel| {
            if rel.columns.len() != chunk.columns.len() {
                return None;
            }
            rel.columns
                .iter()
                .map(|(name, _)| chunk.columns.iter().position(|c| c == name))
                .collect()
        });
        let Some(perm) = perm else {
            return retry(
                reply,
                "the table's columns changed while the chunk was read".into(),
            );
        };
        self.settle(oid, lsn).await?;
        let Self {
            io,
            relations,
            txn,
            pushed,
            chunk_acks,
            ..
        } = self;
        let t = open(txn)?;
        let shape = shape_of(relations, oid)?;
        let meta = EventMeta {
            op: Op::Read,
            lsn,
            commit_lsn: t.commit_lsn,
            txid: u64::from(t.xid),
            ts_ms: t.ts_ms,
            snapshot: true,
            incremental: true,
            seq: 0,
            transaction: None,
        };
        let (emitter, mut on_wait) = io.emitter_and_progress(pushed);
        let (mut emitted, mut dropped) = (0u64, 0u64);
        for row in &chunk.rows {
            if truncated {
                dropped += 1;
                continue;
            }
            let cells: Vec<Cell<'_>> = perm
                .iter()
                .map(|&i| {
                    row.get(i)
                        .and_then(|v| v.as_deref())
                        .map_or(Cell::Null, Cell::Text)
                })
                .collect();
            let key: Key = shape
                .key_columns
                .iter()
                .map(|&i| match cells.get(i) {
                    Some(Cell::Text(v)) => Some(v.to_vec()),
                    _ => None,
                })
                .collect();
            if changed.contains(&key) {
                dropped += 1;
                continue;
            }
            let change = RowChange {
                before: None,
                after: Some(Image::full(&cells)),
                key_row: &cells,
            };
            t.sent += emitter
                .row(shape, &meta, &change, t.id, &mut on_wait)
                .await?;
            emitted += 1;
        }
        tracing::debug!(table = %shape.qualified(), rows = emitted, dropped, lsn = %Lsn::from_u64(lsn),
            "Incremental snapshot: chunk emitted at its high watermark.");
        chunk_acks.push((reply, emitted, dropped));
        Ok(())
    }

    /// Describes a table the stream has not sent a Relation message for yet, from the
    /// catalog, as pgoutput would (published columns in attnum order, identity flags).
    /// `false` when the table no longer exists.
    async fn load_relation(&mut self, oid: u32) -> Result<bool, RunError> {
        let client = self.io.catalog.client();
        let Some(row) = client
            .query_opt(
                "SELECT n.nspname::text, c.relname::text, c.relreplident::text FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                &[&oid],
            )
            .await
            .map_err(PgError::query(format!("reading relation {oid}")))?
        else {
            return Ok(false);
        };
        let (namespace, name, identity): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let columns = published_columns(client, oid).await?;
        let keys = Catalog::new(client).key_columns(oid).await?;
        let described: Vec<pgoutput::Column<'_>> = columns
            .iter()
            .map(|(col, type_oid, typmod, _)| pgoutput::Column {
                is_key: identity == "f" || keys.contains(col),
                name: col,
                type_oid: *type_oid,
                type_modifier: *typmod,
            })
            .collect();
        self.relation(oid, &namespace, &name, &described).await?;
        Ok(true)
    }
}
