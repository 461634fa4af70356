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
//! # Several topics
//!
//! With `--topic-pattern` the build reads every topic the pattern selects, each from offset
//! zero (its group is new), and `S` and `H` above are end offsets of every selected topic's
//! partitions: the build is caught up when every partition of every topic selected at the
//! previous check is consumed to the end it had then. A topic created during the build is
//! counted from its appearance (the build's consumer subscribes to it within seconds); one
//! created after the swap is `index`'s alone, which reads it from its first offset. The
//! history check (offset zero still there) covers every selected topic.
//!
//! # Resuming
//!
//! Progress is a small state document (`walrelay-reindex-state/_doc/<group>`) with the
//! generation and the phase (`building`, `swapped`, `done`); the build group's committed
//! offsets are the rest. A rerun resumes the same generation and group: it keeps building, or
//! redoes the swap (it is idempotent: aliases already on the new index stay), or finishes the
//! hand-over and the clean-up. The live aliases move only after the build caught up, so they
//! never point at a half-built index.
//!
//! (Over the usual ~500 lines: the state, the offsets it compares and the build's monitor are
//! one algorithm, easier to check in one file.)

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
use crate::topics::Topics;

/// What a re-index works with.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The Kafka side (topics, and the base group the build's group is derived from).
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

/// A topic-partition.
type Tp = (String, i32);

/// Kafka offsets of the topics read and of the build group.
struct Offsets {
    client: BaseConsumer<QuietContext>,
    /// Looks past a gap between a committed offset and the end (see [`Offsets::behind`]).
    probe: BaseConsumer<QuietContext>,
    topics: Topics,
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
            topics: settings.runtime.topics.clone(),
        })
    }

    /// The partitions of every topic read, as the cluster lists them now.
    fn partitions(&self) -> Result<Vec<Tp>, ReindexError> {
        let parts: Vec<Tp> = self
            .topics
            .partitions(&self.client, Duration::from_secs(10))
            .map_err(|e| ReindexError::Kafka(format!("metadata of {}: {e}", self.topics)))?
            .into_iter()
            .flat_map(|(topic, ids)| ids.into_iter().map(move |p| (topic.clone(), p)))
            .collect();
        if parts.is_empty() {
            return Err(ReindexError::Kafka(match &self.topics {
                Topics::One(t) => format!("topic {t} does not exist"),
                Topics::Pattern(p) => format!(
                    "no topic matches --topic-pattern {:?} (side topics and Kafka's internal ones never do)",
                    p.as_str()
                ),
            }));
        }
        Ok(parts)
    }

    /// (earliest, end) per topic-partition.
    fn watermarks(&self) -> Result<BTreeMap<Tp, (i64, i64)>, ReindexError> {
        let mut out = BTreeMap::new();
        for (topic, p) in self.partitions()? {
            let w = self
                .client
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .map_err(|e| ReindexError::Kafka(format!("offsets of {topic}/{p}: {e}")))?;
            out.insert((topic, p), w);
        }
        Ok(out)
    }

    /// End offsets per topic-partition.
    fn ends(&self) -> Result<BTreeMap<Tp, i64>, ReindexError> {
        Ok(self
            .watermarks()?
            .into_iter()
            .map(|(tp, (_, end))| (tp, end))
            .collect())
    }

    /// The build group's committed offset per topic-partition (0 when none yet).
    fn committed(&self, partitions: &[&Tp]) -> Result<BTreeMap<Tp, i64>, ReindexError> {
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in partitions {
            tpl.add_partition(topic, *p);
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
                ((e.topic().to_string(), e.partition()), o)
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
    fn behind(&self, targets: &BTreeMap<Tp, i64>) -> Result<u64, ReindexError> {
        if targets.is_empty() {
            return Ok(0);
        }
        let parts: Vec<&Tp> = targets.keys().collect();
        let committed = self.committed(&parts)?;
        let mut total = 0;
        for (tp, end) in targets {
            let from = committed.get(tp).copied().unwrap_or(0);
            let gap = (end - from).max(0) as u64;
            if gap > 0 && !self.readable_from(tp, from)? {
                continue;
            }
            total += gap;
        }
        Ok(total)
    }

    /// Whether a `read_committed` reader finds a record at or after `offset` of `topic`'s
    /// partition `p`.
    fn readable_from(&self, (topic, p): &Tp, offset: i64) -> Result<bool, ReindexError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, *p, Offset::Offset(offset))
            .map_err(|e| ReindexError::Kafka(e.to_string()))?;
        self.probe
            .assign(&tpl)
            .map_err(|e| ReindexError::Kafka(format!("probing {topic}/{p}: {e}")))?;
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

#[derive(Debug, Clone, Default, PartialEq)]
struct State {
    generation: u32,
    phase: String,
    old: BTreeMap<String, Vec<String>>,
    handover: BTreeMap<Tp, i64>,
    swapped_at_ms: i64,
}

impl State {
    /// The state document; `handover` is `{topic: {partition: offset}}`.
    fn to_json(&self) -> Value {
        let mut handover: BTreeMap<&str, BTreeMap<String, i64>> = BTreeMap::new();
        for ((topic, p), o) in &self.handover {
            handover.entry(topic).or_default().insert(p.to_string(), *o);
        }
        json!({
            "generation": self.generation,
            "phase": self.phase,
            "old": self.old,
            "handover": handover,
            "swapped_at_ms": self.swapped_at_ms,
        })
    }

    /// Reads a state document; a `handover` written before topics were recorded
    /// (`{partition: offset}`) is of `topics`' one topic (with a pattern, whose topics it
    /// cannot name, it is read as empty: the hand-over phase then takes the current ends).
    fn from_json(v: &Value, topics: &Topics) -> Self {
        let mut handover = BTreeMap::new();
        for (key, value) in v["handover"].as_object().into_iter().flatten() {
            match (value, topics) {
                (Value::Object(partitions), _) => {
                    for (p, o) in partitions {
                        if let (Ok(p), Some(o)) = (p.parse(), o.as_i64()) {
                            handover.insert((key.clone(), p), o);
                        }
                    }
                }
                (Value::Number(o), Topics::One(topic)) => {
                    if let (Ok(p), Some(o)) = (key.parse(), o.as_i64()) {
                        handover.insert((topic.clone(), p), o);
                    }
                }
                _ => {}
            }
        }
        Self {
            generation: v["generation"]
                .as_u64()
                .and_then(|g| u32::try_from(g).ok())
                .unwrap_or(0),
            phase: v["phase"].as_str().unwrap_or_default().to_string(),
            old: serde_json::from_value(v["old"].clone()).unwrap_or_default(),
            handover,
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
        Some((_, doc)) => State::from_json(&Value::Object(doc), &settings.runtime.topics),
        None => State::default(),
    };
    if state.generation == 0 || state.phase == "done" {
        let source = Offsets::new(settings, &format!("{base_group}.reindex-probe"))?;
        let start = source.watermarks()?;
        for ((topic, partition), (earliest, _)) in &start {
            if *earliest > 0 {
                return Err(ReindexError::HistoryDeleted {
                    topic: topic.clone(),
                    partition: *partition,
                    earliest: *earliest,
                });
            }
        }
        let topics: std::collections::BTreeSet<&str> =
            start.keys().map(|(t, _)| t.as_str()).collect();
        tracing::info!(?topics, "Re-indexing from offset zero of every topic read.");
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
    let runtime = Runtime::new(
        settings.runtime,
        group,
        Arc::clone(&metrics),
        readiness,
        shutdown,
    )
    .await?;
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
        let mut previous_targets: Option<BTreeMap<Tp, i64>> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return Err(ReindexError::Interrupted),
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            let targets: BTreeMap<Tp, i64> = if state.phase == "building" {
                offsets.ends()?
            } else {
                if state.handover.is_empty() {
                    // Not recorded (see State::from_json): ends taken now are later, so safe.
                    state.handover = offsets.ends()?;
                }
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
                state.handover = offsets.ends()?;
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::topics::TopicPattern;

    #[test]
    fn the_hand_over_is_kept_per_topic_partition_and_old_documents_still_read() {
        let state = State {
            generation: 3,
            phase: "swapped".into(),
            old: BTreeMap::from([("public.a".into(), vec!["public.a-v2".into()])]),
            handover: BTreeMap::from([
                (("w.public.a".into(), 0), 5),
                (("w.public.a".into(), 1), 7),
                (("w.public.b".into(), 0), 2),
            ]),
            swapped_at_ms: 42,
        };
        let doc = state.to_json();
        assert_eq!(
            doc["handover"],
            json!({"w.public.a": {"0": 5, "1": 7}, "w.public.b": {"0": 2}})
        );
        let pattern = TopicPattern::new(r"w\.public\..*").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            State::from_json(&doc, &Topics::Pattern(pattern.clone())),
            state
        );
        // Written by a version that read one topic: partitions of that topic.
        let old = json!({"generation": 2, "phase": "swapped", "handover": {"0": 9, "1": 4}});
        let read = State::from_json(&old, &Topics::One("w".into()));
        assert_eq!(
            read.handover,
            BTreeMap::from([(("w".into(), 0), 9), (("w".into(), 1), 4)])
        );
        assert!(
            State::from_json(&old, &Topics::Pattern(pattern))
                .handover
                .is_empty(),
            "a pattern cannot name the old topic: the ends are taken again"
        );
    }
}
