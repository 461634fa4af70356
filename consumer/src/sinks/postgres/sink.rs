//! The [`Sink`]: applies batches to the target inside transactions that also move the applied
//! positions, cut at source-transaction boundaries (the rules are in [`super`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walrelay_common::event::{Op, SchemaChange};
use walrelay_common::retry::Backoff;

use super::client::{self, Replicated, TargetError};
use super::config::{OnSchemaError, ReplicateSettings};
use super::ddl;
use super::encode::{self, TargetTable, qualified};
use crate::runtime::{Backlog, Event, Sink, SinkError, Verdict};

/// The replicator's metrics (`walrelay_consumer_replicate_*`).
#[derive(Clone)]
pub struct ReplicateMetrics {
    rows: IntCounterVec,
    schema_changes: IntCounterVec,
    errors: IntCounterVec,
    replays_skipped: IntCounter,
    commit_latency: Histogram,
    commits: IntCounter,
}

impl ReplicateMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            rows: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_replicate_rows_total",
                    "Row events applied to the target, by op (c, u, d, r; t counts truncates).",
                ),
                &["op"],
            )?,
            schema_changes: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_replicate_schema_changes_total",
                    "Schema events handled by the replicator, by outcome (applied, unchanged: already applied or a copy from another partition, refused).",
                ),
                &["outcome"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "walrelay_consumer_replicate_errors_total",
                    "Target failures, by kind (transient: retried; definite: stopped; schema: a refused schema change).",
                ),
                &["kind"],
            )?,
            replays_skipped: IntCounter::new(
                "walrelay_consumer_replicate_replays_skipped_total",
                "Records read again (after a crash or rebalance) that the target had already applied, skipped.",
            )?,
            commit_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "walrelay_consumer_replicate_apply_latency_seconds",
                    "Source commit to target commit, per target transaction (its newest event).",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
                ]),
            )?,
            commits: IntCounter::new(
                "walrelay_consumer_replicate_transactions_total",
                "Target transactions committed.",
            )?,
        };
        for op in ["c", "u", "d", "r", "t"] {
            m.rows.with_label_values(&[op]);
        }
        for o in ["applied", "unchanged", "refused"] {
            m.schema_changes.with_label_values(&[o]);
        }
        for k in ["transient", "definite", "schema"] {
            m.errors.with_label_values(&[k]);
        }
        registry.register(Box::new(m.rows.clone()))?;
        registry.register(Box::new(m.schema_changes.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.replays_skipped.clone()))?;
        registry.register(Box::new(m.commit_latency.clone()))?;
        registry.register(Box::new(m.commits.clone()))?;
        Ok(m)
    }
}

/// A topic-partition.
type Tp = (Arc<str>, i32);

/// Age at which an open target transaction commits at the next source-transaction boundary.
const COMMIT_AFTER: Duration = Duration::from_millis(100);

/// One partition's place in the open target transaction.
#[derive(Debug, Default, Clone)]
struct Part {
    /// Records below this offset are applied (committed, or in the open transaction).
    next: i64,
    /// Records handled in the open transaction.
    handled: i64,
    /// The first offset handled in the open transaction (owed until it commits).
    first: Option<i64>,
    /// The commit LSN of the source transaction the open transaction may hold only part of.
    tail: Option<u64>,
}

/// The open target transaction.
#[derive(Debug)]
struct Open {
    /// When it began.
    began: Instant,
    parts: BTreeMap<Tp, Part>,
    /// It holds records of an earlier `write` (lost with it if it fails).
    carried: bool,
    /// Newest source commit time (ms) applied in it.
    newest_ts_ms: i64,
}

/// What the sink knows of a source table (from its last schema event).
#[derive(Debug, Clone)]
struct Source {
    known: Option<Replicated>,
    /// Target schema and table.
    target: (String, String),
    /// Per `column_ids` text: row column name to the current name (`None`: dropped since).
    renames: HashMap<String, Arc<HashMap<String, Option<String>>>>,
}

/// A row change waiting in a run.
#[derive(Debug)]
enum Change {
    Upsert {
        values: BTreeMap<String, Box<RawValue>>,
        /// Unchanged TOAST columns (left as they are in the target).
        keep: BTreeSet<String>,
    },
    Delete {
        key: Vec<(String, String)>,
    },
}

/// A table's pending row changes, last change per key.
#[derive(Debug, Default)]
struct Run {
    key: Vec<String>,
    rows: HashMap<String, Change>,
    /// Rows of a table without a key (inserts only).
    inserts: Vec<BTreeMap<String, Box<RawValue>>>,
}

/// Why applying failed.
enum Failure {
    /// The session or a transaction failed in a way a retry may fix.
    Transient(String),
    /// Stop: retrying will not help.
    Definite(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if client::transient(&e) {
            Failure::Transient(client::describe(&e))
        } else {
            Failure::Definite(format!("target database: {}", client::describe(&e)))
        }
    }
}

impl From<TargetError> for Failure {
    fn from(e: TargetError) -> Self {
        if e.is_transient() {
            Failure::Transient(e.to_string())
        } else {
            Failure::Definite(e.to_string())
        }
    }
}

/// Applies change events to a Postgres database.
pub struct PostgresSink {
    settings: Arc<ReplicateSettings>,
    group: String,
    metrics: ReplicateMetrics,
    session: Option<Arc<Client>>,
    /// The statements of the last write, running on the target while the next batch is
    /// staged; every other use of the session waits for them first ([`Self::db`]).
    inflight: Option<tokio::task::JoinHandle<Result<(), Failure>>>,
    open: Option<Open>,
    /// Source (db, schema, table) to what is known of it; cleared when a transaction is lost.
    sources: HashMap<(String, String, String), Source>,
    /// Tables dropped by a schema event this process applied: rows still arriving for them
    /// from other partitions are skipped.
    dropped: HashSet<(String, String, String)>,
    /// Target catalog, by `"schema"."table"`.
    targets: HashMap<String, TargetTable>,
    runs: BTreeMap<(String, String), Run>,
    last_write: Instant,
    /// A quiet stream's open transaction commits after this long without a batch.
    idle_commit: Duration,
    /// When each partition last brought events (one entry per partition read).
    seen: HashMap<Tp, Instant>,
}

impl PostgresSink {
    /// A sink for `group` (the applied positions are per group); connects on first use.
    pub fn new(
        settings: Arc<ReplicateSettings>,
        group: String,
        metrics: ReplicateMetrics,
        batch_max_wait: Duration,
    ) -> Self {
        Self {
            settings,
            group,
            metrics,
            session: None,
            inflight: None,
            open: None,
            sources: HashMap::new(),
            dropped: HashSet::new(),
            targets: HashMap::new(),
            runs: BTreeMap::new(),
            last_write: Instant::now(),
            idle_commit: (batch_max_wait * 2).max(Duration::from_millis(500)),
            seen: HashMap::new(),
        }
    }

    /// Forgets the session and everything learned inside the transaction it lost.
    fn reset(&mut self) {
        if let Some(h) = self.inflight.take() {
            h.abort();
        }
        self.session = None;
        self.open = None;
        self.sources.clear();
        self.dropped.clear();
        self.targets.clear();
        self.runs.clear();
    }

    /// The session, once the statements still running on it are done (their failure is
    /// this call's).
    async fn db(&mut self) -> Result<Arc<Client>, Failure> {
        if let Some(h) = self.inflight.take() {
            match h.await {
                Ok(r) => r?,
                Err(e) => return Err(Failure::Transient(format!("statement task: {e}"))),
            }
        }
        if self.session.as_ref().is_none_or(|c| c.is_closed()) {
            if self.open.is_some() {
                // The open transaction died with its session (the target rolled it back): its
                // loss is the caller's to handle, never covered by a new session, or the
                // records it held would be answered for and their offsets stored.
                return Err(Failure::Transient(
                    "the connection to the target was lost with the open transaction".into(),
                ));
            }
            self.reset();
            let c = client::connect(&self.settings.target).await?;
            client::prepare(&c).await?;
            // synchronous_commit stays as the target has it: Kafka's offsets move past a
            // record once its commit returned, and nothing seeks back to walrelay.applied, so
            // a commit the target could still lose would lose its records.
            self.session = Some(Arc::new(c));
        }
        self.session
            .clone()
            .ok_or_else(|| Failure::Transient("no session".into()))
    }

    async fn begin(&mut self) -> Result<(), Failure> {
        self.db().await?.batch_execute("BEGIN").await?;
        self.open = Some(Open {
            began: Instant::now(),
            parts: BTreeMap::new(),
            carried: false,
            newest_ts_ms: 0,
        });
        Ok(())
    }

    /// Locks (and reads) the applied positions of `parts` not yet in the open transaction.
    async fn lock(&mut self, parts: &BTreeSet<Tp>) -> Result<(), Failure> {
        let open = self
            .open
            .as_ref()
            .ok_or_else(|| Failure::Transient("no transaction".into()))?;
        let new: Vec<(String, i32)> = parts
            .iter()
            .filter(|tp| !open.parts.contains_key(*tp))
            .map(|(t, p)| (t.to_string(), *p))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let session = &*self.db().await?;
        let positions = client::lock_positions(session, &self.group, &new).await?;
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| Failure::Transient("no transaction".into()))?;
        for (t, p) in new {
            let next = positions.get(&(t.clone(), p)).copied().unwrap_or(0);
            open.parts.insert(
                (Arc::from(t.as_str()), p),
                Part {
                    next,
                    ..Part::default()
                },
            );
        }
        Ok(())
    }

    /// Applies what is pending, moves the positions and commits.
    async fn commit(&mut self) -> Result<(), Failure> {
        let Some(_) = self.open else {
            return Ok(());
        };
        self.flush().await?;
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let moves: Vec<(String, i32, i64, i64)> = open
            .parts
            .iter()
            .filter(|(_, p)| p.handled > 0)
            .map(|((t, p), part)| (t.to_string(), *p, part.next, part.handled))
            .collect();
        let session = &*self.db().await?;
        client::advance(session, &self.group, &moves).await?;
        session.batch_execute("COMMIT").await?;
        self.metrics.commits.inc();
        tracing::debug!(
            records = moves.iter().map(|m| m.3).sum::<i64>(),
            partitions = moves.len(),
            "Target transaction committed."
        );
        if open.newest_ts_ms > 0 {
            let age = walrelay_common::clock::now_ms().saturating_sub(open.newest_ts_ms);
            self.metrics
                .commit_latency
                .observe(age.max(0) as f64 / 1000.0);
        }
        Ok(())
    }

    /// What is known of a source table by a name it has or had, loaded from the bookkeeping
    /// on first use; `None` when that table was dropped.
    async fn source(
        &mut self,
        db: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<&mut Source>, Failure> {
        let k = (db.to_string(), schema.to_string(), table.to_string());
        if self.dropped.contains(&k) {
            return Ok(None);
        }
        if !self.sources.contains_key(&k) {
            let session = &*self.db().await?;
            let known = match client::by_name(session, db, schema, table).await? {
                Some((_, Some(r))) if !r.dropped => Some(r),
                Some((_, _)) => {
                    self.dropped.insert(k);
                    return Ok(None);
                }
                None => None,
            };
            let target = match &known {
                Some(r) => (r.schema.clone(), r.table.clone()),
                None => (
                    self.settings.target_schema(schema).to_string(),
                    table.to_string(),
                ),
            };
            self.sources.insert(
                k.clone(),
                Source {
                    known,
                    target,
                    renames: HashMap::new(),
                },
            );
        }
        Ok(self.sources.get_mut(&k))
    }

    /// The target table's catalog entry.
    async fn target(&mut self, schema: &str, table: &str) -> Result<Option<TargetTable>, Failure> {
        let name = qualified(schema, table);
        if let Some(t) = self.targets.get(&name) {
            return Ok(Some(t.clone()));
        }
        let session = &*self.db().await?;
        let t = client::table(session, schema, table).await?;
        if let Some(t) = &t {
            self.targets.insert(name, t.clone());
        }
        Ok(t)
    }

    /// The statements of the pending runs: per table, one delete, then one upsert per column
    /// set (and plain inserts for tables without a key), each with its rows as JSON.
    async fn statements(&mut self) -> Result<Vec<(String, String)>, Failure> {
        let runs = std::mem::take(&mut self.runs);
        let mut out = Vec::new();
        for ((schema, table), run) in runs {
            let Some(t) = self.target(&schema, &table).await? else {
                return Err(Failure::Definite(format!(
                    "target table {} does not exist: create it, or run the replicator with \
                     --initial from the topic's beginning so that its schema event creates it",
                    qualified(&schema, &table)
                )));
            };
            let mut deletes = String::new();
            let mut groups: BTreeMap<(Vec<String>, BTreeSet<String>), String> = BTreeMap::new();
            for change in run.rows.values() {
                match change {
                    Change::Delete { key } => {
                        encode::push_row(
                            &mut deletes,
                            key.iter().map(|(c, v)| (c.as_str(), v.as_str())),
                        );
                    }
                    Change::Upsert { values, keep } => {
                        let cols: Vec<String> = values.keys().cloned().collect();
                        let json = groups.entry((cols, keep.clone())).or_default();
                        encode::push_row(json, values.iter().map(|(c, v)| (c.as_str(), v.get())));
                    }
                }
            }
            if !deletes.is_empty() {
                deletes.push(']');
                let sql =
                    encode::delete(&t, &run.key).map_err(|e| Failure::Definite(e.to_string()))?;
                out.push((sql, deletes));
            }
            for ((cols, keep), mut json) in groups {
                json.push(']');
                let sql = encode::upsert(&t, &cols, &run.key, &keep)
                    .map_err(|e| Failure::Definite(e.to_string()))?;
                out.push((sql, json));
            }
            // Tables without a key: plain inserts.
            let mut plain: BTreeMap<Vec<String>, String> = BTreeMap::new();
            for values in &run.inserts {
                let cols: Vec<String> = values.keys().cloned().collect();
                encode::push_row(
                    plain.entry(cols).or_default(),
                    values.iter().map(|(c, v)| (c.as_str(), v.get())),
                );
            }
            for (cols, mut json) in plain {
                json.push(']');
                out.push((
                    encode::insert(&t, &cols).map_err(|e| Failure::Definite(e.to_string()))?,
                    json,
                ));
            }
        }
        Ok(out)
    }

    /// Applies the pending runs now.
    async fn flush(&mut self) -> Result<(), Failure> {
        let statements = self.statements().await?;
        if statements.is_empty() {
            return Ok(());
        }
        let session = &*self.db().await?;
        run_statements(session, statements).await
    }

    /// Starts applying the pending runs and returns: they run on the target while the next
    /// batch is read and staged (the open transaction is not committed before they are done).
    async fn flush_deferred(&mut self) -> Result<(), Failure> {
        let statements = self.statements().await?;
        if statements.is_empty() {
            return Ok(());
        }
        let session = self.db().await?;
        self.inflight = Some(tokio::spawn(async move {
            run_statements(&session, statements).await
        }));
        Ok(())
    }

    /// Applies a schema event (after the pending rows); `Ok(Some(reason))` when it was refused
    /// and is to be dead-lettered.
    async fn schema_change(
        &mut self,
        e: &Event,
        ch: &SchemaChange,
    ) -> Result<Option<String>, Failure> {
        self.flush().await?;
        let src = &e.envelope.source;
        let db = src.db.clone();
        let session = &*self.db().await?;
        // Members of one group that own different partitions see each copy of the event: one
        // applies it, the others wait here and then find its version applied.
        client::lock_table(session, ch.table_oid).await?;
        let known = client::replicated(session, &db, Some(ch.table_oid), ("", "")).await?;
        if let Some(k) = &known
            && k.version >= e.envelope.schema_version
            && e.envelope.schema_version > 0
        {
            self.metrics
                .schema_changes
                .with_label_values(&["unchanged"])
                .inc();
            // Applied elsewhere (another partition's copy, another member): what this process
            // cached of the table is read again.
            self.sources
                .retain(|_, s| s.known.as_ref().is_none_or(|r| r.oid != k.oid));
            self.targets.clear();
            return Ok(None);
        }
        // A tombstone of an older table with this OID (reused): as if unknown.
        let known = known.filter(|k| !k.dropped);
        if known.is_none() && ch.dropped {
            self.metrics
                .schema_changes
                .with_label_values(&["unchanged"])
                .inc();
            self.dropped
                .insert((db, src.schema.clone(), src.table.clone()));
            return Ok(None);
        }
        let target_schema = self.settings.target_schema(&src.schema).to_string();
        let target_table = src.table.clone();
        let planned = ddl::plan(
            session,
            known.as_ref(),
            &target_schema,
            &target_table,
            &ch.columns,
            ch.dropped,
            self.settings.initial,
        )
        .await?;
        let plan = match planned {
            Ok(p) => p,
            Err(message) => return self.refused(&message),
        };
        let savepoint = self.settings.on_schema_error == OnSchemaError::DeadLetter;
        if savepoint {
            session.batch_execute("SAVEPOINT walrelay_ddl").await?;
        }
        for sql in &plan.statements {
            if let Err(err) = session.batch_execute(sql).await {
                if client::transient(&err) {
                    return Err(err.into());
                }
                let message = format!(
                    "the target refused the schema change of {}.{} ({}): {sql}: {}",
                    src.schema,
                    src.table,
                    ch.command.as_deref().unwrap_or("schema event"),
                    client::describe(&err)
                );
                if savepoint {
                    session
                        .batch_execute("ROLLBACK TO SAVEPOINT walrelay_ddl")
                        .await?;
                }
                return self.refused(&message);
            }
        }
        let replicated = (!ch.dropped).then(|| Replicated {
            oid: ch.table_oid,
            source_schema: src.schema.clone(),
            source_table: src.table.clone(),
            version: e.envelope.schema_version,
            schema: target_schema.clone(),
            table: target_table.clone(),
            columns: ch.columns.clone(),
            truncated: known.as_ref().map_or((0, 0), |k| k.truncated),
            dropped: false,
        });
        client::remember(session, &db, ch.table_oid, replicated.as_ref()).await?;
        if ch.dropped {
            client::mark_dropped_version(session, &db, ch.table_oid, e.envelope.schema_version)
                .await?;
        }
        if savepoint {
            session
                .batch_execute("RELEASE SAVEPOINT walrelay_ddl")
                .await?;
        }
        for w in &plan.warnings {
            tracing::warn!(table = %format!("{}.{}", src.schema, src.table), "{w}");
        }
        if !plan.statements.is_empty() {
            tracing::info!(
                table = %format!("{}.{}", src.schema, src.table),
                statements = ?plan.statements,
                "Schema change applied to the target."
            );
        }
        self.metrics
            .schema_changes
            .with_label_values(&["applied"])
            .inc();
        // What changed by name: the old name (a rename) and the new.
        self.targets.clear();
        if let Some(k) = &known {
            let old = (db.clone(), k.source_schema.clone(), k.source_table.clone());
            if ch.dropped {
                self.dropped.insert(old.clone());
                self.sources.remove(&old);
            } else if old.1 != src.schema || old.2 != src.table {
                // Rows still arriving under the old name (from other partitions, before their
                // copy of this event) go to the new.
                self.sources.insert(
                    old,
                    Source {
                        known: replicated.clone(),
                        target: (target_schema.clone(), target_table.clone()),
                        renames: HashMap::new(),
                    },
                );
            }
        }
        let new = (db.clone(), src.schema.clone(), src.table.clone());
        if ch.dropped {
            self.dropped.insert(new.clone());
            self.sources.remove(&new);
        } else {
            self.dropped.remove(&new);
            self.sources.insert(
                new,
                Source {
                    known: replicated,
                    target: (target_schema, target_table),
                    renames: HashMap::new(),
                },
            );
        }
        Ok(None)
    }

    fn refused(&mut self, message: &str) -> Result<Option<String>, Failure> {
        self.metrics.errors.with_label_values(&["schema"]).inc();
        self.metrics
            .schema_changes
            .with_label_values(&["refused"])
            .inc();
        match self.settings.on_schema_error {
            OnSchemaError::Halt => Err(Failure::Definite(format!(
                "{message}. Nothing after it was applied; fix the target and restart the \
                 replicator (or run it with --on-schema-error dead-letter to skip such changes)"
            ))),
            OnSchemaError::DeadLetter => {
                tracing::error!(error = %message, "Schema change refused by the target; dead-lettered.");
                Ok(Some(message.to_string()))
            }
        }
    }

    /// Stages a row event into its table's run; `Some(reason)` when it cannot be applied.
    async fn stage_row(&mut self, e: &Event) -> Result<Option<String>, Failure> {
        let env = &e.envelope;
        let src = &env.source;
        let name = (src.db.clone(), src.schema.clone(), src.table.clone());
        // A row written under a schema newer than the one cached: another member (or a copy
        // of the event on a partition owned elsewhere) applied it; read it again.
        if self.sources.get(&name).is_some_and(|s| {
            s.known
                .as_ref()
                .is_some_and(|k| env.schema_version > k.version)
        }) {
            self.sources.remove(&name);
            self.targets.clear();
        }
        let Some(source) = self.source(&src.db, &src.schema, &src.table).await? else {
            // Its table was dropped further on in the log (seen on another partition).
            return Ok(None);
        };
        if let Some(k) = &source.known
            && (src.commit_lsn, src.seq) < k.truncated
        {
            // From before a truncate already applied (this partition is behind its copy).
            return Ok(None);
        }
        let target = source.target.clone();
        // Row column names to current names, through the stable column ids.
        let renames: Option<Arc<HashMap<String, Option<String>>>> = match &source.known {
            Some(k) if env.column_ids.raw() != "{}" => {
                let raw = env.column_ids.raw();
                if let Some(r) = source.renames.get(raw) {
                    Some(Arc::clone(r))
                } else {
                    let ids = env.column_ids.parse();
                    let map: HashMap<String, Option<String>> = ids
                        .iter()
                        .map(|(name, id)| {
                            let current = k
                                .columns
                                .iter()
                                .find(|c| c.id == *id)
                                .map(|c| c.name.clone());
                            (name.clone(), current)
                        })
                        .filter(|(name, current)| current.as_deref() != Some(name.as_str()))
                        .collect();
                    let map = Arc::new(map);
                    source.renames.insert(raw.to_string(), Arc::clone(&map));
                    Some(map)
                }
            }
            _ => None,
        };
        let rename = |n: &str| -> Option<String> {
            match renames.as_ref().and_then(|r| r.get(n)) {
                Some(current) => current.clone(),
                None => Some(n.to_string()),
            }
        };
        let key: Vec<String> = env.key.iter().filter_map(|k| rename(k)).collect();
        let run = self.runs.entry(target.clone()).or_default();
        if run.key != key && (!run.rows.is_empty() || !run.inserts.is_empty()) {
            // The key changed within the batch: what is pending goes first.
            self.flush().await?;
        }
        let run = self.runs.entry(target).or_default();
        run.key = key.clone();
        match env.op {
            Op::Delete => {
                let Some(before) = &env.before else {
                    return Ok(Some(
                        "a delete without its key (before) cannot be applied".into(),
                    ));
                };
                if key.is_empty() {
                    return Ok(Some(format!(
                        "{}.{} has no key: deletes cannot be replicated (give the table a primary key)",
                        src.schema, src.table
                    )));
                }
                let k = key_of_map(before, &env.key, &key);
                let Some(k) = k else {
                    return Ok(Some("the delete's before image lacks key columns".into()));
                };
                let id = key_id(&k);
                run.rows.insert(id, Change::Delete { key: k });
                Ok(None)
            }
            Op::Create | Op::Update | Op::Read => {
                let Some(after) = &e.after_json else {
                    return Ok(Some("a row event without its after image".into()));
                };
                let raw: BTreeMap<String, Box<RawValue>> = serde_json::from_str(after.get())
                    .map_err(|err| {
                        Failure::Definite(format!("the after image is not a JSON object: {err}"))
                    })?;
                let mut values = BTreeMap::new();
                for (n, v) in raw {
                    if let Some(current) = rename(&n) {
                        values.insert(current, v);
                    }
                }
                let mut keep: BTreeSet<String> = env
                    .unchanged_toast
                    .iter()
                    .filter_map(|c| rename(c))
                    .collect();
                for c in &keep {
                    values.remove(c);
                }
                if key.is_empty() {
                    if env.op == Op::Update {
                        return Ok(Some(format!(
                            "{}.{} has no key: updates cannot be replicated (give the table a primary key)",
                            src.schema, src.table
                        )));
                    }
                    run.inserts.push(values);
                    return Ok(None);
                }
                let mut k = Vec::with_capacity(key.len());
                for c in &key {
                    let Some(v) = values.get(c) else {
                        return Ok(Some(format!("the row lacks its key column {c:?}")));
                    };
                    k.push((c.clone(), canonical(v.get())));
                }
                // An update that moved the row to another key: the producer wrote the old key's
                // delete as an event of its own, on the old key's partition, in order with the
                // old key's other changes (deleting it here could delete a newer row of that
                // key). Values left unchanged in TOAST are not in the log for the new key's
                // row, which does not exist in the target yet: refused, not written as nulls.
                if env.op == Op::Update
                    && !keep.is_empty()
                    && let Some(before) = &env.before
                    && key_of_map(before, &env.key, &key).is_some_and(|old| old != k)
                {
                    return Ok(Some(format!(
                        "{}.{}: an update that changed the key left {} unchanged in TOAST, whose \
                         values the log does not carry; set REPLICA IDENTITY FULL on the source \
                         table to replicate such updates",
                        src.schema,
                        src.table,
                        keep.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                let id = key_id(&k);
                if let Some(Change::Upsert { values: prev, .. }) = run.rows.get_mut(&id) {
                    // An unchanged TOAST value keeps what an earlier change of the batch set.
                    let mut still = BTreeSet::new();
                    for c in &keep {
                        match prev.remove(c) {
                            Some(v) => {
                                values.insert(c.clone(), v);
                            }
                            None => {
                                still.insert(c.clone());
                            }
                        }
                    }
                    keep = still;
                }
                run.rows.insert(id, Change::Upsert { values, keep });
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// A truncate is written to every partition; the first copy applied truncates (every
    /// partition is then before its own copy, so everything applied so far is older), later
    /// copies are skipped, and so are row changes from before it that partitions behind their
    /// copy still bring.
    async fn truncate(&mut self, e: &Event) -> Result<(), Failure> {
        self.flush().await?;
        let src = &e.envelope.source;
        let at = (src.commit_lsn, src.seq);
        let db = src.db.clone();
        let Some(source) = self.source(&src.db, &src.schema, &src.table).await? else {
            return Ok(());
        };
        let target = source.target.clone();
        let oid = source.known.as_ref().map(|k| k.oid);
        let session = &*self.db().await?;
        if let Some(oid) = oid {
            // The truncate position as committed (another member may have applied a copy).
            client::lock_table(session, oid).await?;
            let fresh = client::replicated(session, &db, Some(oid), ("", "")).await?;
            if fresh.as_ref().is_some_and(|k| k.dropped) {
                return Ok(());
            }
            if fresh.as_ref().is_some_and(|k| k.truncated >= at) {
                if let Some(Some(k)) = self
                    .sources
                    .get_mut(&(db.clone(), src.schema.clone(), src.table.clone()))
                    .map(|s| s.known.as_mut())
                {
                    k.truncated = k.truncated.max(fresh.map_or(at, |f| f.truncated));
                }
                return Ok(());
            }
        }
        if let Some(Some(k)) = self
            .sources
            .get_mut(&(db.clone(), src.schema.clone(), src.table.clone()))
            .map(|s| s.known.as_mut())
        {
            k.truncated = at;
        }
        let sql = format!("TRUNCATE {}", qualified(&target.0, &target.1));
        session
            .batch_execute(&sql)
            .await
            .map_err(|err| statement_failure(&err, &sql))?;
        if let Some(oid) = oid {
            client::truncated(session, &db, oid, at).await?;
        }
        Ok(())
    }

    /// Applies the events `which` selects, in order; their verdicts go into `verdicts`.
    async fn apply(
        &mut self,
        events: &[Event],
        which: &[bool],
        verdicts: &mut [Verdict],
    ) -> Result<(), Failure> {
        for (i, e) in events.iter().enumerate() {
            if !which[i] {
                continue;
            }
            let tp: Tp = (Arc::clone(&e.topic), e.partition);
            let open = self
                .open
                .as_mut()
                .ok_or_else(|| Failure::Transient("no transaction".into()))?;
            let part = open.parts.entry(tp).or_default();
            if e.offset < part.next {
                self.metrics.replays_skipped.inc();
                continue;
            }
            part.next = e.offset + 1;
            part.handled += 1;
            part.first.get_or_insert(e.offset);
            open.newest_ts_ms = open.newest_ts_ms.max(e.envelope.ts_ms);
            let env = &e.envelope;
            let selected = self
                .settings
                .tables
                .matches(&env.source.schema, &env.source.table)
                || env
                    .ddl
                    .as_ref()
                    .and_then(|d| d.previous.as_ref())
                    .is_some_and(|p| self.settings.tables.matches(&p.schema, &p.table));
            if !selected {
                continue;
            }
            let refused = match env.op {
                Op::Create | Op::Update | Op::Delete | Op::Read => {
                    let r = self.stage_row(e).await?;
                    if r.is_none() {
                        self.metrics.rows.with_label_values(&[env.op.code()]).inc();
                    }
                    r
                }
                Op::Truncate => {
                    self.truncate(e).await?;
                    self.metrics.rows.with_label_values(&["t"]).inc();
                    None
                }
                Op::Ddl => match &env.ddl {
                    Some(ch) => self.schema_change(e, ch).await?,
                    None => Some("a schema event without its schema".into()),
                },
                Op::SnapshotStart | Op::SnapshotEnd => None,
            };
            if let Some(reason) = refused {
                verdicts[i] = Verdict::Rejected(reason);
            }
        }
        Ok(())
    }

    async fn write_once(&mut self, events: &[Event]) -> Result<Vec<Verdict>, Failure> {
        // A session, without waiting for the statements still running on it: this batch is
        // staged meanwhile (anything that needs the session waits for them).
        if self.session.as_ref().is_none_or(|c| c.is_closed()) {
            self.db().await?;
        }
        let mut verdicts = vec![Verdict::Applied; events.len()];
        if events.is_empty() {
            return Ok(verdicts);
        }
        if self.open.is_none() {
            self.begin().await?;
        } else if let Some(o) = self.open.as_mut() {
            o.carried = true;
        }
        let parts: BTreeSet<Tp> = events
            .iter()
            .map(|e| (Arc::clone(&e.topic), e.partition))
            .collect();
        self.lock(&parts).await?;
        // Per partition: its last event's source transaction may continue in the next batch
        // (the tail), unless it is a snapshot row or a marker.
        let mut last: HashMap<Tp, usize> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            last.insert((Arc::clone(&e.topic), e.partition), i);
        }
        let now = Instant::now();
        for tp in last.keys() {
            self.seen.insert(tp.clone(), now);
        }
        let mut tail_lsn: HashMap<Tp, u64> = HashMap::new();
        for (tp, i) in &last {
            let env = &events[*i].envelope;
            if !streamed(env.op, env.source.snapshot) {
                continue;
            }
            tail_lsn.insert(tp.clone(), env.source.commit_lsn);
        }
        let mut in_tail = vec![false; events.len()];
        let mut closed: HashSet<Tp> = HashSet::new();
        for (i, e) in events.iter().enumerate().rev() {
            let tp: Tp = (Arc::clone(&e.topic), e.partition);
            if closed.contains(&tp) {
                continue;
            }
            match tail_lsn.get(&tp) {
                Some(l)
                    if *l == e.envelope.source.commit_lsn
                        && streamed(e.envelope.op, e.envelope.source.snapshot) =>
                {
                    in_tail[i] = true;
                }
                _ => {
                    closed.insert(tp);
                }
            }
        }
        // The open transaction may commit once every source transaction it holds part of has
        // ended: a later event of its partition is in this batch.
        let open = self
            .open
            .as_ref()
            .ok_or_else(|| Failure::Transient("no transaction".into()))?;
        // A partition quiet for the idle spell holds no more of its last transaction (as for
        // the tick): a busy partition must not keep a quiet one's tail (a schema event's copy,
        // a partition since revoked) open.
        let seen = &self.seen;
        let ends = open.parts.iter().all(|(tp, part)| match part.tail {
            None => true,
            Some(l) => {
                events.iter().any(|e| {
                    e.topic == tp.0
                        && e.partition == tp.1
                        && (e.envelope.source.commit_lsn != l
                            || !streamed(e.envelope.op, e.envelope.source.snapshot))
                }) || (!last.contains_key(tp)
                    && seen.get(tp).is_none_or(|t| t.elapsed() >= self.idle_commit))
            }
        });
        let any_tail = in_tail.iter().any(|t| *t);
        // Committing costs a round of statements; under a steady stream the open transaction
        // goes on for a while (its statements run while the next batch is staged) and commits
        // at the first boundary once it is COMMIT_AFTER old.
        if ends && open.began.elapsed() >= COMMIT_AFTER {
            let head: Vec<bool> = in_tail.iter().map(|t| !*t).collect();
            self.apply(events, &head, &mut verdicts).await?;
            self.commit().await?;
            if any_tail {
                self.begin().await?;
                self.lock(&parts).await?;
                self.apply(events, &in_tail, &mut verdicts).await?;
            }
        } else {
            let all = vec![true; events.len()];
            self.apply(events, &all, &mut verdicts).await?;
        }
        // What this batch staged is written now, committed or not (the open transaction, not
        // this process, holds a long source transaction's rows), while the next batch is staged.
        self.flush_deferred().await?;
        if let Some(open) = self.open.as_mut() {
            for (tp, part) in open.parts.iter_mut() {
                // Partitions without events in this batch keep the tail they had.
                if last.contains_key(tp) {
                    part.tail = if part.handled > 0 {
                        tail_lsn.get(tp).copied()
                    } else {
                        None
                    };
                }
            }
            if open.parts.values().all(|p| p.handled == 0) && !open.carried {
                // Nothing but skipped replays: nothing to hold open.
                self.flush().await?;
                let session = &*self.db().await?;
                session.batch_execute("COMMIT").await?;
                self.open = None;
            }
        }
        Ok(verdicts)
    }
}

/// Runs statements one after the other, each with its JSON rows as `$1`.
async fn run_statements(
    session: &Client,
    statements: Vec<(String, String)>,
) -> Result<(), Failure> {
    for (sql, json) in statements {
        session
            .execute(&sql, &[&json])
            .await
            .map_err(|e| statement_failure(&e, &sql))?;
    }
    Ok(())
}

/// A statement's failure: transient (the connection) or definite, with the statement's
/// beginning and Postgres' message.
fn statement_failure(e: &tokio_postgres::Error, sql: &str) -> Failure {
    if client::transient(e) {
        return Failure::Transient(client::describe(e));
    }
    let head: String = sql.chars().take(200).collect();
    Failure::Definite(format!(
        "the target refused a statement: {}; statement: {head}",
        client::describe(e)
    ))
}

/// A streamed change (part of a source transaction), as opposed to a snapshot row or marker.
fn streamed(op: Op, snapshot: bool) -> bool {
    !snapshot && !op.is_snapshot_marker()
}

/// A JSON value's canonical text (so that a key reads the same from `before` and `after`).
fn canonical(raw: &str) -> String {
    serde_json::from_str::<Value>(raw)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| raw.to_string())
}

/// The key columns (`current` names) of an image whose columns are named as in the event
/// (`names`).
fn key_of_map(
    image: &serde_json::Map<String, Value>,
    names: &[String],
    current: &[String],
) -> Option<Vec<(String, String)>> {
    if names.len() != current.len() {
        return None;
    }
    names
        .iter()
        .zip(current)
        .map(|(n, c)| image.get(n).map(|v| (c.clone(), v.to_string())))
        .collect()
}

fn key_id(k: &[(String, String)]) -> String {
    let mut s = String::new();
    for (_, v) in k {
        s.push_str(v);
        s.push('\u{1}');
    }
    s
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn write(
        &mut self,
        events: &mut [Event],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Verdict>, SinkError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let carried = self.open.is_some();
            match self.write_once(events).await {
                Ok(v) => {
                    self.last_write = Instant::now();
                    return Ok(v);
                }
                Err(Failure::Definite(m)) => {
                    self.metrics.errors.with_label_values(&["definite"]).inc();
                    self.reset();
                    return Err(SinkError::Definite(m));
                }
                Err(Failure::Transient(m)) => {
                    self.metrics.errors.with_label_values(&["transient"]).inc();
                    self.reset();
                    if carried {
                        // The lost transaction held records of earlier batches, which are not
                        // kept in memory: a restart reads them again from Kafka's committed
                        // offset (the target skips what it had committed).
                        return Err(SinkError::Definite(format!(
                            "the target transaction holding earlier batches was lost ({m}); \
                             restart the replicator to resume from the last committed position"
                        )));
                    }
                    tracing::warn!(error = %m, "Target unavailable; retrying the batch.");
                    tokio::select! {
                        () = shutdown.cancelled() => return Err(SinkError::Interrupted),
                        () = tokio::time::sleep(backoff.next_wait()) => {}
                    }
                }
            }
        }
    }

    fn backlog(&self) -> Backlog {
        let mut b = Backlog::default();
        if let Some(open) = &self.open {
            for (tp, part) in &open.parts {
                if let Some(first) = part.first {
                    b.oldest.insert(tp.clone(), first);
                }
            }
        }
        b
    }

    async fn tick(&mut self, _shutdown: &CancellationToken) -> Result<(), SinkError> {
        if self.open.is_none() || self.last_write.elapsed() < self.idle_commit {
            return Ok(());
        }
        // Nothing came for a while: the stream holds no more of the open transaction's last
        // source transactions (see the module's "Consistency").
        match self.commit().await {
            Ok(()) => Ok(()),
            Err(Failure::Definite(m) | Failure::Transient(m)) => {
                self.metrics.errors.with_label_values(&["definite"]).inc();
                self.reset();
                Err(SinkError::Definite(format!(
                    "committing the target transaction failed ({m}); restart the replicator to \
                     resume from the last committed position"
                )))
            }
        }
    }
}
