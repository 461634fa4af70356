//! `--topic-pattern`: change events written straight into per-table topics
//! (`<t>.public.a`, `<t>.public.b`, the shape of the producer's `--topic-routing per-table`),
//! read by one `index` process and re-indexed by one `reindex` run. Side topics the pattern
//! matches are skipped; a matching topic created later is picked up; offsets are committed per
//! topic, so a restart applies only what came since; a dead letter names its own topic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::opensearch::{Indexes, OpenSearch};
use walrelay_tests::process::Proc;

use crate::{consumer_bin, metric_sum};

/// Partitions of every table topic.
const PARTITIONS: i32 = 2;

/// Topics, an index prefix and a group of the test's own, and a writer of envelopes.
struct Tables {
    broker: Arc<KafkaCluster>,
    search: Indexes,
    /// `<t>`: table topics are `<t>.public.<table>`.
    base: String,
    group: String,
    producer: FutureProducer,
    /// The next commit LSN (every event is its own transaction, in commit order).
    lsn: AtomicU64,
    logs: tempfile::TempDir,
}

impl Tables {
    fn new() -> Self {
        let broker = KafkaCluster::shared();
        let producer = broker.client_config().create().expect("producer");
        Self {
            search: Indexes::new(&OpenSearch::shared().url()),
            base: walrelay_tests::unique("pat").replace('_', "."),
            group: walrelay_tests::unique("grp"),
            producer,
            broker,
            lsn: AtomicU64::new(1000),
            logs: tempfile::tempdir().expect("log dir"),
        }
    }

    fn topic(&self, table: &str) -> String {
        format!("{}.public.{table}", self.base)
    }

    fn pattern(&self) -> String {
        format!(r"{}\.public\..*", regex::escape(&self.base))
    }

    fn dead_letter_topic(&self) -> String {
        format!("{}.dlq", self.base)
    }

    async fn create(&self, topic: &str, partitions: i32) {
        walrelay_common::kafka::ensure_topic(&self.broker.client_config(), topic, partitions)
            .await
            .unwrap_or_else(|e| panic!("create {topic}: {e}"));
    }

    /// Writes the insert (or, for an id seen before, the update) of row `id` of `table` with
    /// value `v` to the table's topic, on the partition its id picks.
    async fn upsert(&self, table: &str, id: i64, v: &str) {
        let lsn = self.lsn.fetch_add(16, Ordering::Relaxed);
        let envelope = json!({
            "op": "c", "before": null, "after": {"id": id, "v": v},
            "source": {"version": "test", "connector": "walrelay", "db": "d", "schema": "public",
                       "table": table, "lsn": lsn, "commit_lsn": lsn, "txid": lsn, "ts_ms": 0,
                       "snapshot": false, "seq": 0},
            "ts_ms": 0, "key": ["id"], "types": {"id": "integer", "v": "text"}
        });
        self.send(
            &self.topic(table),
            id.rem_euclid(i64::from(PARTITIONS)) as i32,
            &json!({ "id": id }).to_string(),
            &envelope.to_string(),
        )
        .await;
    }

    async fn send(&self, topic: &str, partition: i32, key: &str, value: &str) {
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(value)
                    .partition(partition),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce to {topic}: {e}"));
    }

    fn args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let pattern = self.pattern();
        let dlq = self.dead_letter_topic();
        let template = self.search.template();
        let mut args: Vec<String> = [
            command,
            "--kafka-brokers",
            &self.broker.brokers(),
            "--topic-pattern",
            &pattern,
            "--dead-letter-topic",
            &dlq,
            "--group",
            &self.group,
            "--search-url",
            self.search.url(),
            "--index-template",
            &template,
            "--batch-max-wait",
            "100ms",
            "--kafka-property",
            "session.timeout.ms=6000",
            "--kafka-property",
            "heartbeat.interval.ms=500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.broker.property_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn spawn(&self, command: &str, name: &str, extra: &[&str]) -> Proc {
        let log = self.logs.path().join(format!("{name}.log"));
        Proc::spawn(&consumer_bin(), &self.args(command, extra), &[], &log)
    }

    fn logs(&self) -> String {
        walrelay_tests::process::logs_tail(self.logs.path(), 60)
    }

    /// `v` of every document of `public.<table>`, by id.
    async fn values(&self, table: &str) -> BTreeMap<String, Value> {
        self.search
            .documents(&format!("public.{table}"))
            .await
            .into_iter()
            .map(|(id, d)| (id, d["v"].clone()))
            .collect()
    }

    async fn wait_values(&self, table: &str, want: &BTreeMap<String, Value>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.values(table).await;
            if &got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "public.{table} never held {want:?}; it holds {got:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// (topic, partition) → (committed offset of `group`, end offset), for `tables`.
    fn committed_and_ends(
        &self,
        group: &str,
        tables: &[&str],
    ) -> BTreeMap<(String, i32), (i64, i64)> {
        let client: BaseConsumer = self
            .broker
            .client_config()
            .set("group.id", group)
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for t in tables {
            for p in 0..PARTITIONS {
                tpl.add_partition(&self.topic(t), p);
            }
        }
        let committed = client
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        committed
            .elements()
            .iter()
            .map(|e| {
                let (_, end) = client
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
                    .expect("watermarks");
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                };
                ((e.topic().to_string(), e.partition()), (at, end))
            })
            .collect()
    }
}

fn expected(rows: &[(i64, &str)]) -> BTreeMap<String, Value> {
    rows.iter()
        .map(|(id, v)| (id.to_string(), json!(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_pattern_indexes_every_table_topic_commits_per_topic_and_reindexes_them_all() {
    let t = Tables::new();
    for table in ["a", "b"] {
        t.create(&t.topic(table), PARTITIONS).await;
    }
    // A side topic the pattern matches: junk there would be dead-lettered if it were read.
    let progress = format!("{}.public.a.progress", t.base);
    t.create(&progress, 1).await;
    t.send(&progress, 0, "p", "{not an envelope").await;

    let a: Vec<(i64, String)> = (1..=12).map(|i| (i, format!("a{i}"))).collect();
    let b: Vec<(i64, String)> = (1..=7).map(|i| (i, format!("b{i}"))).collect();
    for (id, v) in &a {
        t.upsert("a", *id, v).await;
    }
    for (id, v) in &b {
        t.upsert("b", *id, v).await;
    }
    let want = |rows: &[(i64, String)]| {
        expected(
            &rows
                .iter()
                .map(|(i, v)| (*i, v.as_str()))
                .collect::<Vec<_>>(),
        )
    };

    let port = walrelay_tests::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut indexer = t.spawn("index", "index-1", &["--metrics-addr", &metrics]);
    t.wait_values("a", &want(&a), Duration::from_secs(60)).await;
    t.wait_values("b", &want(&b), Duration::from_secs(60)).await;

    // A table topic created while the indexer runs is picked up.
    t.create(&t.topic("c"), PARTITIONS).await;
    let c: Vec<(i64, String)> = (1..=5).map(|i| (i, format!("c{i}"))).collect();
    for (id, v) in &c {
        t.upsert("c", *id, v).await;
    }
    t.wait_values("c", &want(&c), Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sum(port, "walrelay_consumer_assigned_partitions").await
        != Some(f64::from(3 * PARTITIONS))
    {
        assert!(
            Instant::now() < deadline,
            "the indexer never held the partitions of a, b and c (and nothing else)\n{}",
            t.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A dead letter names the topic its event was read from.
    t.send(&t.topic("b"), 1, "junk", "{not json").await;
    let reader: BaseConsumer = t
        .broker
        .client_config()
        .set("group.id", walrelay_tests::unique("dlq"))
        .create()
        .expect("consumer");
    let deadline = Instant::now() + Duration::from_secs(60);
    let dlq = loop {
        let md = reader.fetch_metadata(Some(&t.dead_letter_topic()), Duration::from_secs(5));
        if md.is_ok_and(|m| {
            m.topics()
                .first()
                .is_some_and(|x| !x.partitions().is_empty())
        }) {
            break t.dead_letter_topic();
        }
        assert!(Instant::now() < deadline, "no dead-letter topic");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut from_start = TopicPartitionList::new();
    from_start
        .add_partition_offset(&dlq, 0, Offset::Beginning)
        .expect("partition");
    reader.assign(&from_start).expect("assign");
    let mut letters: Vec<BTreeMap<String, String>> = Vec::new();
    while letters.is_empty() && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(500)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_string(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            letters.push(headers);
        }
    }
    assert_eq!(letters.len(), 1, "one letter\n{}", t.logs());
    assert_eq!(letters[0]["walrelay.dlq.topic"], t.topic("b"));
    assert_eq!(letters[0]["walrelay.dlq.partition"], "1");
    assert_eq!(letters[0]["walrelay.dlq.reason"], "decode");
    // Nothing else was dead-lettered: the side topic's junk was never read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        metric_sum(port, "walrelay_consumer_dead_letters_total").await,
        Some(1.0),
        "{}",
        t.logs()
    );

    // Offsets are committed per topic-partition, each up to its own end.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let offsets = t.committed_and_ends(&t.group, &["a", "b", "c"]);
        assert_eq!(offsets.len(), 3 * PARTITIONS as usize, "{offsets:?}");
        if offsets.values().all(|(at, end)| at == end) {
            assert!(
                offsets.values().all(|(_, end)| *end > 0),
                "every partition has events: {offsets:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "offsets never committed to the ends: {offsets:?}\n{}",
            t.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(indexer.terminate(), Some(0), "{}", t.logs());

    // Restarted, it applies what came since and nothing before it.
    let port = walrelay_tests::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut indexer = t.spawn("index", "index-2", &["--metrics-addr", &metrics]);
    let mut a = a.clone();
    a[0].1 = "a1 again".into();
    t.upsert("a", 1, "a1 again").await;
    t.upsert("c", 6, "c6").await;
    let mut c = c.clone();
    c.push((6, "c6".into()));
    t.wait_values("a", &want(&a), Duration::from_secs(60)).await;
    t.wait_values("c", &want(&c), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        metric_sum(port, "walrelay_consumer_events_total").await,
        Some(2.0),
        "only the two new events were applied after the restart\n{}",
        t.logs()
    );
    assert_eq!(indexer.terminate(), Some(0), "{}", t.logs());

    // A re-index reads every matched topic from offset zero and finishes.
    let mut reindex = t.spawn(
        "reindex",
        "reindex",
        &["--grace-period", "1s", "--progress-interval", "1s"],
    );
    let code = reindex
        .exit_within(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("reindex did not finish\n{}", t.logs()));
    assert_eq!(code, Some(0), "reindex failed\n{}", t.logs());
    for (table, rows) in [("a", &a), ("b", &b), ("c", &c)] {
        let alias = format!("public.{table}");
        assert_eq!(
            t.search.alias_targets(&alias).await,
            vec![format!("{alias}-v2")],
            "{}",
            t.logs()
        );
        assert_eq!(t.values(table).await, want(rows), "{alias} rebuilt");
    }
    let offsets = t.committed_and_ends(&format!("{}.reindex-v2", t.group), &["a", "b", "c"]);
    assert!(
        offsets.values().all(|(at, end)| at == end),
        "the build consumed every topic to its end: {offsets:?}"
    );
}
