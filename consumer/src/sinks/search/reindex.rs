//! Zero-downtime re-index: build `<alias>-v<G>` from offset zero with a fresh consumer group,
//! swap every alias in one `_aliases` request once caught up, finish the hand-over, then delete
//! the old indexes after a grace period.
//!
//! # Hand-over
//!
//! ```text
//!  topic:   0 ───────────────────────────── S ─────────── H ──────────▶
//!  build:   ├── writes <alias>-v<G> ─────────┼─────────────┤ stops at H
//!  index:   ── writes through <alias> ──▶ v<G-1> │ ──▶ v<G> (the alias moved at S)
//!                                          swap, then H = end offsets
//! ```
//!
//! The running `index` process writes through the alias, so from the swap on its writes land
//! in the new index without a restart. Anything it wrote before the swap went to the old index
//! only; all of that is below `H`, the end offsets read *after* the swap returned. The build
//! keeps consuming until its committed offsets reach `H`, so every event below `H` is in the new
//! index, and every event at or past `H` is written by `index` after the swap. Both writers use
//! external versions, so whichever writes a document last, the newest version stays.
//!
//! # Resuming
//!
//! Progress is a small state document (`walrelay-reindex-state/_doc/<group>`) with the
//! generation and the phase (`building`, `swapped`, `done`); the build group's committed
//! offsets are the rest. A rerun resumes the same generation and group: it keeps building, or
//! redoes the swap (it is idempotent: aliases already on the new index stay), or finishes the
//! hand-over and the clean-up. The live aliases move only after the build caught up, so they
//! never point at a half-built index.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use walrelay_common::clock::now_ms;
use walrelay_common::kafka::QuietContext;
use walrelay_common::telemetry::Readiness;

use super::client::{SearchClient, SearchError};
use super::config::{ReindexSettings, SearchSettings};
use super::encode::{generation_of, template_matches};
use super::sink::{Mode, SearchSink};
use crate::config::RuntimeSettings;
use crate::metrics::Metrics;
use crate::runtime::{Runtime, RuntimeError};

/// What a re-index works with.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The Kafka side (topic, and the base group the build's group is derived from).
    pub runtime: &'a RuntimeSettings,
    /// The search sink.
    pub search: &'a SearchSettings,
    /// The re-index's own settings.
    pub reindex: &'a ReindexSettings,
}

/// Index holding re-index progress documents.
pub const STATE_INDEX: &str = "walrelay-reindex-state";

/// Why a re-index stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReindexError {
    /// The topic's history was deleted: a replay cannot rebuild the index. Definite.
    #[error(
        "topic {topic} partition {partition} starts at offset {earliest}, not 0: its history was deleted (retention), \
         so a replay cannot rebuild the index. Keep the topic's retention unlimited (the producer creates it so), \
         or take a new snapshot into a new topic and re-index from that"
    )]
    HistoryDeleted {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Its earliest offset.
        earliest: i64,
    },
    /// Kafka metadata or offsets could not be read.
    #[error("Kafka: {0}")]
    Kafka(String),
    /// The search service failed.
    #[error(transparent)]
    Search(#[from] SearchError),
    /// The build's consumer stopped.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Shutdown came first; a rerun resumes.
    #[error("interrupted; run reindex again to resume")]
    Interrupted,
}

/// Kafka offsets of the topic and of the build group.
struct Offsets {
    client: BaseConsumer<QuietContext>,
    /// Looks past a gap between a committed offset and the end (see [`Offsets::behind`]).
    probe: BaseConsumer<QuietContext>,
    topic: String,
}

impl Offsets {
    fn new(settings: &Job<'_>, group: &str) -> Result<Self, ReindexError> {
        let client = crate::runtime::consumer_config(settings.runtime, group)
            .create_with_context(QuietContext)
            .map_err(|e| ReindexError::Kafka(e.to_string()))?;
        let probe = crate::runtime::consumer_config(settings.runtime, &format!("{group}-probe"))
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create_with_context(QuietContext)
            .map_err(|e| ReindexError::Kafka(e.to_string()))?;
        Ok(Self {
            client,
            probe,
            topic: settings.runtime.topic.clone(),
        })
    }

    fn partitions(&self) -> Result<Vec<i32>, ReindexError> {
        let md = self
            .client
            .fetch_metadata(Some(&self.topic), Duration::from_secs(10))
            .map_err(|e| ReindexError::Kafka(format!("metadata of {}: {e}", self.topic)))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if parts.is_empty() {
            return Err(ReindexError::Kafka(format!(
                "topic {} does not exist",
                self.topic
            )));
        }
        Ok(parts)
    }

    /// (earliest, end) per partition.
    fn watermarks(&self) -> Result<BTreeMap<i32, (i64, i64)>, ReindexError> {
        let mut out = BTreeMap::new();
        for p in self.partitions()? {
            let w = self
                .client
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                .map_err(|e| ReindexError::Kafka(format!("offsets of {}/{p}: {e}", self.topic)))?;
            out.insert(p, w);
        }
        Ok(out)
    }

    /// The build group's committed offset per partition (0 when none yet).
    fn committed(&self, partitions: &[i32]) -> Result<BTreeMap<i32, i64>, ReindexError> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let got = self
            .client
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| ReindexError::Kafka(format!("committed offsets: {e}")))?;
        Ok(got
            .elements()
            .iter()
            .map(|e| {
                let o = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                (e.partition(), o)
            })
            .collect())
    }

    /// Offsets between the committed offsets and `targets` that hold events to build.
    ///
    /// A topic written with Kafka transactions (`--delivery exactly-once`) ends with a commit
    /// or abort marker, and may hold aborted records: offsets a `read_committed` consumer never
    /// receives, so its committed offset stops short of the end for good. Where a gap remains,
    /// a probe reads from the committed offset: if the first thing it meets is the partition's
    /// end, nothing in the gap is to be built.
    fn behind(&self, targets: &BTreeMap<i32, i64>) -> Result<u64, ReindexError> {
        let parts: Vec<i32> = targets.keys().copied().collect();
        let committed = self.committed(&parts)?;
        let mut total = 0;
        for (p, end) in targets {
            let from = committed.get(p).copied().unwrap_or(0);
            let gap = (end - from).max(0) as u64;
            if gap > 0 && !self.readable_from(*p, from)? {
                continue;
            }
            total += gap;
        }
        Ok(total)
    }

    /// Whether a `read_committed` reader finds a record at or after `offset` of partition `p`.
    fn readable_from(&self, p: i32, offset: i64) -> Result<bool, ReindexError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, p, Offset::Offset(offset))
            .map_err(|e| ReindexError::Kafka(e.to_string()))?;
        self.probe
            .assign(&tpl)
            .map_err(|e| ReindexError::Kafka(format!("probing {}/{p}: {e}", self.topic)))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.probe.poll(Duration::from_millis(100)) {
                Some(Ok(_)) => return Ok(true),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(false),
                Some(Err(_)) | None => {}
            }
        }
        // Undecided: count the gap (the check runs again shortly).
        Ok(true)
    }
}

#[derive(Debug, Clone, Default)]
struct State {
    generation: u32,
    phase: String,
    old: BTreeMap<String, Vec<String>>,
    handover: BTreeMap<i32, i64>,
    swapped_at_ms: i64,
}

impl State {
    fn to_json(&self) -> Value {
        json!({
            "generation": self.generation,
            "phase": self.phase,
            "old": self.old,
            "handover": self.handover.iter().map(|(p, o)| (p.to_string(), *o)).collect::<BTreeMap<_, _>>(),
            "swapped_at_ms": self.swapped_at_ms,
        })
    }

    fn from_json(v: &Value) -> Self {
        Self {
            generation: v["generation"]
                .as_u64()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0),
            phase: v["phase"].as_str().unwrap_or_default().to_string(),
            old: serde_json::from_value(v["old"].clone()).unwrap_or_default(),
            handover: v["handover"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(p, o)| Some((p.parse().ok()?, o.as_i64()?)))
                .collect(),
            swapped_at_ms: v["swapped_at_ms"].as_i64().unwrap_or(0),
        }
    }
}

/// Runs a re-index to the end (or until `shutdown`).
pub async fn run(
    settings: &Job<'_>,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), ReindexError> {
    let search = settings.search;
    let client = SearchClient::new(search)?;
    let base_group = &settings.runtime.group;
    let mut state = match client.get_doc(STATE_INDEX, base_group).await? {
        Some((_, doc)) => State::from_json(&Value::Object(doc)),
        None => State::default(),
    };
    if state.generation == 0 || state.phase == "done" {
        let source = Offsets::new(settings, &format!("{base_group}.reindex-probe"))?;
        for (partition, (earliest, _)) in source.watermarks()? {
            if earliest > 0 {
                return Err(ReindexError::HistoryDeleted {
                    topic: settings.runtime.topic.clone(),
                    partition,
                    earliest,
                });
            }
        }
        // Only this deployment's aliases count: others may share the cluster.
        let current = client
            .all_aliases()
            .await?
            .iter()
            .filter(|(_, alias)| template_matches(&search.index_template, alias))
            .filter_map(|(index, alias)| generation_of(alias, index))
            .max()
            .unwrap_or(0);
        state = State {
            generation: (current + 1).max(2),
            phase: "building".into(),
            ..State::default()
        };
        client
            .put_doc(STATE_INDEX, base_group, &state.to_json())
            .await?;
        tracing::info!(generation = state.generation, "Re-index started.");
    } else {
        tracing::info!(generation = state.generation, phase = %state.phase, "Resuming the re-index.");
    }
    let group = format!("{base_group}.reindex-v{}", state.generation);
    let offsets = Offsets::new(settings, &group)?;

    if state.phase != "done" {
        build(
            settings, &client, &offsets, &group, &mut state, metrics, readiness, &shutdown,
        )
        .await?;
    }
    if state.phase == "swapped" {
        let waited = Duration::from_millis((now_ms() - state.swapped_at_ms).max(0) as u64);
        let rest = settings.reindex.grace_period.saturating_sub(waited);
        if !rest.is_zero() {
            tracing::info!(
                grace_s = rest.as_secs(),
                "Waiting out the grace period before deleting the old indexes."
            );
            tokio::select! {
                () = shutdown.cancelled() => return Err(ReindexError::Interrupted),
                () = tokio::time::sleep(rest) => {}
            }
        }
        for (alias, olds) in &state.old {
            for old in olds {
                if settings.reindex.keep_old {
                    tracing::info!(%alias, index = %old, "Keeping the old index (--keep-old).");
                } else {
                    client.delete_index(old).await?;
                    tracing::info!(%alias, index = %old, "Deleted the old index.");
                }
            }
        }
        state.phase = "done".into();
        client
            .put_doc(STATE_INDEX, base_group, &state.to_json())
            .await?;
    }
    tracing::info!(generation = state.generation, "Re-index finished.");
    Ok(())
}

/// Builds until caught up, swaps, and consumes to the hand-over offsets.
#[allow(clippy::too_many_arguments)]
async fn build(
    settings: &Job<'_>,
    client: &SearchClient,
    offsets: &Offsets,
    group: &str,
    state: &mut State,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: &CancellationToken,
) -> Result<(), ReindexError> {
    let search = settings.search;
    let mut sink = SearchSink::new(
        search,
        Mode::Build {
            generation: state.generation,
        },
        Arc::clone(&metrics),
        readiness.clone(),
    )?;
    let tables = sink.tables_handle();
    let runtime = Runtime::new(settings.runtime, group, Arc::clone(&metrics), readiness).await?;
    let stop = shutdown.child_token();
    let runner = {
        let stop = stop.clone();
        async move {
            let r = runtime.run(&mut sink, &stop).await;
            stop.cancel();
            r
        }
    };
    let monitor = async {
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut last_behind: Option<(Instant, u64)> = None;
        let mut previous_targets: Option<BTreeMap<i32, i64>> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Err(ReindexError::Interrupted),
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let targets: BTreeMap<i32, i64> = if state.phase == "building" {
                offsets
                    .watermarks()?
                    .into_iter()
                    .map(|(p, (_, end))| (p, end))
                    .collect()
            } else {
                state.handover.clone()
            };
            let behind = offsets.behind(&targets)?;
            metrics.reindex_lag_messages.set(behind as i64);
            if last_log.elapsed() >= settings.reindex.progress_interval {
                let rate = last_behind.map_or(0.0, |(t, b): (Instant, u64)| {
                    (b as f64 - behind as f64).max(0.0) / t.elapsed().as_secs_f64().max(0.001)
                });
                let eta_s = if rate > 0.0 {
                    (behind as f64 / rate).round()
                } else {
                    -1.0
                };
                tracing::info!(phase = %state.phase, lag = behind, events_per_s = rate.round(), eta_s, elapsed_s = started.elapsed().as_secs(), "Re-index progress.");
                last_log = Instant::now();
                last_behind = Some((Instant::now(), behind));
            } else if last_behind.is_none() {
                last_behind = Some((Instant::now(), behind));
            }
            // Caught up: everything that existed at the previous check is built, and what came
            // since is within --caught-up-lag.
            let reached_previous = match &previous_targets {
                Some(prev) => offsets.behind(prev)? == 0,
                None => false,
            };
            let caught_up = reached_previous && behind <= settings.reindex.caught_up_lag;
            previous_targets = Some(targets);
            if state.phase == "building" && caught_up {
                swap(client, &tables_snapshot(&tables), state).await?;
                state.handover = offsets
                    .watermarks()?
                    .into_iter()
                    .map(|(p, (_, end))| (p, end))
                    .collect();
                state.phase = "swapped".into();
                state.swapped_at_ms = now_ms();
                client
                    .put_doc(STATE_INDEX, &settings.runtime.group, &state.to_json())
                    .await?;
                tracing::info!(handover = ?state.handover, "Aliases swapped; finishing the hand-over.");
                continue;
            }
            if state.phase == "swapped" && behind == 0 {
                // Tables first seen after the swap get their alias now.
                swap(client, &tables_snapshot(&tables), state).await?;
                client
                    .put_doc(STATE_INDEX, &settings.runtime.group, &state.to_json())
                    .await?;
                return Ok(());
            }
        }
    };
    let (ran, monitored) = tokio::join!(runner, async {
        let r = monitor.await;
        stop.cancel();
        r
    });
    ran?;
    match monitored {
        Err(ReindexError::Interrupted) if !shutdown.is_cancelled() => Ok(()),
        other => other,
    }
}

fn tables_snapshot(
    tables: &std::sync::Mutex<BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    walrelay_common::sync::lock(tables).clone()
}

/// Points every alias at its new index in one request; remembers the old ones.
async fn swap(
    client: &SearchClient,
    built: &BTreeMap<String, String>,
    state: &mut State,
) -> Result<(), ReindexError> {
    let mut actions = Vec::new();
    for (alias, new_index) in built {
        let current = client.alias_targets(alias).await?.unwrap_or_default();
        for old in current.iter().filter(|i| *i != new_index) {
            actions.push(json!({"remove": {"index": old, "alias": alias}}));
            let olds = state.old.entry(alias.clone()).or_default();
            if !olds.contains(old) {
                olds.push(old.clone());
            }
        }
        if !current.contains(new_index) {
            actions.push(json!({"add": {"index": new_index, "alias": alias}}));
        }
    }
    if actions.is_empty() {
        return Ok(());
    }
    client.update_aliases(actions).await?;
    for (alias, new_index) in built {
        tracing::info!(%alias, index = %new_index, "Alias now points at the new index.");
    }
    Ok(())
}
