//! How the stream follows schema changes (see `crate::ddl` for the whole design).
//!
//! - A **Relation message** describes a table's columns: its shape is tagged with the
//!   registry's schema version when they agree; otherwise the schema changed without a trigger
//!   message (or the table is new) and the schema it shows waits for the table's next change,
//!   whose LSN becomes its version (`settle`).
//! - A **trigger message** in walrelay's DDL channel is verified (HMAC, xid), then applied:
//!   the registry records the new schema and a schema event goes to every partition, inside
//!   the transaction that made the change. A forged or malformed message is counted and
//!   skipped: an unprivileged role can write logical messages.

use std::time::Duration;

use pgwire_replication::Lsn;
use walrelay_common::event::Op;

use super::{Relation, Stream, meta, open};
use crate::config::DdlStatement;
use crate::ddl::{self, Origin, TableSchema, TriggerMessage};
use crate::error::RunError;
use crate::metrics::Metrics;

/// Rejected DDL-channel messages: the first is logged in full, later ones once a minute.
pub(super) struct Rejections {
    pub(super) last_log: Option<std::time::Instant>,
    pub(super) since_log: u64,
}

impl Rejections {
    pub(super) fn record(
        &mut self,
        metrics: &Metrics,
        lsn: Lsn,
        xid: u32,
        why: &ddl::ChannelError,
    ) {
        metrics.errors.with_label_values(&["ddl_rejected"]).inc();
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                %lsn,
                xid,
                rejected = self.since_log,
                reason = %why,
                "Skipped a message in walrelay's DDL channel: {why}. Only walrelay's event triggers can write schema events; see walrelay_producer_errors_total{{kind=\"ddl_rejected\"}}."
            );
            self.last_log = Some(std::time::Instant::now());
            self.since_log = 0;
        }
    }
}

impl Stream<'_> {
    /// A message in walrelay's DDL channel: verified, then applied; a forged or malformed
    /// one is counted and skipped (an unprivileged role can write logical messages).
    pub(super) async fn ddl_message(&mut self, content: &[u8], lsn: Lsn) -> Result<(), RunError> {
        let xid = self.txn.as_ref().map_or(0, |t| t.xid);
        let message: TriggerMessage =
            match ddl::verify_message(content, xid, self.io.ddl_key.as_deref()) {
                Ok(mut m) => {
                    m.sql = match self.io.ddl_statement {
                        DdlStatement::Include => m.sql,
                        // The query held other statements too (maybe of tables not
                        // captured): none of its text is carried.
                        DdlStatement::Redact if ddl::has_several_statements(&m.sql) => {
                            String::new()
                        }
                        DdlStatement::Redact => ddl::redact_statement(&m.sql),
                        DdlStatement::Omit => String::new(),
                    };
                    m
                }
                Err(why) => {
                    self.rejections.record(self.io.metrics, lsn, xid, &why);
                    return Ok(());
                }
            };
        self.apply_ddl(&message, lsn.as_u64()).await
    }

    /// Tags a Relation's shape with the registry's schema when they agree; otherwise the schema
    /// changed without a trigger message (or the table is new to walrelay): the schema the
    /// Relation shows waits for the table's next change ([`Self::settle`]).
    pub(super) async fn tag_relation(
        &mut self,
        oid: u32,
        rel: &mut Relation,
    ) -> Result<(), RunError> {
        if let Some(v) = self.io.registry.get(oid)
            && v.schema.matches(&rel.namespace, &rel.name, &rel.columns)
        {
            let ids = v.schema.ids_of(rel.columns.iter().map(|(n, _)| n.as_str()));
            rel.shape.set_schema(v.version, ids);
            return Ok(());
        }
        let current = ddl::read_schema(self.io.catalog.client(), oid).await?;
        rel.pending = Some(TableSchema::from_relation(
            oid,
            &rel.namespace,
            &rel.name,
            &rel.columns,
            current.as_ref(),
        ));
        Ok(())
    }

    /// Before a change of `oid`: emits the schema event of a pending (fallback) schema, with
    /// the change's LSN as its version (a Relation message has no LSN of its own; the first
    /// change under a schema is the same on every replay).
    pub(super) async fn settle(&mut self, oid: u32, lsn: u64) -> Result<(), RunError> {
        let Some(schema) = self.relations.get_mut(&oid).and_then(|r| r.pending.take()) else {
            return Ok(());
        };
        let commit_lsn = open(&mut self.txn)?.commit_lsn;
        let before = self.io.registry.get(oid).map(|v| v.schema.clone());
        let origin = Origin {
            kind: "relation",
            message: None,
            before: before.as_ref(),
        };
        let ctl = self.io.catalog.client();
        let event = ddl::schema_event(&mut self.io.catalog, &schema, lsn, origin, false).await?;
        self.io
            .registry
            .record(ctl, lsn, commit_lsn, schema, false)
            .await?;
        if before.is_some() {
            tracing::info!(table = %event.shape.qualified(), "A schema change without a trigger message: derived from the Relation message.");
        }
        self.send_schema(&event, lsn).await?;
        if let Some(rel) = self.relations.get_mut(&oid) {
            rel.shape.set_schema(lsn, event.shape.column_ids.clone());
        }
        Ok(())
    }

    /// Applies a trigger message: records the table's new schema and emits its schema event.
    async fn apply_ddl(&mut self, message: &TriggerMessage, lsn: u64) -> Result<(), RunError> {
        let commit_lsn = open(&mut self.txn)?.commit_lsn;
        let oid = message.table.table_oid;
        let before = self.io.registry.get(oid).map(|v| v.schema.clone());
        let captured = if message.dropped {
            before.is_some()
        } else {
            message.publications.contains(&self.io.publication)
        };
        if !captured || (!message.dropped && before.as_ref() == Some(&message.table)) {
            // Another publication's table, or nothing a consumer sees changed (an index, a
            // comment, a partition attached).
            return Ok(());
        }
        let schema = match (&before, message.dropped) {
            // A drop carries only names: keep the last columns for the event.
            (Some(b), true) => TableSchema {
                columns: Vec::new(),
                ..b.clone()
            },
            _ => message.table.clone(),
        };
        let origin = Origin {
            kind: "trigger",
            message: Some(message),
            before: before.as_ref(),
        };
        let ctl = self.io.catalog.client();
        let event =
            ddl::schema_event(&mut self.io.catalog, &schema, lsn, origin, message.dropped).await?;
        self.io
            .registry
            .record(ctl, lsn, commit_lsn, schema.clone(), message.dropped)
            .await?;
        self.send_schema(&event, lsn).await?;
        if message.dropped {
            self.relations.remove(&oid);
        } else if let Some(rel) = self.relations.get_mut(&oid)
            && schema.matches(&rel.namespace, &rel.name, &rel.columns)
        {
            // Columns unchanged for pgoutput (a rename of the table arrives with a new
            // Relation anyway): later rows carry the new version even without one.
            let ids = schema.ids_of(rel.columns.iter().map(|(n, _)| n.as_str()));
            rel.shape.set_schema(lsn, ids);
            rel.pending = None;
        }
        Ok(())
    }

    /// A schema event, to every partition, as part of the open transaction.
    async fn send_schema(&mut self, event: &ddl::SchemaEvent, lsn: u64) -> Result<(), RunError> {
        let Self {
            io, txn, pushed, ..
        } = self;
        let t = open(txn)?;
        t.seq += 1;
        let meta = meta(t, Op::Ddl, lsn);
        t.sent += {
            let (emitter, mut on_wait) = io.emitter_and_progress(pushed);
            emitter
                .schema(&event.shape, &event.change, &meta, t.id, &mut on_wait)
                .await?
        };
        io.metrics
            .schema_events
            .with_label_values(&[&event.change.origin])
            .inc();
        Ok(())
    }
}
