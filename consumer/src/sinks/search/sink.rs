//! The search sink itself: how a batch of events becomes `_bulk` requests and verdicts.
//!
//! Per event: inserts, updates and snapshot rows index the `after` image; an update that
//! changed the key also deletes the old id; deletes delete; a truncate, and the end marker of a
//! table's snapshot, delete by query what is older than themselves ([`super::sweep`]).
//! Unchanged TOAST columns are taken from the stored document (or from an earlier write of the
//! same batch); the update API cannot carry external versions, so the partial update is a read,
//! merge and versioned write. Schema events and tables' indexes are handled in
//! [`super::indexes`]; a snapshot's start marker needs nothing.
//!
//! Per bulk item: 2xx done; 404 on a delete done (already gone); 409 stale (done); 429 and 5xx
//! retried with exponential backoff and jitter (whole-request 429s honour `Retry-After`);
//! anything else rejects the event, which the runtime dead-letters with the item's reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use walrelay_common::event::{Envelope, Op};
use walrelay_common::retry::Backoff;
use walrelay_common::telemetry::Readiness;

use super::client::{BulkItem, SearchClient, SearchError};
use super::config::SearchSettings;
use super::encode::{self, Stamp};
use super::table::TableIndex;
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

/// One bulk action and the event it serves.
struct Action {
    event: usize,
    lines: Vec<u8>,
}

/// What one `write` has built so far.
pub(super) struct Pending {
    /// Each event's verdict, once known (an event without one was applied).
    verdicts: Vec<Option<Verdict>>,
    /// Bulk actions not sent yet.
    actions: Vec<Action>,
    /// The latest source written in this batch per (index, id); `None` once deleted.
    pub(super) written: HashMap<(String, String), Option<Box<RawValue>>>,
}

/// The search sink.
pub struct SearchSink {
    pub(super) client: SearchClient,
    pub(super) settings: SearchSettings,
    pub(super) mode: Mode,
    pub(super) tables: HashMap<String, TableIndex>,
    /// Alias per schema and table, rendered once.
    pub(super) aliases: HashMap<String, HashMap<String, String>>,
    /// Alias → index written, shared with the re-index command.
    pub(super) seen: Arc<Mutex<BTreeMap<String, String>>>,
    pub(super) metrics: Arc<Metrics>,
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
    pub(super) async fn retrying<T, F, Fut>(
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
            let retry = self.send_once(&remaining, verdicts, shutdown).await?;
            // Keep only the failed actions, in their order.
            let mut keep = vec![false; remaining.len()];
            for i in retry {
                keep[i] = true;
            }
            remaining = std::mem::take(&mut remaining)
                .into_iter()
                .zip(keep)
                .filter_map(|(a, k)| k.then_some(a))
                .collect();
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

    /// One pass over `actions`, in bulk requests of at most [`MAX_BULK_BYTES`]; returns the
    /// positions of the items to retry (429, 5xx).
    async fn send_once(
        &self,
        actions: &[Action],
        verdicts: &mut [Option<Verdict>],
        shutdown: &CancellationToken,
    ) -> Result<Vec<usize>, SinkError> {
        let mut retry = Vec::new();
        let mut start = 0;
        while start < actions.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < actions.len()
                && (end == start || bytes + actions[end].lines.len() <= MAX_BULK_BYTES)
            {
                bytes += actions[end].lines.len();
                end += 1;
            }
            let chunk = &actions[start..end];
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
                match self.item_verdict(action, item) {
                    Some(verdict) => combine(&mut verdicts[action.event], verdict),
                    None => retry.push(start + j),
                }
            }
            start = end;
        }
        Ok(retry)
    }

    /// What a bulk item's answer means for its event; `None`: retry it.
    fn item_verdict(&self, action: &Action, item: BulkItem) -> Option<Verdict> {
        let kind = match item.status {
            200..=299 => return Some(Verdict::Applied),
            404 if action.lines.starts_with(b"{\"delete\"") => return Some(Verdict::Applied),
            409 => return Some(Verdict::Stale),
            429 => "item_throttled",
            500..=599 => "item_server",
            status => {
                self.metrics
                    .sink_errors
                    .with_label_values(&["search", "rejected"])
                    .inc();
                return Some(Verdict::Rejected(format!(
                    "{status} {}",
                    item.error.unwrap_or_else(|| "no reason given".into())
                )));
            }
        };
        self.metrics
            .sink_errors
            .with_label_values(&["search", kind])
            .inc();
        None
    }

    /// Sends what the batch has built so far (before a write that must see it applied).
    pub(super) async fn flush(
        &self,
        p: &mut Pending,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        self.send(std::mem::take(&mut p.actions), &mut p.verdicts, shutdown)
            .await
    }

    /// An insert, update or snapshot row: queues its index action (and, for an update that
    /// changed the key, the old document's delete); `Some` when the verdict is known now.
    async fn upsert(
        &self,
        p: &mut Pending,
        (i, stamp): (usize, Stamp),
        env: &Envelope,
        raw: Option<Box<RawValue>>,
        (target, renames): (String, Option<Arc<HashMap<String, String>>>),
        shutdown: &CancellationToken,
    ) -> Result<Option<Verdict>, SinkError> {
        let Some(raw) = raw else {
            return Ok(Some(Verdict::Rejected(
                "insert or update without an after image".into(),
            )));
        };
        let v = stamp.version;
        if env.unchanged_toast.is_empty() && renames.is_none() {
            match encode::forward(env, &raw, &target, stamp) {
                Some(Ok(doc)) => {
                    if let Some((old, lines)) = doc.old {
                        p.actions.push(Action { event: i, lines });
                        p.written.insert((target.clone(), old), None);
                    }
                    p.actions.push(Action {
                        event: i,
                        lines: doc.lines,
                    });
                    p.written.insert((target, doc.id), Some(raw));
                    return Ok(None);
                }
                Some(Err(why)) => return Ok(Some(Verdict::Rejected(why))),
                None => {}
            }
        }
        let renames = renames.as_deref();
        let (id, mut source) = match encode::source_of(env, &raw, renames) {
            Ok(doc) => doc,
            Err(why) => return Ok(Some(Verdict::Rejected(why))),
        };
        if !env.unchanged_toast.is_empty() {
            let key = (target.clone(), id.clone());
            let stored = match p.written.get(&key) {
                Some(known) => known
                    .as_ref()
                    .and_then(|r| serde_json::from_str::<Map<String, Value>>(r.get()).ok()),
                None => {
                    // The stored document must reflect everything before this event.
                    self.flush(p, shutdown).await?;
                    let client = self.client.clone();
                    match self
                        .retrying(shutdown, || client.get_doc(&target, &id))
                        .await?
                    {
                        Some((stored_version, _)) if stored_version >= v => {
                            return Ok(Some(Verdict::Stale));
                        }
                        found => found.map(|(_, s)| s),
                    }
                }
            };
            for col in encode::keep_unchanged(&mut source, stored.as_ref(), env, renames) {
                self.metrics
                    .sink_errors
                    .with_label_values(&["search", "toast_unresolved"])
                    .inc();
                tracing::warn!(index = %target, %id, column = %col, "Unchanged TOAST value with no stored document to take it from; field left out.");
            }
        }
        if let Some((old, lines)) = encode::old_key_delete(env, &id, &target, v) {
            p.actions.push(Action { event: i, lines });
            p.written.insert((target.clone(), old), None);
        }
        let lines = match encode::index_lines(&mut source, &target, &id, stamp) {
            Ok(lines) => lines,
            Err(why) => return Ok(Some(Verdict::Rejected(why))),
        };
        p.actions.push(Action { event: i, lines });
        p.written
            .insert((target, id), serde_json::value::to_raw_value(&source).ok());
        Ok(None)
    }
}

/// Folds an action's verdict into its event's: a rejection wins, then an applied write.
fn combine(slot: &mut Option<Verdict>, verdict: Verdict) {
    *slot = Some(match (slot.take(), verdict) {
        (Some(r @ Verdict::Rejected(_)), _) | (_, r @ Verdict::Rejected(_)) => r,
        (Some(Verdict::Applied), _) | (_, Verdict::Applied) => Verdict::Applied,
        _ => Verdict::Stale,
    });
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
        let mut p = Pending {
            verdicts: vec![None; events.len()],
            actions: Vec::new(),
            written: HashMap::new(),
        };
        for (i, event) in events.iter_mut().enumerate() {
            let after = event.after_json.take();
            let partition = event.partition;
            let env = &event.envelope;
            if env.op == Op::Ddl {
                // Rows before it in this batch are written first; rows after it may need
                // the fields it maps.
                self.flush(&mut p, shutdown).await?;
                p.verdicts[i] = Some(self.apply_schema(env, shutdown).await?);
                continue;
            }
            if env.op == Op::SnapshotStart {
                // Nothing to do: the attempt's rows carry their version, its end retires.
                continue;
            }
            let (target, renames) = match self.table(env, shutdown).await? {
                Ok(t) => t,
                Err(why) => {
                    p.verdicts[i] = Some(Verdict::Rejected(why));
                    continue;
                }
            };
            let stamp = match Stamp::of(env, partition) {
                Ok(s) => s,
                Err(why) => {
                    p.verdicts[i] = Some(Verdict::Rejected(why));
                    continue;
                }
            };
            let verdict = match env.op {
                Op::Ddl | Op::SnapshotStart => None,
                Op::SnapshotEnd => Some(
                    self.retire(&mut p, env, &target, partition, shutdown)
                        .await?,
                ),
                Op::Truncate => Some(
                    self.truncate_table(&mut p, &target, (stamp.version, stamp.seq), shutdown)
                        .await?,
                ),
                Op::Delete => match encode::delete(env, &target, stamp.version) {
                    Ok((id, lines)) => {
                        p.actions.push(Action { event: i, lines });
                        p.written.insert((target, id), None);
                        None
                    }
                    Err(why) => Some(Verdict::Rejected(why)),
                },
                Op::Create | Op::Update | Op::Read => {
                    self.upsert(&mut p, (i, stamp), env, after, (target, renames), shutdown)
                        .await?
                }
            };
            if verdict.is_some() {
                p.verdicts[i] = verdict;
            }
        }
        self.send(p.actions, &mut p.verdicts, shutdown).await?;
        Ok(p.verdicts
            .into_iter()
            .map(|v| v.unwrap_or(Verdict::Applied))
            .collect())
    }
}
