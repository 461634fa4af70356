//! The search sink: one index per table in Elasticsearch or OpenSearch, written with external
//! versions through an alias.
//!
//! - `index` (live) mode writes through the alias `<name>`, which points at `<name>-v<N>`;
//!   the first event of an unknown table creates `<name>-v1` with mappings and the alias.
//! - `reindex` (build) mode writes to `<name>-v<G>` directly, creating it when missing; the
//!   re-index command moves the aliases when the build has caught up.
//!
//! Per event: inserts, updates and snapshot rows index the `after` image; an update that
//! changed the key also deletes the old id; deletes delete; a truncate deletes every document
//! whose `walrelay_version` is below the truncate's (refresh, then `_delete_by_query` with a
//! range), so a truncate delivered again never removes newer rows. Unchanged TOAST columns are
//! taken from the stored document (or from an earlier write of the same batch); the update API
//! cannot carry external versions, so the partial update is a read, merge and versioned write.
//!
//! Per bulk item: 2xx done; 404 on a delete done (already gone); 409 stale (done); 429 and 5xx
//! retried with exponential backoff and jitter (whole-request 429s honour `Retry-After`);
//! anything else rejects the event, which the runtime dead-letters with the item's reason.

mod client;
mod document;
mod schema;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::{Envelope, Op, write_json_str};
use walrelay_common::retry::Backoff;
use walrelay_common::sync::lock;
use walrelay_common::telemetry::Readiness;

pub use client::{Created, SearchClient, SearchError};
pub use document::{VERSION_FIELD, alias_name, generation_of, template_matches, versioned};
use document::{document_id, document_id_raw, missing_fields, version};
use schema::FieldMap;

use crate::config::OnDropTable;

use crate::config::SearchSettings;
use crate::metrics::Metrics;
use crate::runtime::{Event, Sink, SinkError, Verdict};

/// Bulk requests are cut at this many bytes (the common guidance is 5-15 MB).
const MAX_BULK_BYTES: usize = 10 << 20;

/// Where the sink writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through each table's alias (`index`).
    Live,
    /// Into `<alias>-v<generation>` (`reindex`).
    Build {
        /// The generation being built.
        generation: u32,
    },
}

struct TableIndex {
    /// Where writes go: the alias (live) or the versioned index (build).
    target: String,
    /// Fields mapped so far.
    mapped: Map<String, Value>,
    /// The envelope `types` text last checked against `mapped`.
    checked_types: String,
    /// Column ids to fields (from the mapping's `_meta`).
    columns: FieldMap,
    /// Per `column_ids` text: the renames its rows need (`None`: names are fields).
    renames: HashMap<String, Option<Arc<HashMap<String, String>>>>,
}

impl TableIndex {
    fn new(target: String, mapped: Map<String, Value>, columns: FieldMap) -> Self {
        Self {
            target,
            mapped,
            checked_types: String::new(),
            columns,
            renames: HashMap::new(),
        }
    }

    /// The renames rows written with `env`'s column ids need.
    fn renames_for(&mut self, env: &Envelope) -> Option<Arc<HashMap<String, String>>> {
        if self.columns.fields.is_empty() {
            return None;
        }
        let raw = env.column_ids.raw();
        if let Some(known) = self.renames.get(raw) {
            return known.clone();
        }
        let map = self.columns.renames(&env.column_ids.parse());
        let entry = (!map.is_empty()).then(|| Arc::new(map));
        self.renames.insert(raw.to_string(), entry.clone());
        entry
    }
}

/// One bulk action and the event it serves.
struct Action {
    event: usize,
    lines: Vec<u8>,
}

/// The search sink.
pub struct SearchSink {
    client: SearchClient,
    settings: SearchSettings,
    mode: Mode,
    tables: HashMap<String, TableIndex>,
    /// Alias per schema and table, rendered once.
    aliases: HashMap<String, HashMap<String, String>>,
    seen: Arc<Mutex<BTreeMap<String, String>>>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

impl SearchSink {
    /// A sink writing in `mode`.
    pub fn new(
        settings: &SearchSettings,
        mode: Mode,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> Result<Self, SearchError> {
        for kind in [
            "definite",
            "connection",
            "throttled",
            "server",
            "rejected",
            "mapping",
        ] {
            metrics.sink_errors.with_label_values(&["search", kind]);
        }
        Ok(Self {
            client: SearchClient::new(settings)?,
            settings: settings.clone(),
            mode,
            tables: HashMap::new(),
            aliases: HashMap::new(),
            seen: Arc::default(),
            metrics,
            readiness,
        })
    }

    /// The client, for commands that manage indexes.
    pub fn client(&self) -> &SearchClient {
        &self.client
    }

    /// Aliases and the index written for each, for the tables seen so far (kept current while
    /// the sink runs elsewhere).
    pub fn tables_handle(&self) -> Arc<Mutex<BTreeMap<String, String>>> {
        Arc::clone(&self.seen)
    }

    /// The retry policy of one request or bulk (`--retry-initial-backoff`, `--retry-max-backoff`).
    fn backoff(&self) -> Backoff {
        Backoff::new(
            self.settings.retry_initial_backoff,
            self.settings.retry_max_backoff,
        )
    }

    /// Runs `call` until it succeeds, retrying transient failures with backoff.
    async fn retrying<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        mut call: F,
    ) -> Result<T, SinkError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SearchError>>,
    {
        let mut backoff = self.backoff();
        loop {
            match call().await {
                Ok(v) => {
                    self.readiness.set("search", true);
                    return Ok(v);
                }
                Err(SearchError::Definite { what, message }) => {
                    self.metrics
                        .sink_errors
                        .with_label_values(&["search", "definite"])
                        .inc();
                    return Err(SinkError::Definite(format!("{what}: {message}")));
                }
                Err(e @ SearchError::Transient { retry_after, .. }) => {
                    self.metrics
                        .sink_errors
                        .with_label_values(&["search", e.kind()])
                        .inc();
                    if e.kind() == "connection" {
                        self.readiness.set("search", false);
                    }
                    let wait = retry_after.unwrap_or_default().max(backoff.next_wait());
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "Search request failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(SinkError::Interrupted),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// The alias of `env`'s table, opening (or creating) its index on first use.
    async fn open(
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
    async fn table(
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

    /// Applies a schema event: maps added columns, aliases renamed ones, moves the alias of a
    /// renamed table, deletes a dropped table's index (see [`schema`]).
    async fn apply_schema(
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

    async fn open_table(
        &self,
        alias: &str,
        env: &Envelope,
        shutdown: &CancellationToken,
    ) -> Result<TableIndex, SinkError> {
        let client = self.client.clone();
        let mappings = missing_fields(&env.types.parse(), &Map::new());
        match self.mode {
            Mode::Live => {
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
                    if let Some((index, _)) =
                        self.retrying(shutdown, || client.properties(alias)).await?
                    {
                        return Err(SinkError::Definite(format!(
                            "{index} is an index, not an alias; walrelay writes through the alias {alias} -> {alias}-v<N>: reindex it into {alias}-v1 and make {alias} an alias, or choose another --index-template"
                        )));
                    }
                    // An index of this name another alias holds was taken along by a renamed
                    // table: rows and schema events of that table still under the old name (a
                    // partition that had not reached the rename yet) go there without bringing
                    // the old alias back; a new table under the old name (another OID) gets an
                    // index version of its own.
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
                        return Ok(TableIndex::new(
                            index.clone(),
                            m.properties,
                            FieldMap::from_meta(&m.meta),
                        ));
                    }
                    let index = versioned(alias, newest.map_or(1, |(g, _)| g + 1));
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
            Mode::Build { generation } => {
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
                let body =
                    json!({"mappings": {"properties": mappings, "_meta": columns.to_meta()}});
                self.retrying(shutdown, || client.create_index(&index, &body))
                    .await?;
                tracing::info!(%index, seeded_columns = columns.fields.len(), "Created a new index version to build.");
                Ok(TableIndex::new(index, mappings, columns))
            }
        }
    }

    /// Sends actions (cut into bulk requests) until each has a final answer; records the
    /// verdict of each action's event.
    async fn send(
        &self,
        actions: Vec<Action>,
        verdicts: &mut [Option<Verdict>],
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let mut remaining = actions;
        let mut backoff = self.backoff();
        while !remaining.is_empty() {
            let mut retry = Vec::new();
            let mut start = 0;
            while start < remaining.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < remaining.len()
                    && (end == start || bytes + remaining[end].lines.len() <= MAX_BULK_BYTES)
                {
                    bytes += remaining[end].lines.len();
                    end += 1;
                }
                let chunk = &remaining[start..end];
                let mut body = Vec::with_capacity(bytes);
                for a in chunk {
                    body.extend_from_slice(&a.lines);
                }
                // Shared by the attempts: a retry does not copy it again.
                let body = bytes::Bytes::from(body);
                let client = self.client.clone();
                let items = self
                    .retrying(shutdown, || client.bulk(body.clone(), chunk.len()))
                    .await?;
                for (j, (action, item)) in chunk.iter().zip(items).enumerate() {
                    let verdict = match item.status {
                        200..=299 => Verdict::Applied,
                        404 if action.lines.starts_with(b"{\"delete\"") => Verdict::Applied,
                        409 => Verdict::Stale,
                        429 | 500..=599 => {
                            self.metrics
                                .sink_errors
                                .with_label_values(&[
                                    "search",
                                    if item.status == 429 {
                                        "item_throttled"
                                    } else {
                                        "item_server"
                                    },
                                ])
                                .inc();
                            retry.push(start + j);
                            continue;
                        }
                        status => {
                            self.metrics
                                .sink_errors
                                .with_label_values(&["search", "rejected"])
                                .inc();
                            Verdict::Rejected(format!(
                                "{status} {}",
                                item.error.unwrap_or_else(|| "no reason given".into())
                            ))
                        }
                    };
                    let slot = &mut verdicts[action.event];
                    *slot = Some(match (slot.take(), verdict) {
                        (Some(r @ Verdict::Rejected(_)), _) | (_, r @ Verdict::Rejected(_)) => r,
                        (Some(Verdict::Applied), _) | (_, Verdict::Applied) => Verdict::Applied,
                        _ => Verdict::Stale,
                    });
                }
                start = end;
            }
            // Keep only the failed actions, in their order.
            let mut keep = vec![false; remaining.len()];
            for i in retry {
                keep[i] = true;
            }
            let next: Vec<Action> = std::mem::take(&mut remaining)
                .into_iter()
                .zip(keep)
                .filter_map(|(a, k)| k.then_some(a))
                .collect();
            remaining = next;
            if !remaining.is_empty() {
                let wait = backoff.next_wait();
                tracing::warn!(
                    items = remaining.len(),
                    wait_ms = wait.as_millis() as u64,
                    "Retrying throttled or failed bulk items."
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Err(SinkError::Interrupted),
                    () = tokio::time::sleep(wait) => {}
                }
            } else {
                backoff.reset();
            }
        }
        Ok(())
    }

    async fn truncate(
        &self,
        target: &str,
        version: i64,
        shutdown: &CancellationToken,
    ) -> Result<u64, SinkError> {
        let client = self.client.clone();
        self.retrying(shutdown, || client.refresh(target)).await?;
        let query = json!({"range": {VERSION_FIELD: {"lt": version}}});
        self.retrying(shutdown, || client.delete_by_query(target, query.clone()))
            .await
    }
}

/// Appends `{"<kind>":{"_index":…,"_id":…,"version":…,"version_type":"external"}}` and a newline.
fn action_line(out: &mut Vec<u8>, kind: &str, index: &str, id: &str, version: i64) {
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\":{\"_index\":");
    write_json_str(out, index);
    out.extend_from_slice(b",\"_id\":");
    write_json_str(out, id);
    out.extend_from_slice(b",\"version\":");
    out.extend_from_slice(version.to_string().as_bytes());
    out.extend_from_slice(b",\"version_type\":\"external\"}}\n");
}

/// For an update that changed the row's key: the old document's id and the action deleting it.
fn old_key_delete(
    env: &Envelope,
    id: &str,
    target: &str,
    version: i64,
) -> Option<(String, Vec<u8>)> {
    if env.op != Op::Update {
        return None;
    }
    let old = document_id(&env.key, env.before.as_ref()?).ok()?;
    if old == id {
        return None;
    }
    let mut lines = Vec::new();
    action_line(&mut lines, "delete", target, &old, version);
    Some((old, lines))
}

impl Sink for SearchSink {
    fn name(&self) -> &'static str {
        "search"
    }

    async fn write(
        &mut self,
        events: &mut [Event],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, SinkError> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; events.len()];
        let mut actions: Vec<Action> = Vec::new();
        // The latest source written in this batch per (index, id); `None` once deleted.
        let mut written: HashMap<(String, String), Option<Box<RawValue>>> = HashMap::new();
        for (i, event) in events.iter_mut().enumerate() {
            let taken_after = event.after_json.take();
            let env = &event.envelope;
            if env.op == Op::Ddl {
                // Rows before it in this batch are written first; rows after it may need
                // the fields it maps.
                self.send(std::mem::take(&mut actions), &mut verdicts, shutdown)
                    .await?;
                verdicts[i] = Some(self.apply_schema(env, shutdown).await?);
                continue;
            }
            let (target, renames) = match self.table(env, shutdown).await? {
                Ok(t) => t,
                Err(why) => {
                    verdicts[i] = Some(Verdict::Rejected(why));
                    continue;
                }
            };
            let v = version(env);
            match env.op {
                Op::Ddl => {}
                Op::Truncate => {
                    self.send(std::mem::take(&mut actions), &mut verdicts, shutdown)
                        .await?;
                    written.retain(|(index, _), _| index != &target);
                    let deleted = self.truncate(&target, v, shutdown).await?;
                    tracing::info!(index = %target, deleted, "Truncated.");
                    verdicts[i] = Some(Verdict::Applied);
                }
                Op::Delete => {
                    let id = match env.before.as_ref().map(|b| document_id(&env.key, b)) {
                        Some(Ok(id)) => id,
                        Some(Err(why)) => {
                            verdicts[i] = Some(Verdict::Rejected(why));
                            continue;
                        }
                        None => {
                            verdicts[i] =
                                Some(Verdict::Rejected("delete without a before image".into()));
                            continue;
                        }
                    };
                    let mut lines = Vec::new();
                    action_line(&mut lines, "delete", &target, &id, v);
                    actions.push(Action { event: i, lines });
                    written.insert((target, id), None);
                }
                Op::Create | Op::Update | Op::Read => {
                    let Some(raw) = taken_after else {
                        verdicts[i] = Some(Verdict::Rejected(
                            "insert or update without an after image".into(),
                        ));
                        continue;
                    };
                    // The common case: forward the image's text, adding the version field.
                    if env.unchanged_toast.is_empty()
                        && renames.is_none()
                        && let Ok(fields) =
                            serde_json::from_str::<HashMap<Cow<'_, str>, &RawValue>>(raw.get())
                        && !fields.contains_key(VERSION_FIELD)
                    {
                        let id = match document_id_raw(&env.key, &fields) {
                            Ok(id) => id,
                            Err(why) => {
                                verdicts[i] = Some(Verdict::Rejected(why));
                                continue;
                            }
                        };
                        if let Some((old, lines)) = old_key_delete(env, &id, &target, v) {
                            actions.push(Action { event: i, lines });
                            written.insert((target.clone(), old), None);
                        }
                        let mut lines = Vec::new();
                        action_line(&mut lines, "index", &target, &id, v);
                        let text = raw.get().trim_end();
                        let inner = text.strip_suffix('}').unwrap_or(text);
                        lines.extend_from_slice(inner.as_bytes());
                        if !fields.is_empty() {
                            lines.push(b',');
                        }
                        lines.extend_from_slice(b"\"");
                        lines.extend_from_slice(VERSION_FIELD.as_bytes());
                        lines.extend_from_slice(b"\":");
                        lines.extend_from_slice(v.to_string().as_bytes());
                        lines.extend_from_slice(b"}\n");
                        actions.push(Action { event: i, lines });
                        drop(fields);
                        written.insert((target, id), Some(raw));
                        continue;
                    }
                    let Ok(mut source) = serde_json::from_str::<Map<String, Value>>(raw.get())
                    else {
                        verdicts[i] = Some(Verdict::Rejected(
                            "the after image is not a JSON object".into(),
                        ));
                        continue;
                    };
                    let id = match document_id(&env.key, &source) {
                        Ok(id) => id,
                        Err(why) => {
                            verdicts[i] = Some(Verdict::Rejected(why));
                            continue;
                        }
                    };
                    // Renamed columns are stored in their original field.
                    let field_of = |col: &str| -> String {
                        renames
                            .as_ref()
                            .and_then(|r| r.get(col).cloned())
                            .unwrap_or_else(|| col.to_string())
                    };
                    if renames.is_some() {
                        source = source.into_iter().map(|(k, v)| (field_of(&k), v)).collect();
                    }
                    if !env.unchanged_toast.is_empty() {
                        let stored = match written.get(&(target.clone(), id.clone())) {
                            Some(known) => known.as_ref().and_then(|r| {
                                serde_json::from_str::<Map<String, Value>>(r.get()).ok()
                            }),
                            None => {
                                // The stored document must reflect everything before this event.
                                self.send(std::mem::take(&mut actions), &mut verdicts, shutdown)
                                    .await?;
                                let client = self.client.clone();
                                match self
                                    .retrying(shutdown, || client.get_doc(&target, &id))
                                    .await?
                                {
                                    Some((stored_version, _)) if stored_version >= v => {
                                        verdicts[i] = Some(Verdict::Stale);
                                        continue;
                                    }
                                    found => found.map(|(_, s)| s),
                                }
                            }
                        };
                        for col in env.unchanged_toast.iter().map(|c| field_of(c)) {
                            match stored.as_ref().and_then(|s| s.get(&col)) {
                                Some(value) => {
                                    source.insert(col.clone(), value.clone());
                                }
                                None => {
                                    // Nothing stored to keep: leave the field out rather
                                    // than write the placeholder or a null.
                                    source.remove(&col);
                                    self.metrics
                                        .sink_errors
                                        .with_label_values(&["search", "toast_unresolved"])
                                        .inc();
                                    tracing::warn!(index = %target, %id, column = %col, "Unchanged TOAST value with no stored document to take it from; field left out.");
                                }
                            }
                        }
                    }
                    if let Some((old, lines)) = old_key_delete(env, &id, &target, v) {
                        actions.push(Action { event: i, lines });
                        written.insert((target.clone(), old), None);
                    }
                    let mut lines = Vec::new();
                    source.insert(VERSION_FIELD.into(), json!(v));
                    action_line(&mut lines, "index", &target, &id, v);
                    if let Err(e) = serde_json::to_writer(&mut lines, &source) {
                        verdicts[i] = Some(Verdict::Rejected(format!(
                            "cannot encode the document: {e}"
                        )));
                        continue;
                    }
                    lines.push(b'\n');
                    actions.push(Action { event: i, lines });
                    written.insert((target, id), serde_json::value::to_raw_value(&source).ok());
                }
            }
        }
        self.send(actions, &mut verdicts, shutdown).await?;
        Ok(verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Applied))
            .collect())
    }
}
