//! Documents deleted by query rather than by id: what a truncate removes, and what the end of a
//! table's snapshot retires. Both apply what the batch holds before them first (the query must
//! see those writes), refresh the index, then `_delete_by_query` with `conflicts=proceed`.
//!
//! # Truncate
//!
//! A truncate deletes every document older than itself in commit order: a lower
//! `walrelay_version`, or the same (its own transaction) and a lower `walrelay_seq`, so a
//! truncate delivered again never removes newer rows.
//!
//! # Snapshot attempts
//!
//! A topic can hold several snapshots of a table: a producer killed mid-snapshot takes it
//! again under a new slot, and a slot re-created later snapshots again. Snapshot rows are
//! versioned by their attempt's consistent point, so a later attempt overwrites what earlier
//! ones (and their streams) wrote ([`super::encode`], "Versions"); but a row deleted between two
//! attempts is not in the later one, and nothing else would ever remove its document. The
//! producer frames each table's snapshot rows of an attempt with markers on every partition
//! (`walrelay_common::event`, "Snapshot markers"); `snapshot_start` needs nothing here.
//!
//! On a `snapshot_end` marker read from partition `p`, with consistent point `c`: what the batch
//! holds before it is applied, the table's index is refreshed, and its documents with
//! `walrelay_version < c` that partition `p` wrote (`walrelay_partition`, or documents from
//! before that field existed) are deleted ([`super::encode::retire_query`]). That is the retire
//! rule: **a document of the table not rewritten by the latest complete snapshot and not
//! changed since is removed**. Every row alive at `c` and keyed to `p` was rewritten with
//! version `c` before the marker (same partition, earlier offsets); every change after `c` has
//! a version at or above `c`; what remains below `c` from `p` is a row gone by `c`. Per
//! partition, so a consumer behind on another partition never loses rows: what partition `q`
//! wrote waits for `q`'s own marker, which follows `q`'s rows of the attempt. (Documents with
//! no partition field, written before it existed, are retired by the first marker of any
//! partition; one whose row's later snapshot copy is still unread on a partition behind
//! disappears until that copy is applied.) A marker delivered again deletes nothing new:
//! everything its partition wrote since has a version at or above `c`, and a replay re-applies
//! a contiguous run of offsets, so an earlier attempt's row it writes again is retired again by
//! the marker after it. A snapshot row the index refused (dead-lettered) rewrote nothing, so
//! its older document is retired too: the index never keeps a stale copy of a row.
//!
//! # Per-table topics
//!
//! With the producer's `--topic-routing per-table` and `--topic-pattern` here, partition `p`
//! above is partition `p` of the **table's own topic** (`<topic>.<schema>.<table>`), and
//! `walrelay_partition` records only the partition number, not the topic. That is still
//! unambiguous: an index holds one table (the index template names it), every event of that
//! table is in that one topic, so every document of the index was written from that topic and
//! "written from partition `p`" can only mean its partition `p`. The argument above carries
//! over as it is: the producer keeps the partition count and the key-to-partition mapping per
//! table topic, writes a table's snapshot rows to the partition their key maps to and its
//! markers to every partition of that topic after them, so on `p` of the table's topic every
//! row alive at `c` and keyed to `p` still precedes the end marker. Events of other tables, in
//! other topics, never reach this index, and their order relative to ours does not matter.
//!
//! What the rule does need is one ordered log per (table, partition). A table whose events are
//! split over two topics read together (a pattern matching both the single topic of
//! `--topic-routing single` and the per-table topics while a deployment switches, or a table
//! renamed between per-table topics whose index the new name takes along) has two logs behind
//! one partition number, with no order between them: a late event below `c` from the other
//! topic can bring back a row the marker retired, until the table's next snapshot. Truncates
//! (above) have the same limit. Switch layouts with a `reindex` over the new topics, or let
//! the consumer finish the old topic before the new one's snapshot ends.

use serde_json::json;
use tokio_util::sync::CancellationToken;
use walrelay_common::event::Envelope;

use super::encode::{self, SEQ_FIELD, VERSION_FIELD};
use super::sink::{Pending, SearchSink};
use crate::runtime::{SinkError, Verdict};

impl SearchSink {
    /// Deletes the documents of `target` older than `(version, seq)` in commit order; how many.
    async fn truncate(
        &self,
        target: &str,
        (version, seq): (i64, i64),
        shutdown: &CancellationToken,
    ) -> Result<u64, SinkError> {
        let client = self.client.clone();
        self.retrying(shutdown, || client.refresh(target)).await?;
        // Older transactions, and what this transaction wrote before the truncate.
        let query = json!({"bool": {"should": [
            {"range": {VERSION_FIELD: {"lt": version}}},
            {"bool": {"filter": [
                {"term": {VERSION_FIELD: version}},
                {"range": {SEQ_FIELD: {"lt": seq}}}
            ]}}
        ], "minimum_should_match": 1}});
        self.retrying(shutdown, || client.delete_by_query(target, query.clone()))
            .await
    }

    /// A truncate: what came before it is applied first, then documents older than it go.
    pub(super) async fn truncate_table(
        &self,
        p: &mut Pending,
        target: &str,
        version: (i64, i64),
        shutdown: &CancellationToken,
    ) -> Result<Verdict, SinkError> {
        self.flush(p, shutdown).await?;
        p.written.retain(|(index, _), _| index != target);
        let deleted = self.truncate(target, version, shutdown).await?;
        tracing::info!(index = %target, deleted, "Truncated.");
        Ok(Verdict::Applied)
    }

    /// A snapshot's end marker read from `partition`: what came before it is applied first,
    /// then the table's documents that partition wrote before the attempt's consistent point go
    /// (the module's "Snapshot attempts").
    pub(super) async fn retire(
        &self,
        p: &mut Pending,
        env: &Envelope,
        target: &str,
        partition: i32,
        shutdown: &CancellationToken,
    ) -> Result<Verdict, SinkError> {
        let Some(frame) = env.snapshot.as_ref() else {
            return Ok(Verdict::Rejected(
                "a snapshot_end marker without its snapshot frame".into(),
            ));
        };
        let Ok(consistent) = i64::try_from(frame.consistent_lsn) else {
            return Ok(Verdict::Rejected(format!(
                "consistent point {} does not fit a search version (2^63): the snapshot cannot be ordered in the index",
                frame.consistent_lsn
            )));
        };
        self.flush(p, shutdown).await?;
        p.written.retain(|(index, _), _| index != target);
        let client = self.client.clone();
        self.retrying(shutdown, || client.refresh(target)).await?;
        let query = encode::retire_query(consistent, partition);
        let deleted = self
            .retrying(shutdown, || client.delete_by_query(target, query.clone()))
            .await?;
        tracing::info!(
            table = %format_args!("{}.{}", env.source.schema, env.source.table),
            index = %target,
            attempt = %frame.attempt,
            consistent_lsn = frame.consistent_lsn,
            partition,
            deleted,
            "Snapshot end: retired the documents the attempt did not rewrite."
        );
        Ok(Verdict::Applied)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::{Value, json};
    use tokio_util::sync::CancellationToken;
    use walrelay_common::telemetry::Readiness;
    use walrelay_tests::opensearch::{Indexes, OpenSearch};

    use super::super::config::{OnDropTable, SearchAuth, SearchSettings};
    use super::super::sink::{Mode, SearchSink};
    use crate::metrics::Metrics;
    use crate::runtime::{Event, Sink, Verdict};

    /// An event of `public.t (id int, v text)` read from `partition`, decoded as the runtime
    /// decodes it.
    fn event(partition: i32, op: &str, commit_lsn: u64, row: Option<(i64, &str)>) -> Event {
        let marker = op.starts_with("snapshot_");
        let snapshot = op == "r" || marker;
        let mut env = json!({
            "op": op, "before": null, "after": row.map(|(id, v)| json!({"id": id, "v": v})),
            "source": {"version": "v", "connector": "walrelay", "db": "d", "schema": "public",
                       "table": "t", "lsn": commit_lsn, "commit_lsn": commit_lsn,
                       "txid": u64::from(!snapshot), "ts_ms": 0, "snapshot": snapshot,
                       "seq": u64::from(!snapshot)},
            "ts_ms": 0, "key": ["id"], "types": {"id": "integer", "v": "text"}
        });
        if marker {
            env["snapshot"] =
                json!({"attempt": format!("{commit_lsn:X}-0"), "consistent_lsn": commit_lsn});
        }
        let d = walrelay_common::codec::json::decode(env.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        Event {
            topic: Arc::from("t"),
            partition,
            offset: 0,
            envelope: d.envelope,
            after_json: d.after,
            raw: None,
        }
    }

    /// `v` of every document, by id.
    async fn values(indexes: &Indexes) -> BTreeMap<String, Value> {
        indexes
            .documents("public.t")
            .await
            .into_iter()
            .map(|(id, d)| (id, d["v"].clone()))
            .collect()
    }

    #[tokio::test]
    async fn an_end_marker_retires_what_its_partition_wrote_before_the_attempt() {
        let indexes = Indexes::new(&OpenSearch::shared().url());
        let settings = SearchSettings {
            url: indexes.url().parse().expect("url"),
            auth: SearchAuth::None,
            ca_pem: None,
            index_template: indexes.template(),
            on_drop_table: OnDropTable::Delete,
            retry_initial_backoff: Duration::from_millis(10),
            retry_max_backoff: Duration::from_millis(100),
        };
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let mut sink =
            SearchSink::new(&settings, Mode::Live, metrics, Readiness::default()).expect("sink");
        let stop = CancellationToken::new();
        // The first attempt (consistent point 100), cut short: rows 1 and 2 on partition 0,
        // 3 and 4 on partition 1.
        let mut first = vec![
            event(0, "snapshot_start", 100, None),
            event(1, "snapshot_start", 100, None),
            event(0, "r", 100, Some((1, "one"))),
            event(0, "r", 100, Some((2, "two"))),
            event(1, "r", 100, Some((3, "three"))),
            event(1, "r", 100, Some((4, "four"))),
        ];
        sink.write(&mut first, &stop).await.expect("write");
        // The second attempt (200): rows 2 and 4 were deleted in between, 1 was changed. Its
        // rows and partition 0's end marker in one batch: the rows are applied before the
        // marker retires.
        let mut second = vec![
            event(0, "snapshot_start", 200, None),
            event(1, "snapshot_start", 200, None),
            event(0, "r", 200, Some((1, "one, changed"))),
            event(1, "r", 200, Some((3, "three"))),
            event(0, "snapshot_end", 200, None),
        ];
        let verdicts = sink.write(&mut second, &stop).await.expect("write");
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Applied),
            "{verdicts:?}"
        );
        assert_eq!(
            values(&indexes).await,
            BTreeMap::from([
                ("1".into(), json!("one, changed")),
                ("3".into(), json!("three")),
                ("4".into(), json!("four")),
            ]),
            "partition 0's end retires 2; 4 waits for partition 1's own end"
        );
        // A change streamed after the snapshot, partition 1's end, then partition 0's end
        // delivered again: only 4 goes; the change stays.
        let mut later = vec![
            event(0, "u", 250, Some((1, "streamed"))),
            event(1, "snapshot_end", 200, None),
            event(0, "snapshot_end", 200, None),
        ];
        sink.write(&mut later, &stop).await.expect("write");
        assert_eq!(
            values(&indexes).await,
            BTreeMap::from([
                ("1".into(), json!("streamed")),
                ("3".into(), json!("three"))
            ])
        );
        // The stored versions are the commit LSNs: none went down (the real server refuses a
        // lower external version, so a regression would show as an older version here).
        assert_eq!(indexes.version("public.t", "1").await, Some(250));
        assert_eq!(indexes.version("public.t", "3").await, Some(200));
        assert_eq!(
            indexes.documents("public.t").await["3"]["walrelay_partition"],
            1,
            "documents record their partition"
        );
    }
}
