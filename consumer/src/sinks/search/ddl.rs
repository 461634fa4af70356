//! Schema events applied to a table's index: added columns mapped, renamed ones aliased, a
//! renamed table's alias moved, a dropped table's index deleted (the column-to-field rules are
//! in [`super::schema`]).

use serde_json::json;
use tokio_util::sync::CancellationToken;
use walrelay_common::event::Envelope;
use walrelay_common::sync::lock;

use super::config::OnDropTable;
use super::encode::{alias_name, versioned};
use super::schema::FieldMap;
use super::sink::{Mode, SearchSink};
use crate::runtime::{SinkError, Verdict};

impl SearchSink {
    /// Applies a schema event: maps added columns, aliases renamed ones, moves the alias of a
    /// renamed table, deletes a dropped table's index (see [`schema`]).
    pub(super) async fn apply_schema(
        &mut self,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Verdict, SinkError> {
        let Some(ddl) = env.ddl.as_ref() else {
            return Ok(Verdict::Rejected(
                "a schema event (op ddl) without its ddl body".into(),
            ));
        };
        let outcome =
            |this: &Self, o: &str| this.metrics.schema_events.with_label_values(&[o]).inc();
        if ddl.dropped {
            let v = self.drop_table(env, shutdown).await?;
            return Ok(v);
        }
        if let Some(prev) = &ddl.previous
            && self.rename_table(env, prev, shutdown).await?
        {
            outcome(self, "renamed");
        }
        let mut alias = match self.open(env, shutdown).await? {
            Ok(a) => a,
            Err(why) => return Ok(Verdict::Rejected(why)),
        };
        if self
            .tables
            .get(&alias)
            .is_some_and(|t| t.columns.table_oid != 0 && t.columns.table_oid != ddl.table_oid)
        {
            if let Mode::Build { .. } = self.mode {
                // A build names its indexes after the tables: two tables under one name in
                // the topic's history cannot both be rebuilt. Stop rather than mix them.
                return Err(SinkError::Definite(format!(
                    "the topic's history has two tables under the name behind {alias} (a table renamed or dropped, then another created with its name, OID {}): a re-index cannot rebuild both into one index version; keep the current indexes, or re-index after the old table's events have left the topic",
                    ddl.table_oid
                )));
            }
            // The name belonged to another table (dropped or renamed away): this one gets an
            // index of its own.
            self.tables.remove(&alias);
            alias = match self.open(env, shutdown).await? {
                Ok(a) => a,
                Err(why) => return Ok(Verdict::Rejected(why)),
            };
        }
        let Some(t) = self.tables.get(&alias) else {
            return Ok(Verdict::Rejected(format!("index for {alias} missing")));
        };
        if env.schema_version <= t.columns.schema_version {
            // Another partition's copy, or a replay: already applied.
            outcome(self, "stale");
            return Ok(Verdict::Stale);
        }
        let plan = t
            .columns
            .plan(ddl.table_oid, &ddl.columns, env.schema_version, &t.mapped);
        let target = t.target.clone();
        for c in &plan.conflicts {
            tracing::error!(index = %target, kind = c.kind, "{}", c.message);
            self.metrics
                .schema_conflicts
                .with_label_values(&[c.kind])
                .inc();
        }
        let meta = plan.next.to_meta();
        let client = self.client.clone();
        let props = plan.properties.clone();
        match self
            .retrying(shutdown, || {
                client.put_mapping(&target, props.clone(), Some(&meta))
            })
            .await
        {
            Ok(()) => {}
            Err(SinkError::Definite(why)) => {
                self.metrics
                    .schema_conflicts
                    .with_label_values(&["mapping_refused"])
                    .inc();
                return Ok(Verdict::Rejected(format!(
                    "the index refused the mapping of schema version {}: {why}",
                    env.schema_version
                )));
            }
            Err(e) => return Err(e),
        }
        tracing::info!(index = %target, version = env.schema_version, added = ?plan.properties.keys().collect::<Vec<_>>(),
            command = ddl.command.as_deref().unwrap_or(""), "Applied a schema event.");
        if let Some(t) = self.tables.get_mut(&alias) {
            t.mapped.extend(plan.properties);
            t.columns = plan.next;
            t.renames.clear();
            t.checked_types.clear();
        }
        outcome(self, "applied");
        Ok(Verdict::Applied)
    }

    /// Moves a renamed table's alias (live) or build index (build) to its new name; whether
    /// anything moved.
    async fn rename_table(
        &mut self,
        env: &Envelope,
        previous: &walrelay_common::event::TableName,
        shutdown: &CancellationToken,
    ) -> Result<bool, SinkError> {
        let Ok(new_alias) = alias_name(&self.settings.index_template, env) else {
            return Ok(false);
        };
        let mut old_env = env.clone();
        old_env.source.schema.clone_from(&previous.schema);
        old_env.source.table.clone_from(&previous.table);
        let Ok(old_alias) = alias_name(&self.settings.index_template, &old_env) else {
            return Ok(false);
        };
        if old_alias == new_alias {
            return Ok(false);
        }
        let moved = match self.mode {
            Mode::Live => {
                let client = self.client.clone();
                let new_targets = self
                    .retrying(shutdown, || client.alias_targets(&new_alias))
                    .await?;
                let old_targets = self
                    .retrying(shutdown, || client.alias_targets(&old_alias))
                    .await?;
                match (new_targets, old_targets) {
                    (None, Some(old)) => {
                        let mut actions = Vec::new();
                        for index in &old {
                            actions.push(json!({"remove": {"index": index, "alias": old_alias}}));
                            actions.push(json!({"add": {"index": index, "alias": new_alias}}));
                        }
                        self.retrying(shutdown, || client.update_aliases(actions.clone()))
                            .await?;
                        tracing::info!(from = %old_alias, to = %new_alias, indexes = ?old, "Table renamed: moved its alias.");
                        true
                    }
                    _ => false,
                }
            }
            Mode::Build { .. } => self.tables.contains_key(&old_alias),
        };
        if let Some(mut t) = self.tables.remove(&old_alias) {
            if self.mode == Mode::Live {
                t.target.clone_from(&new_alias);
            }
            let mut seen = lock(&self.seen);
            seen.remove(&old_alias);
            seen.insert(new_alias.clone(), t.target.clone());
            drop(seen);
            self.tables.insert(new_alias, t);
        }
        Ok(moved)
    }

    /// A dropped table: deletes its index unless `--on-drop-table keep`, and only when the
    /// index is not newer than the drop (a copy of the drop read after the table was created
    /// again must not delete the new index).
    async fn drop_table(
        &mut self,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Verdict, SinkError> {
        let alias = match alias_name(&self.settings.index_template, env) {
            Ok(a) => a,
            Err(why) => return Ok(Verdict::Rejected(why)),
        };
        if self.settings.on_drop_table == OnDropTable::Keep {
            self.metrics
                .schema_events
                .with_label_values(&["kept"])
                .inc();
            tracing::info!(%alias, "Table dropped; its index is kept (--on-drop-table keep).");
            return Ok(Verdict::Applied);
        }
        let name = match self.mode {
            Mode::Live => alias.clone(),
            Mode::Build { generation } => versioned(&alias, generation),
        };
        let client = self.client.clone();
        let Some(mapping) = self.retrying(shutdown, || client.mapping(&name)).await? else {
            self.metrics
                .schema_events
                .with_label_values(&["stale"])
                .inc();
            return Ok(Verdict::Stale);
        };
        if FieldMap::from_meta(&mapping.meta).schema_version > env.schema_version {
            self.metrics
                .schema_events
                .with_label_values(&["stale"])
                .inc();
            return Ok(Verdict::Stale);
        }
        let index = mapping.index;
        self.retrying(shutdown, || client.delete_index(&index))
            .await?;
        self.tables.remove(&alias);
        lock(&self.seen).remove(&alias);
        self.metrics
            .schema_events
            .with_label_values(&["dropped"])
            .inc();
        tracing::info!(%alias, %index, "Table dropped: deleted its index (--on-drop-table delete).");
        Ok(Verdict::Applied)
    }
}
