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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::{Envelope, Op, write_json_str};
use walrelay_common::telemetry::Readiness;

pub use client::{Created, SearchClient, SearchError};
pub use document::{VERSION_FIELD, alias_name, generation_of, versioned};
use document::{document_id, document_id_raw, missing_fields, version};

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

fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms.max(1)))
}

impl SearchSink {
    /// A sink writing in `mode`.
    pub fn new(
        settings: &SearchSettings,
        mode: Mode,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> Result<Self, SearchError> {
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
        let mut backoff = self.settings.retry_initial_backoff;
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
                    let wait = retry_after.unwrap_or_default().max(jitter(backoff));
                    tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "Search request failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(SinkError::Interrupted),
                        () = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.retry_max_backoff);
                }
            }
        }
    }

    /// Makes sure the table's index exists and maps every column of `env`; returns its target.
    async fn table(
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
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(alias.clone(), t.target.clone());
            self.tables.insert(alias.clone(), t);
        }
        let Some(t) = self.tables.get(&alias) else {
            return Ok(Err(format!("index for {alias} missing")));
        };
        // The same `types` text as last time: nothing new to map.
        let missing = if t.checked_types == env.types.raw() {
            Map::new()
        } else {
            missing_fields(&env.types.parse(), &t.mapped)
        };
        if !missing.is_empty() {
            let target = t.target.clone();
            let client = self.client.clone();
            let put = self
                .retrying(shutdown, || client.put_mapping(&target, missing.clone()))
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
        if let Some(t) = self.tables.get_mut(&alias)
            && t.checked_types != env.types.raw()
        {
            t.checked_types = env.types.raw().to_string();
        }
        Ok(Ok(self
            .tables
            .get(&alias)
            .map(|t| t.target.clone())
            .unwrap_or_default()))
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
                            let props = self
                                .retrying(shutdown, || client.properties(alias))
                                .await?
                                .map(|(_, p)| p)
                                .unwrap_or_default();
                            return Ok(TableIndex {
                                target: alias.to_string(),
                                mapped: props,
                                checked_types: String::new(),
                            });
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
                    let index = versioned(alias, 1);
                    let body = json!({
                        "mappings": {"properties": mappings},
                        "aliases": {alias: {}}
                    });
                    let created = self
                        .retrying(shutdown, || client.create_index(&index, &body))
                        .await?;
                    if created == Created::New {
                        tracing::info!(%index, %alias, "Created the index and its alias.");
                        return Ok(TableIndex {
                            target: alias.to_string(),
                            mapped: mappings,
                            checked_types: String::new(),
                        });
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
                if let Some((_, props)) = self
                    .retrying(shutdown, || client.properties(&index))
                    .await?
                {
                    return Ok(TableIndex {
                        target: index,
                        mapped: props,
                        checked_types: String::new(),
                    });
                }
                let body = json!({"mappings": {"properties": mappings}});
                self.retrying(shutdown, || client.create_index(&index, &body))
                    .await?;
                tracing::info!(%index, "Created a new index version to build.");
                Ok(TableIndex {
                    target: index,
                    mapped: mappings,
                    checked_types: String::new(),
                })
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
        let mut backoff = self.settings.retry_initial_backoff;
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
                let wait = jitter(backoff);
                tracing::warn!(
                    items = remaining.len(),
                    wait_ms = wait.as_millis() as u64,
                    "Retrying throttled or failed bulk items."
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Err(SinkError::Interrupted),
                    () = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(self.settings.retry_max_backoff);
            } else {
                backoff = self.settings.retry_initial_backoff;
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
            let target = match self.table(env, shutdown).await? {
                Ok(t) => t,
                Err(why) => {
                    verdicts[i] = Some(Verdict::Rejected(why));
                    continue;
                }
            };
            let v = version(env);
            match env.op {
                Op::Ddl => {
                    // Interim: the index exists and maps the schema's columns.
                    verdicts[i] = Some(Verdict::Applied);
                }
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
                        for col in &env.unchanged_toast {
                            match stored.as_ref().and_then(|s| s.get(col)) {
                                Some(value) => {
                                    source.insert(col.clone(), value.clone());
                                }
                                None => {
                                    // Nothing stored to keep: leave the field out rather
                                    // than write the placeholder or a null.
                                    source.remove(col);
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
