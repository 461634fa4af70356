//! The index behind each table: opened (or created) on a table's first event, its mapping
//! extended when new columns appear. Schema events change it in [`super::ddl`].

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::Envelope;
use walrelay_common::sync::lock;

use super::client::Created;
use super::encode::{alias_name, generation_of, missing_fields, versioned};
use super::schema::FieldMap;
use super::sink::{Mode, SearchSink};
use super::table::TableIndex;
use crate::runtime::SinkError;

impl SearchSink {
    /// The alias of `env`'s table, opening (or creating) its index on first use.
    pub(super) async fn open(
        &mut self,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Result<String, String>, SinkError> {
        let cached = self
            .aliases
            .get(&env.source.schema)
            .and_then(|t| t.get(&env.source.table));
        let alias = match cached {
            Some(a) => a.clone(),
            None => {
                let a = match alias_name(&self.settings.index_template, env) {
                    Ok(a) => a,
                    Err(why) => return Ok(Err(why)),
                };
                self.aliases
                    .entry(env.source.schema.clone())
                    .or_default()
                    .insert(env.source.table.clone(), a.clone());
                a
            }
        };
        if !self.tables.contains_key(&alias) {
            let t = self.open_table(&alias, env, shutdown).await?;
            lock(&self.seen).insert(alias.clone(), t.target.clone());
            self.tables.insert(alias.clone(), t);
        }
        Ok(Ok(alias))
    }

    /// Makes sure the table's index exists and maps every column of `env`; returns its target
    /// and the renames its rows need.
    pub(super) async fn table(
        &mut self,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Result<(String, Option<Arc<HashMap<String, String>>>), String>, SinkError> {
        let alias = match self.open(env, shutdown).await? {
            Ok(a) => a,
            Err(why) => return Ok(Err(why)),
        };
        let Some(t) = self.tables.get_mut(&alias) else {
            return Ok(Err(format!("index for {alias} missing")));
        };
        let renames = t.renames_for(env);
        // The same `types` text as last time: nothing new to map.
        let missing = if t.checked_types == env.types.raw() {
            Map::new()
        } else {
            let mut types = env.types.parse();
            if let Some(r) = &renames {
                types = types
                    .into_iter()
                    .map(|(k, v)| (r.get(&k).cloned().unwrap_or(k), v))
                    .collect();
            }
            missing_fields(&types, &t.mapped)
        };
        if !missing.is_empty() {
            let target = t.target.clone();
            let client = self.client.clone();
            let put = self
                .retrying(shutdown, || {
                    client.put_mapping(&target, missing.clone(), None)
                })
                .await;
            match put {
                Ok(()) => {
                    tracing::info!(index = %target, fields = ?missing.keys().collect::<Vec<_>>(), "Mapped new fields.");
                }
                Err(SinkError::Definite(why)) => {
                    // A type the mapping cannot take: documents carrying it are rejected
                    // item by item; the rest keeps flowing.
                    tracing::error!(index = %target, error = %why, "Could not map new fields; a re-index into a new version can change their type.");
                    self.metrics
                        .sink_errors
                        .with_label_values(&["search", "mapping"])
                        .inc();
                }
                Err(e) => return Err(e),
            }
            if let Some(t) = self.tables.get_mut(&alias) {
                t.mapped.extend(missing);
            }
        }
        let Some(t) = self.tables.get_mut(&alias) else {
            return Ok(Err(format!("index for {alias} missing")));
        };
        if t.checked_types != env.types.raw() {
            t.checked_types = env.types.raw().to_string();
        }
        Ok(Ok((t.target.clone(), renames)))
    }

    /// Opens a table's index: the one its alias points at (live) or the build's version of it
    /// (build), creating it with mappings from `env` when missing.
    async fn open_table(
        &self,
        alias: &str,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<TableIndex, SinkError> {
        let mappings = missing_fields(&env.types.parse(), &Map::new());
        match self.mode {
            Mode::Live => self.open_live(alias, env, mappings, shutdown).await,
            Mode::Build { generation } => {
                self.open_build(alias, generation, mappings, shutdown).await
            }
        }
    }

    /// Live: the index behind `alias`; when there is none, an index a renamed table took
    /// along, else a new index version with the alias.
    async fn open_live(
        &self,
        alias: &str,
        env: &Envelope,
        mappings: Map<String, Value>,
        shutdown: &CancellationToken,
    ) -> Result<TableIndex, SinkError> {
        let client = self.client.clone();
        loop {
            let targets = self
                .retrying(shutdown, || client.alias_targets(alias))
                .await?;
            match targets.as_deref() {
                Some([_]) => {
                    let (props, columns) = self
                        .retrying(shutdown, || client.mapping(alias))
                        .await?
                        .map(|m| (m.properties, FieldMap::from_meta(&m.meta)))
                        .unwrap_or_default();
                    return Ok(TableIndex::new(alias.to_string(), props, columns));
                }
                Some(many) => {
                    return Err(SinkError::Definite(format!(
                        "alias {alias} points at {} indexes ({}); point it at one with POST /_aliases",
                        many.len(),
                        many.join(", ")
                    )));
                }
                None => {}
            }
            if let Some((index, _)) = self.retrying(shutdown, || client.properties(alias)).await? {
                return Err(SinkError::Definite(format!(
                    "{index} is an index, not an alias; walrelay writes through the alias {alias} -> {alias}-v<N>: reindex it into {alias}-v1 and make {alias} an alias, or choose another --index-template"
                )));
            }
            let next = match self.taken_along(alias, env, shutdown).await? {
                Ok(t) => return Ok(t),
                Err(next) => next,
            };
            let index = versioned(alias, next);
            let body = json!({
                "mappings": {"properties": mappings},
                "aliases": {alias: {}}
            });
            let created = self
                .retrying(shutdown, || client.create_index(&index, &body))
                .await?;
            if created == Created::New {
                tracing::info!(%index, %alias, "Created the index and its alias.");
                return Ok(TableIndex::new(
                    alias.to_string(),
                    mappings,
                    FieldMap::default(),
                ));
            }
            // It existed without the alias (a crash between the two, or a race with
            // another process): attach the alias if it is still missing, then look again.
            if self
                .retrying(shutdown, || client.alias_targets(alias))
                .await?
                .is_none()
            {
                let actions = vec![json!({"add": {"index": index, "alias": alias}})];
                self.retrying(shutdown, || client.update_aliases(actions.clone()))
                    .await?;
            }
        }
    }

    /// An index of this name another alias holds was taken along by a renamed table: rows
    /// and schema events of that table still under the old name (a partition that had not
    /// reached the rename yet) go there without bringing the old alias back; a new table under
    /// the old name (another OID) gets an index version of its own: `Err` with the next free
    /// generation.
    async fn taken_along(
        &self,
        alias: &str,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<Result<TableIndex, u32>, SinkError> {
        let client = self.client.clone();
        let held: Vec<(u32, String)> = self
            .retrying(shutdown, || client.all_aliases())
            .await?
            .into_iter()
            .filter_map(|(index, _)| generation_of(alias, &index).map(|g| (g, index)))
            .collect();
        let newest = held.iter().max().cloned();
        if let Some((_, index)) = &newest
            && let Some(m) = self.retrying(shutdown, || client.mapping(index)).await?
            && env
                .ddl
                .as_ref()
                .is_none_or(|d| FieldMap::from_meta(&m.meta).table_oid == d.table_oid)
        {
            tracing::info!(%alias, %index, "Rows under a renamed table's old name: writing them to the index it took along.");
            return Ok(Ok(TableIndex::new(
                index.clone(),
                m.properties,
                FieldMap::from_meta(&m.meta),
            )));
        }
        Ok(Err(newest.map_or(1, |(g, _)| g + 1)))
    }

    /// Build: `<alias>-v<generation>`, created when missing and seeded with the live index's
    /// current columns.
    async fn open_build(
        &self,
        alias: &str,
        generation: u32,
        mappings: Map<String, Value>,
        shutdown: &CancellationToken,
    ) -> Result<TableIndex, SinkError> {
        let client = self.client.clone();
        let index = versioned(alias, generation);
        if let Some(m) = self.retrying(shutdown, || client.mapping(&index)).await? {
            let columns = FieldMap::from_meta(&m.meta);
            return Ok(TableIndex::new(index, m.properties, columns));
        }
        // Seed the build with the live index's current columns: current names as
        // fields, current types, no aliases (see `schema`).
        let live = self
            .retrying(shutdown, || client.mapping(alias))
            .await?
            .map(|m| FieldMap::from_meta(&m.meta))
            .unwrap_or_default();
        let (columns, mappings) = if live.current.is_empty() {
            (FieldMap::default(), mappings)
        } else {
            let (seed, mut props) = FieldMap::seed(&live);
            props.extend(missing_fields(&Map::new(), &props));
            (seed, props)
        };
        let body = json!({"mappings": {"properties": mappings, "_meta": columns.to_meta()}});
        self.retrying(shutdown, || client.create_index(&index, &body))
            .await?;
        tracing::info!(%index, seeded_columns = columns.fields.len(), "Created a new index version to build.");
        Ok(TableIndex::new(index, mappings, columns))
    }
}
