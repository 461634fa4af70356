//! End-to-end tests of walrelay-consumer: a real Postgres 15 per test, the producer, and real
//! Apache Kafka and OpenSearch shared by the tests of this binary (unique topics, groups and
//! index prefixes). The search stand-in serves only the tests that need faults on cue (429s,
//! 5xx answers, slow answers).
//!
//! The producer binary is taken from the same target folder as the consumer's; `cargo test
//! --workspace` builds both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Map, Value};
use walrelay_common::event::Op;
use walrelay_tests::faultproxy::FaultProxy;
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::metrics;
use walrelay_tests::opensearch::{Indexes, OpenSearch};
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::Proc;
use walrelay_tests::search::{Faults, SearchStandIn};
use walrelay_tests::topic::Record;

mod avro;
mod deploy;
mod large;
mod live_view;
mod notify;
mod postgres_tls;
mod replicate;
mod secure_kafka;
mod stream;
mod topic_pattern;
mod types;
mod webhook_isolation;

fn consumer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walrelay-consumer"))
}

fn producer_bin() -> PathBuf {
    let p = consumer_bin().with_file_name("walrelay-producer");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p walrelay-producer` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// Where a test's indexes live: the shared OpenSearch node; that node behind a fault proxy of
/// the test's own (the consumers reach it only through the proxy, the test's own reads go
/// direct); a stand-in of the test's own for what a real node cannot do on cue (failing bulk
/// items, 429s); or none (a test of another sink). Names are a table's alias (`public.items`)
/// or an index (`public.items-v1`), without the test's prefix.
enum Search {
    Real(Indexes),
    Proxied(FaultProxy, Indexes),
    StandIn(SearchStandIn, Indexes),
    Absent,
}

/// A search call in a test that started no search server.
fn no_search() -> ! {
    panic!("this test started no search server (Stack::start_without_search)")
}

impl Search {
    fn indexes(&self) -> &Indexes {
        match self {
            Search::Real(i) | Search::Proxied(_, i) | Search::StandIn(_, i) => i,
            Search::Absent => no_search(),
        }
    }

    /// The URL the consumers are given.
    fn url(&self) -> String {
        match self {
            Search::Proxied(p, _) => format!("http://{}", p.addr()),
            _ => self.indexes().url().to_string(),
        }
    }

    /// The fault proxy in front of the real node.
    fn proxy(&self) -> &FaultProxy {
        match self {
            Search::Proxied(p, _) => p,
            _ => panic!("this test needs the search node behind a fault proxy"),
        }
    }

    /// The stand-in, for tests that inject faults.
    fn stand_in(&self) -> &SearchStandIn {
        match self {
            Search::StandIn(s, _) => s,
            Search::Real(_) | Search::Proxied(..) | Search::Absent => {
                panic!("this test needs the search stand-in")
            }
        }
    }

    fn set_faults(&self, faults: Faults) {
        self.stand_in().set_faults(faults);
    }

    async fn documents(&self, name: &str) -> BTreeMap<String, Value> {
        match self {
            Search::Real(i) | Search::Proxied(_, i) => i.documents(name).await,
            Search::StandIn(s, i) => s.documents(&i.full(name)),
            Search::Absent => no_search(),
        }
    }

    async fn properties(&self, name: &str) -> Map<String, Value> {
        match self {
            Search::Real(i) | Search::Proxied(_, i) => i.properties(name).await,
            Search::StandIn(s, i) => s.properties(&i.full(name)),
            Search::Absent => no_search(),
        }
    }

    async fn meta(&self, name: &str) -> Value {
        match self {
            Search::Real(i) | Search::Proxied(_, i) => i.meta(name).await,
            Search::StandIn(s, i) => s.meta(&i.full(name)),
            Search::Absent => no_search(),
        }
    }

    async fn alias_targets(&self, alias: &str) -> Vec<String> {
        match self {
            Search::Real(i) | Search::Proxied(_, i) => i.alias_targets(alias).await,
            Search::StandIn(s, i) => strip(i, s.alias_targets(&i.full(alias))),
            Search::Absent => no_search(),
        }
    }

    async fn indices(&self) -> Vec<String> {
        match self {
            Search::Real(i) | Search::Proxied(_, i) => i.indices().await,
            Search::StandIn(s, i) => strip(i, s.indices()),
            Search::Absent => no_search(),
        }
    }
}

/// Names under the test's prefix, without it.
fn strip(i: &Indexes, names: Vec<String>) -> Vec<String> {
    let prefix = i.full("");
    names
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

/// Postgres, Kafka, a search server, and the producer streaming one database into one topic.
struct Stack {
    pg: PgCluster,
    broker: Arc<KafkaCluster>,
    search: Search,
    db: String,
    topic: String,
    slot: String,
    group: String,
    logs: tempfile::TempDir,
    spawned: u32,
    producer: Option<Proc>,
    /// The producer's `/metrics` port.
    producer_metrics: u16,
    /// Options the producer's `run` gets besides the common ones.
    producer_extra: Vec<String>,
}

impl Stack {
    /// Starts everything on the shared OpenSearch node; `schema_sql` runs before the
    /// producer's `init`.
    async fn start(schema_sql: &str) -> Self {
        let search = Search::Real(Indexes::new(&OpenSearch::shared().url()));
        Self::start_with(schema_sql, search, KafkaCluster::shared()).await
    }

    /// Starts everything on the shared OpenSearch node reached through a fault proxy of the
    /// test's own (slow answers, cut connections, on cue).
    async fn start_with_proxied_search(schema_sql: &str) -> Self {
        let node = OpenSearch::shared().url();
        let addr = node
            .trim_start_matches("http://")
            .parse()
            .expect("the node's loopback address");
        let proxy = FaultProxy::start(addr).expect("a fault proxy in front of OpenSearch");
        let search = Search::Proxied(proxy, Indexes::new(&node));
        Self::start_with(schema_sql, search, KafkaCluster::shared()).await
    }

    /// Starts everything on a search stand-in of the test's own, for injected faults.
    async fn start_with_stand_in(schema_sql: &str) -> Self {
        let stand_in = SearchStandIn::start().await;
        let indexes = Indexes::new(&stand_in.url());
        Self::start_with(
            schema_sql,
            Search::StandIn(stand_in, indexes),
            KafkaCluster::shared(),
        )
        .await
    }

    async fn start_with(schema_sql: &str, search: Search, broker: Arc<KafkaCluster>) -> Self {
        Self::start_configured(schema_sql, search, broker, &[]).await
    }

    /// Starts everything on the shared OpenSearch node, the producer's `run` with `extra`
    /// options (kept for [`Stack::spawn_producer`]).
    async fn start_with_producer_args(schema_sql: &str, extra: &[&str]) -> Self {
        let search = Search::Real(Indexes::new(&OpenSearch::shared().url()));
        Self::start_configured(schema_sql, search, KafkaCluster::shared(), extra).await
    }

    async fn start_configured(
        schema_sql: &str,
        search: Search,
        broker: Arc<KafkaCluster>,
        extra: &[&str],
    ) -> Self {
        let topic = walrelay_tests::unique("ev").replace('_', ".");
        let mut s = Self::new(schema_sql, search, broker, topic, extra).await;
        s.spawn_producer();
        s
    }

    /// A new database holding `schema_sql`, and the producer's `init` for `topic` (not yet
    /// running).
    async fn new(
        schema_sql: &str,
        search: Search,
        broker: Arc<KafkaCluster>,
        topic: String,
        extra: &[&str],
    ) -> Self {
        let pg = PgCluster::start();
        let db = pg.create_database("wrc").await;
        pg.exec(&db, schema_sql).await;
        let s = Self {
            pg,
            broker,
            search,
            db,
            topic,
            slot: walrelay_tests::unique("slot"),
            group: walrelay_tests::unique("grp"),
            logs: tempfile::tempdir().expect("log dir"),
            spawned: 0,
            producer: None,
            producer_metrics: walrelay_tests::free_port(),
            producer_extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        let args = s.producer_args(&["init"]);
        let out = std::process::Command::new(producer_bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run walrelay-producer init");
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    /// Postgres, Kafka and the producer streaming `schema_sql`'s database into a topic of
    /// `partitions` partitions (created before the producer starts), for tests that use no
    /// search server.
    async fn start_without_search(schema_sql: &str, partitions: i32) -> Self {
        let broker = KafkaCluster::shared();
        let topic = walrelay_tests::unique("ev").replace('_', ".");
        walrelay_common::kafka::ensure_topic(&broker.client_config(), &topic, partitions)
            .await
            .unwrap_or_else(|e| panic!("create {topic}: {e}"));
        let mut s = Self::new(schema_sql, Search::Absent, broker, topic, &[]).await;
        s.spawn_producer();
        s
    }

    /// Starts the producer's `run` (again, after [`Stack::kill_producer`]: it resumes from its
    /// slot, or takes the snapshot again when the first one did not complete).
    fn spawn_producer(&mut self) {
        let log = self.log_path("producer");
        let metrics = format!("127.0.0.1:{}", self.producer_metrics);
        let mut command = vec!["--metrics-addr", metrics.as_str()];
        command.extend(self.producer_extra.iter().map(String::as_str));
        command.push("run");
        let args = self.producer_args(&command);
        self.producer = Some(Proc::spawn(&producer_bin(), &args, &[], &log));
    }

    /// SIGKILLs the producer.
    fn kill_producer(&mut self) {
        if let Some(mut p) = self.producer.take() {
            p.kill9();
        }
    }

    /// `walrelay.slot_state`'s snapshot status of the producer's slot.
    async fn snapshot_status(&self) -> Option<String> {
        self.pg
            .client(&self.db)
            .await
            .query_opt(
                "SELECT snapshot_status FROM walrelay.slot_state WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("read walrelay.slot_state")
            .map(|r| r.get(0))
    }

    fn log_path(&mut self, what: &str) -> PathBuf {
        self.spawned += 1;
        self.logs
            .path()
            .join(format!("{:02}-{what}.log", self.spawned))
    }

    fn producer_args(&self, command: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--postgres-url",
            &self.pg.url(&self.db),
            "--kafka-brokers",
            &self.broker.brokers(),
            "--topic",
            &self.topic,
            "--slot",
            &self.slot,
            "--publication",
            &self.slot,
            "--topic-partitions",
            "2",
            "--partition-key",
            "primary-key",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.broker.property_args());
        args.extend(command.iter().map(|s| s.to_string()));
        args
    }

    fn consumer_args(&self, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--kafka-brokers",
            &self.broker.brokers(),
            "--topic",
            &self.topic,
            "--group",
            &self.group,
            "--search-url",
            &self.search.url(),
            "--index-template",
            &self.search.indexes().template(),
            "--batch-max-wait",
            "100ms",
            "--retry-initial-backoff",
            "20ms",
            "--retry-max-backoff",
            "500ms",
            // A killed member's partitions move after this long.
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
        // The command first, its options after it.
        args.insert(0, command.into());
        args
    }

    fn indexer(&mut self) -> Proc {
        let log = self.log_path("index");
        Proc::spawn(
            &consumer_bin(),
            &self.consumer_args("index", &[]),
            &[],
            &log,
        )
    }

    /// Runs `reindex` (1 s grace period and progress interval) to a successful exit.
    async fn run_reindex(&mut self) -> Proc {
        let log = self.log_path("reindex");
        let mut reindex = Proc::spawn(
            &consumer_bin(),
            &self.consumer_args(
                "reindex",
                &["--grace-period", "1s", "--progress-interval", "1s"],
            ),
            &[],
            &log,
        );
        let code = reindex
            .exit_within(Duration::from_secs(120))
            .await
            .unwrap_or_else(|| panic!("reindex did not finish\n{}", self.all_logs()));
        assert_eq!(code, Some(0), "reindex failed\n{}", self.all_logs());
        reindex
    }

    /// Waits until the producer has finished its snapshot and streams: changes made after this
    /// reach the topic as events of their own, not folded into snapshot rows.
    async fn wait_streaming(&self) {
        self.wait_streaming_within(Duration::from_secs(60)).await;
    }

    /// [`Stack::wait_streaming`], for a snapshot that may take up to `timeout`.
    async fn wait_streaming_within(&self, timeout: Duration) {
        let c = self.pg.client(&self.db).await;
        let deadline = Instant::now() + timeout;
        loop {
            let streaming = c
                .query_one(
                    "SELECT s.snapshot_status = 'done' AND r.active FROM walrelay.slot_state s \
                     JOIN pg_replication_slots r ON r.slot_name = s.slot_name WHERE s.slot_name = $1",
                    &[&self.slot],
                )
                .await
                .ok()
                .and_then(|r| r.get::<_, Option<bool>>(0));
            if streaming == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the producer never streamed\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn exec(&self, sql: &str) {
        self.pg.exec(&self.db, sql).await;
    }

    /// Rows of `table` as JSON objects by `id` text.
    async fn rows(&self, table: &str) -> BTreeMap<String, Value> {
        let c = self.pg.client(&self.db).await;
        let rows = c
            .query(
                &format!("SELECT id::text, row_to_json(t)::text FROM {table} t"),
                &[],
            )
            .await
            .expect("read rows");
        rows.iter()
            .map(|r| {
                let json: String = r.get(1);
                (
                    r.get::<_, String>(0),
                    serde_json::from_str(&json).expect("row json"),
                )
            })
            .collect()
    }

    /// Documents of an alias without the fields walrelay adds.
    async fn docs(&self, alias: &str) -> BTreeMap<String, Value> {
        self.search
            .documents(alias)
            .await
            .into_iter()
            .map(|(id, mut d)| {
                if let Some(o) = d.as_object_mut() {
                    o.remove("walrelay_version");
                    o.remove("walrelay_seq");
                    o.remove("walrelay_partition");
                }
                (id, d)
            })
            .collect()
    }

    fn all_logs(&self) -> String {
        walrelay_tests::process::logs_tail(self.logs.path(), 30)
    }

    /// Waits until the alias holds exactly the table's rows.
    async fn wait_equal(&self, table: &str, alias: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows(table).await;
            let docs = self.docs(alias).await;
            if rows == docs {
                return;
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = rows
                    .keys()
                    .filter(|k| !docs.contains_key(*k))
                    .take(5)
                    .collect();
                let extra: Vec<_> = docs
                    .keys()
                    .filter(|k| !rows.contains_key(*k))
                    .take(5)
                    .collect();
                let differ: Vec<_> = rows
                    .iter()
                    .filter(|(k, v)| docs.get(*k).is_some_and(|d| d != *v))
                    .take(3)
                    .map(|(k, v)| format!("{k}: table {v} / index {}", docs[k]))
                    .collect();
                panic!(
                    "{alias} never matched {table}: {} rows, {} docs; missing {missing:?}, extra {extra:?}, differing {differ:#?}\n{}",
                    rows.len(),
                    docs.len(),
                    self.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asserts what a correct indexer never does, where the stand-in records it (OpenSearch
    /// itself refuses a version regression).
    fn assert_clean(&self) {
        let Search::StandIn(stand_in, _) = &self.search else {
            return;
        };
        assert_eq!(
            stand_in.unversioned_writes(),
            0,
            "a document write without an external version"
        );
        assert_eq!(
            stand_in.regressions(),
            Vec::<String>::new(),
            "a stored version went down"
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(p) = self.producer.as_mut() {
            p.kill9();
        }
    }
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, tags text[], doc jsonb, big text);
    ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;
    INSERT INTO items SELECT g, 'item ' || g, g * 10, ARRAY['a', 'b' || g], jsonb_build_object('n', g), NULL
        FROM generate_series(1, 200) g;";

/// A background writer touching `items`: updates, deletes and inserts, until stopped.
fn writer(url: String, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let mut n: u64 = 0;
        while !stop.is_cancelled() {
            n += 1;
            let id = (n % 300) as i32 + 1;
            let sql = match n % 5 {
                0 => format!("DELETE FROM items WHERE id = {id}"),
                1 | 2 => format!(
                    "INSERT INTO items VALUES ({id}, 'w{n}', {n}, ARRAY['x'], '{{\"w\": {n}}}', NULL) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, qty = excluded.qty"
                ),
                _ => format!("UPDATE items SET qty = qty + 1, name = 'u{n}' WHERE id = {id}"),
            };
            client.batch_execute(&sql).await.expect("write");
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_follows_inserts_updates_deletes_truncate_and_toast() {
    let mut s = Stack::start(ITEMS).await;
    s.exec("CREATE TABLE pairs (a text, b int, v text, PRIMARY KEY (a, b)); INSERT INTO pairs VALUES ('x|y', 1, 'one'), ('x', 2, 'two');")
        .await;
    // pairs was created after init: add it to the publication by running init again.
    let out = std::process::Command::new(producer_bin())
        .args(s.producer_args(&["init"]))
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut indexer = s.indexer();
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;

    // Mappings come from the column types.
    let props = s.search.properties("public.items").await;
    assert_eq!(props["id"]["type"], "long");
    assert_eq!(props["name"]["type"], "text");
    assert_eq!(props["doc"]["enabled"], false);
    assert_eq!(
        s.search.alias_targets("public.items").await,
        vec!["public.items-v1"]
    );

    // A large value stored out of line, then an update that leaves it untouched.
    s.exec("UPDATE items SET big = repeat('0123456789', 20000) WHERE id = 7")
        .await;
    s.exec("UPDATE items SET qty = -7 WHERE id = 7").await;
    s.exec("UPDATE items SET name = 'renamed', qty = qty + 1 WHERE id BETWEEN 10 AND 20; DELETE FROM items WHERE id > 150;")
        .await;
    s.exec("UPDATE items SET id = 1000 WHERE id = 3").await;
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    let seven = &s.search.documents("public.items").await["7"];
    assert_eq!(seven["qty"], -7);
    assert_eq!(
        seven["big"].as_str().map(str::len),
        Some(200_000),
        "unchanged TOAST value kept"
    );

    // Truncate, then new rows.
    s.exec("TRUNCATE items; INSERT INTO items VALUES (1, 'after', 1, NULL, NULL, NULL);")
        .await;
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;

    // Composite keys with the separator inside a value stay distinct.
    let pairs = s.search.documents("public.pairs").await;
    assert_eq!(pairs.len(), 2, "{pairs:?}");
    assert!(
        pairs.contains_key("x\\|y|1") && pairs.contains_key("x|2"),
        "{pairs:?}"
    );
    s.assert_clean();
    assert_eq!(
        indexer.terminate(),
        Some(0),
        "SIGTERM drains and exits 0\n{}",
        s.all_logs()
    );
}

/// Commit order, not WAL order: under a deferred unique key a transaction can insert a key (its
/// change logged first) that a concurrent transaction then deletes and commits first. The
/// insert is the newer change of that row; versioned by its own LSN it looked stale (409) and
/// the row went missing from the index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_unique_key_race_ends_with_the_index_equal_to_the_table() {
    let mut s = Stack::start(
        "CREATE TABLE dk (id int, v text, CONSTRAINT dk_pkey PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED);
         ALTER TABLE dk REPLICA IDENTITY FULL;
         INSERT INTO dk VALUES (1, 'old'), (2, 'two');",
    )
    .await;
    let mut indexer = s.indexer();
    s.wait_equal("dk", "public.dk", Duration::from_secs(60))
        .await;
    let late = s.pg.client(&s.db).await;
    let early = s.pg.client(&s.db).await;
    // The later committer writes its change first...
    late.batch_execute("BEGIN; INSERT INTO dk VALUES (1, 'new')")
        .await
        .expect("insert under a deferred key");
    // ...the earlier committer deletes the old row and commits...
    early
        .batch_execute("BEGIN; DELETE FROM dk WHERE v = 'old'; COMMIT")
        .await
        .expect("delete");
    // ...then the insert commits (the deferred check passes: the old row is gone).
    late.batch_execute("COMMIT").await.expect("commit");
    s.wait_equal("dk", "public.dk", Duration::from_secs(60))
        .await;
    let docs = s.search.documents("public.dk").await;
    assert_eq!(docs["1"]["v"], "new", "{docs:?}");
    s.assert_clean();
    indexer.kill9();
}

/// The unique-index race, made deterministic: an expression index (created before the primary
/// key, so Postgres fills it first) calls a function that waits on an advisory lock the test
/// holds. The inserting transaction logs its heap insert, then waits there; meanwhile another
/// transaction deletes the old row with that key and commits; then the insert passes the key
/// check and commits, after the delete but with a lower change LSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_index_race_ends_with_the_index_equal_to_the_table() {
    let mut s = Stack::start(
        "CREATE TABLE ur (id int NOT NULL, v text);
         CREATE FUNCTION ur_gate(i int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN i; END $$;
         CREATE INDEX ur_gate_idx ON ur (ur_gate(id));
         ALTER TABLE ur ADD PRIMARY KEY (id);
         INSERT INTO ur VALUES (1, 'old'), (2, 'two');",
    )
    .await;
    let mut indexer = s.indexer();
    s.wait_equal("ur", "public.ur", Duration::from_secs(60))
        .await;
    let gate = s.pg.client(&s.db).await;
    gate.batch_execute("BEGIN; SELECT pg_advisory_xact_lock(4242)")
        .await
        .expect("hold the gate");
    let late = s.pg.client(&s.db).await;
    let insert = tokio::spawn(async move {
        late.batch_execute("BEGIN; INSERT INTO ur VALUES (1, 'new'); COMMIT")
            .await
    });
    // The insert has logged its row and waits at the gate.
    let probe = s.pg.client(&s.db).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the insert never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    probe
        .batch_execute("BEGIN; DELETE FROM ur WHERE v = 'old'; COMMIT")
        .await
        .expect("delete commits first");
    gate.batch_execute("COMMIT").await.expect("open the gate");
    insert
        .await
        .expect("insert task")
        .expect("the insert commits after the delete");
    s.wait_equal("ur", "public.ur", Duration::from_secs(60))
        .await;
    let docs = s.search.documents("public.ur").await;
    assert_eq!(docs["1"]["v"], "new", "{docs:?}");
    s.assert_clean();
    indexer.kill9();
}

/// Versions follow commit order, so all changes of one transaction share one; a truncate still
/// removes exactly the rows written before it, in older transactions and in its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_removes_what_its_own_transaction_wrote_before_it() {
    let mut s = Stack::start(
        "CREATE TABLE tt (id int PRIMARY KEY, v text); INSERT INTO tt VALUES (1, 'old');",
    )
    .await;
    let mut indexer = s.indexer();
    s.wait_equal("tt", "public.tt", Duration::from_secs(60))
        .await;
    s.exec(
        "BEGIN; INSERT INTO tt VALUES (2, 'before'); UPDATE tt SET v = 'touched' WHERE id = 1;
         TRUNCATE tt; INSERT INTO tt VALUES (3, 'after'); COMMIT;",
    )
    .await;
    s.wait_equal("tt", "public.tt", Duration::from_secs(60))
        .await;
    let docs = s.search.documents("public.tt").await;
    assert_eq!(docs.keys().collect::<Vec<_>>(), ["3"], "{docs:?}");
    s.assert_clean();
    indexer.kill9();
}

/// A row keyed by a `jsonb` value: its insert arrives as JSON text (Postgres' spacing and key
/// order), its delete as a parsed `before` image; both must address the same document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_keyed_by_jsonb_is_deleted_from_the_index() {
    let mut s = Stack::start(
        "CREATE TABLE jkeys (k jsonb PRIMARY KEY, v text);
         INSERT INTO jkeys VALUES ('{\"b\": 1, \"a\": [1, 2]}', 'one'), ('{\"z\": {\"y\": true}}', 'two');",
    )
    .await;
    let mut indexer = s.indexer();
    let wait_docs = |want: usize| {
        let search = &s.search;
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let docs = search.documents("public.jkeys").await;
                if docs.len() == want {
                    return docs;
                }
                assert!(
                    Instant::now() < deadline,
                    "want {want} documents, have {docs:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let docs = wait_docs(2).await;
    assert!(docs.values().any(|d| d["v"] == "one"), "{docs:?}");
    s.exec("DELETE FROM jkeys WHERE v = 'one'").await;
    let docs = wait_docs(1).await;
    assert!(
        docs.values().all(|d| d["v"] == "two"),
        "the deleted row's document is gone: {docs:?}\n{}",
        s.all_logs()
    );
    s.assert_clean();
    indexer.kill9();
}

/// The sum of a metric's samples on a consumer's `/metrics` (0 when it has none).
async fn metric_sum(port: u16, name: &str) -> Option<f64> {
    metrics::sum(&format!("127.0.0.1:{port}"), name).await
}

/// The consumer's `walrelay_consumer_assigned_partitions`, read from its `/metrics`.
async fn assigned_partitions(metrics_port: u16) -> Option<i64> {
    metrics::value(
        &format!("127.0.0.1:{metrics_port}"),
        "walrelay_consumer_assigned_partitions",
    )
    .await
    .map(|v| v as i64)
}

/// Starts an indexer with metrics and waits until it holds both partitions of the topic.
async fn indexer_holding_both(s: &mut Stack, name: &str, timeout: Duration) -> Proc {
    let (member, port) = indexer_with_metrics(s, name);
    let deadline = Instant::now() + timeout;
    while assigned_partitions(port).await != Some(2) {
        assert!(
            Instant::now() < deadline,
            "{name} never held both partitions\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    member
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_at_once_takes_over_a_killed_members_partitions() {
    let mut s = Stack::start(ITEMS).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = writer(s.pg.url(&s.db), stop.clone());
    let mut first = indexer_holding_both(&mut s, "index-first", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL: no LeaveGroup. The replacement joins while the dead member is still registered;
    // the coordinator hands it the partitions once the dead member's session (6 s) expires.
    first.kill9();
    let killed_at = Instant::now();
    let mut second = indexer_holding_both(&mut s, "index-second", Duration::from_secs(45)).await;
    eprintln!(
        "the replacement held both partitions {:?} after the kill",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let writes = load.await.expect("writer");
    assert!(writes > 100, "the writer made only {writes} changes");
    s.wait_equal("items", "public.items", Duration::from_secs(90))
        .await;
    assert_eq!(second.terminate(), Some(0), "{}", s.all_logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_indexer_and_failing_bulk_items_lose_nothing() {
    let mut s = Stack::start_with_stand_in(ITEMS).await;
    s.search.set_faults(Faults {
        item_error_ratio: 0.3,
        request_429_ratio: 0.1,
        ..Faults::default()
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let load = writer(s.pg.url(&s.db), stop.clone());
    let mut indexer = s.indexer();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500 + 700 * round)).await;
        indexer.kill9();
        indexer = s.indexer();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let writes = load.await.expect("writer");
    assert!(writes > 100, "the writer made only {writes} changes");
    s.wait_equal("items", "public.items", Duration::from_secs(90))
        .await;
    let (items, injected) = s.search.stand_in().bulk_stats();
    assert!(
        injected * 5 > items,
        "about 30% of {items} items failed, got {injected}"
    );
    s.assert_clean();
    indexer.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_the_dead_letter_topic_and_the_rest_flows() {
    let mut s = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, tags text[], doc jsonb, big text);
         CREATE TABLE keyless (v text); ALTER TABLE keyless REPLICA IDENTITY FULL;",
    )
    .await;
    let mut indexer = s.indexer();
    s.exec("INSERT INTO items VALUES (1, 'one', 1, NULL, NULL, NULL)")
        .await;
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    // Not an envelope at all, written straight into the topic.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", s.broker.brokers())
        .create()
        .expect("producer");
    producer
        .send(
            FutureRecord::to(&s.topic)
                .key("junk")
                .payload("{not json")
                .partition(0),
            Duration::from_secs(10),
        )
        .await
        .expect("produce junk");
    // A table without a key cannot be addressed as documents.
    s.exec("INSERT INTO keyless VALUES ('no key')").await;
    s.exec("INSERT INTO items VALUES (2, 'two', 2, NULL, NULL, NULL)")
        .await;
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;

    let dlq = format!("{}.dlq", s.topic);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", s.broker.brokers())
        .set("group.id", walrelay_tests::unique("dlqreader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    c.subscribe(&[&dlq]).expect("subscribe");
    let mut letters: Vec<(Vec<u8>, BTreeMap<String, String>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while letters.len() < 2 && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            let mut headers = BTreeMap::new();
            if let Some(h) = m.headers() {
                for x in h.iter() {
                    headers.insert(
                        x.key.to_string(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            letters.push((m.payload().unwrap_or_default().to_vec(), headers));
        }
    }
    assert_eq!(letters.len(), 2, "two dead letters\n{}", s.all_logs());
    let junk = letters
        .iter()
        .find(|(p, _)| p == b"{not json")
        .expect("the junk record, byte for byte");
    assert_eq!(junk.1["walrelay.dlq.reason"], "decode");
    assert_eq!(junk.1["walrelay.dlq.topic"], s.topic);
    assert_eq!(junk.1["walrelay.dlq.partition"], "0");
    assert!(junk.1["walrelay.dlq.offset"].parse::<i64>().is_ok());
    let keyless = letters
        .iter()
        .find(|(p, _)| p != b"{not json")
        .expect("the keyless event");
    assert_eq!(keyless.1["walrelay.dlq.reason"], "rejected");
    assert!(
        keyless.1["walrelay.dlq.error"].contains("primary key"),
        "{:?}",
        keyless.1
    );
    let metrics_ok = indexer.try_exit().is_none();
    assert!(metrics_ok, "the indexer keeps running\n{}", s.all_logs());
    s.assert_clean();
    indexer.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_under_writes_swaps_to_an_exact_new_index() {
    let mut s = Stack::start(ITEMS).await;
    let mut indexer = s.indexer();
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = writer(s.pg.url(&s.db), stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reindex = s.run_reindex().await;
    // Writes continue after the swap; the running indexer now keeps the new index current.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    load.await.expect("writer");
    assert_eq!(
        s.search.alias_targets("public.items").await,
        vec!["public.items-v2"]
    );
    assert!(
        !s.search
            .indices()
            .await
            .contains(&"public.items-v1".to_string()),
        "old index deleted: {:?}",
        s.search.indices().await
    );
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    let log_text = reindex.log();
    assert!(
        log_text.contains("Re-index progress"),
        "progress is shown\n{log_text}"
    );
    s.assert_clean();
    indexer.kill9();
}

/// Rows of `table` in the topic's records, by id, from snapshot reads only.
fn snapshot_ids(records: &[Record], table: &str) -> BTreeSet<i64> {
    records
        .iter()
        .map(Record::envelope)
        .filter(|e| e.op == Op::Read && e.source.table == table)
        .filter_map(|e| e.after.and_then(|a| a.get("id").and_then(Value::as_i64)))
        .collect()
}

/// Waits until `alias` holds `n` documents (cheaper than comparing them all).
async fn wait_count(s: &Stack, alias: &str, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = s.search.indexes().count(alias).await;
        if have == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{alias} holds {have} documents, want {n}\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Issue 14: a producer killed mid-snapshot drops its slot and snapshots again, so the topic
/// holds two attempts. Rows deleted between them are in the first attempt only; without the
/// second attempt's end markers retiring them (and snapshot versions ordering the attempts)
/// their documents stayed in the index forever, in the live index and in a re-index alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_retried_after_a_kill_ends_with_the_index_equal_to_the_table() {
    snapshot_retried_after_a_kill("at-least-once").await;
}

/// The same under `--delivery exactly-once`: the first attempt's committed Kafka transactions
/// are visible, its open one was aborted at the next start; the framing retires the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_retried_under_exactly_once_ends_with_the_index_equal_to_the_table() {
    snapshot_retried_after_a_kill("exactly-once").await;
}

async fn snapshot_retried_after_a_kill(delivery: &str) {
    const BIG: i64 = 200_000;
    let mut s = Stack::start_with_producer_args(
        &format!(
            "CREATE TABLE a_small (id int PRIMARY KEY, v text);
             INSERT INTO a_small SELECT g, 'small ' || g FROM generate_series(1, 50) g;
             CREATE TABLE big (id int PRIMARY KEY, v text, pad text);
             INSERT INTO big SELECT g, 'row ' || g, repeat('p', 100) FROM generate_series(1, {BIG}) g;"
        ),
        // A small buffer and chunks: the snapshot takes seconds, so it can be cut short.
        &[
            "--max-buffer-bytes",
            "1MiB",
            "--snapshot-chunk-pages",
            "64",
            "--snapshot-parallelism",
            "2",
            "--delivery",
            delivery,
        ],
    )
    .await;
    let mut indexer = s.indexer();
    let brokers = s.broker.brokers();

    // The first attempt: killed once part of `big` is in the topic (`a_small`, first in the
    // snapshot's order, is complete by then).
    let deadline = Instant::now() + Duration::from_secs(60);
    // (Under exactly-once the count includes what is not committed yet: past it, wait for a
    // commit of the snapshot's Kafka transactions, one a second.)
    while walrelay_tests::topic::try_record_count(&brokers, &s.topic).unwrap_or(0) < 10_000 {
        assert!(
            Instant::now() < deadline,
            "the snapshot never started\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if delivery == "exactly-once" {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    s.kill_producer();
    assert_eq!(
        s.snapshot_status().await.as_deref(),
        Some("pending"),
        "the first snapshot finished before the kill; the test needs it cut short"
    );
    let first = walrelay_tests::topic::read_to_end(&brokers, &s.topic, Duration::from_secs(60));
    let held = first.len();
    let seen = snapshot_ids(&first, "big");
    assert!(
        seen.len() > 1_000 && (seen.len() as i64) < BIG,
        "part of big in the first attempt: {}",
        seen.len()
    );
    eprintln!(
        "the first attempt: {} of {BIG} rows of big in {held} records",
        seen.len()
    );
    // The indexer has the first attempt's rows, the ones deleted below among them.
    wait_count(
        &s,
        "public.big",
        seen.len() as u64,
        Duration::from_secs(120),
    )
    .await;
    wait_count(&s, "public.a_small", 50, Duration::from_secs(60)).await;

    // Between the attempts: deletes and updates of rows the first attempt read (their
    // documents are in the index) and of rows it did not reach.
    let seen_ids: Vec<i64> = seen.iter().copied().collect();
    let pick = |step: usize, offset: usize| -> String {
        seen_ids
            .iter()
            .skip(offset)
            .step_by(step)
            .take(400)
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    s.exec(&format!(
        "DELETE FROM big WHERE id IN ({}) OR id > {};
         UPDATE big SET v = 'changed between the attempts' WHERE id IN ({}) OR id % 997 = 0;
         DELETE FROM a_small WHERE id IN (7, 8);
         UPDATE a_small SET v = 'changed' WHERE id = 9;",
        pick(7, 0),
        BIG - 300,
        pick(11, 3),
    ))
    .await;

    // The second attempt: a new slot and a whole snapshot, then the stream.
    s.spawn_producer();
    s.wait_streaming_within(Duration::from_secs(180)).await;
    s.exec("UPDATE big SET v = 'streamed' WHERE id IN (2, 3); DELETE FROM big WHERE id = 4;")
        .await;
    let rows = s.rows("big").await.len() as u64;
    wait_count(&s, "public.big", rows, Duration::from_secs(180)).await;
    s.wait_equal("big", "public.big", Duration::from_secs(120))
        .await;
    s.wait_equal("a_small", "public.a_small", Duration::from_secs(60))
        .await;
    assert_eq!(
        s.search.properties("public.big").await["walrelay_partition"]["type"],
        "integer"
    );

    // The topic holds both attempts: each table's end markers, on every partition.
    let all = walrelay_tests::topic::read_to_end(&brokers, &s.topic, Duration::from_secs(120));
    let mut ends: BTreeMap<String, BTreeSet<(String, i32)>> = BTreeMap::new();
    for r in &all {
        let e = r.envelope();
        if e.op == Op::SnapshotEnd {
            let frame = e.snapshot.expect("an end marker carries its frame");
            assert_eq!(frame.consistent_lsn, e.source.commit_lsn);
            ends.entry(frame.attempt)
                .or_default()
                .insert((e.source.table, r.partition));
        }
    }
    assert_eq!(ends.len(), 2, "two attempts with end markers: {ends:?}");
    let complete: Vec<&BTreeSet<(String, i32)>> = ends.values().collect();
    assert!(
        complete.iter().any(|t| t.len() == 4) && complete.iter().any(|t| t.len() == 2),
        "the first attempt ended a_small only, the second both tables, each on both partitions: {ends:?}"
    );

    // A re-index from offset zero reads both attempts and ends equal to the table too.
    s.run_reindex().await;
    assert_eq!(
        s.search.alias_targets("public.big").await,
        vec!["public.big-v2"]
    );
    s.wait_equal("big", "public.big", Duration::from_secs(60))
        .await;
    s.wait_equal("a_small", "public.a_small", Duration::from_secs(60))
        .await;
    let log = indexer.log();
    assert!(
        log.contains("Snapshot end: retired"),
        "each end marker is logged\n{}",
        s.all_logs()
    );
    indexer.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_exit_2_naming_the_option() {
    let out = std::process::Command::new(consumer_bin())
        .args([
            "--kafka-brokers",
            "127.0.0.1:1",
            "--search-url",
            "ftp://nope",
            "index",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--search-url"));
    let _ = Map::<String, Value>::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_refuses_when_the_topic_history_was_deleted() {
    // Records deleted from the start of a partition (as retention or DeleteRecords does): a
    // rebuild from offset zero would silently miss them.
    let broker = KafkaCluster::shared();
    let brokers = broker.brokers();
    let topic = walrelay_tests::unique("hist").replace('_', ".");
    let config = {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &brokers);
        c
    };
    walrelay_common::kafka::ensure_topic(&config, &topic, 1)
        .await
        .expect("topic");
    let producer: FutureProducer = config.create().expect("producer");
    for i in 0..50u32 {
        producer
            .send(
                FutureRecord::<(), String>::to(&topic).payload(&format!("record {i}")),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        config.create().expect("admin");
    let mut upto = rdkafka::TopicPartitionList::new();
    upto.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(20))
        .expect("tpl");
    admin
        .delete_records(&upto, &rdkafka::admin::AdminOptions::new())
        .await
        .expect("delete records");
    let probe: BaseConsumer = config.create().expect("consumer");
    let (earliest, _) = probe
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    assert_eq!(earliest, 20, "the first 20 records are deleted");

    let search = Indexes::new(&OpenSearch::shared().url());
    let out = tokio::process::Command::new(consumer_bin())
        .args([
            "--kafka-brokers",
            &brokers,
            "--topic",
            &topic,
            "--search-url",
            search.url(),
            "--index-template",
            &search.template(),
            "reindex",
        ])
        .output()
        .await
        .expect("run reindex");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("starts at offset {earliest}, not 0"))
            && stderr.contains("history was deleted"),
        "{stderr}"
    );
    assert_eq!(
        search.indices().await,
        Vec::<String>::new(),
        "nothing was built"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_reindex_never_exposes_a_half_built_index_and_a_rerun_finishes() {
    // The real node behind a fault proxy: every request is slowed down on cue so the build is
    // cut short.
    let mut s = Stack::start_with_proxied_search(ITEMS).await;
    let mut indexer = s.indexer();
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    indexer.kill9();
    // Slow every request down so the build is still running when it is killed.
    s.search.proxy().latency(Duration::from_millis(150));
    let args = s.consumer_args(
        "reindex",
        &["--grace-period", "0s", "--batch-max-events", "10"],
    );
    let log = s.log_path("reindex-killed");
    let mut first = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s
        .search
        .indices()
        .await
        .contains(&"public.items-v2".to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the build never started\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.kill9();
    assert_eq!(
        s.search.alias_targets("public.items").await,
        vec!["public.items-v1"],
        "the alias moved before the build finished"
    );
    let partial = s.search.documents("public.items-v2").await.len();
    assert!(
        partial < 200,
        "the build had finished ({partial} documents); the test needs it cut short"
    );

    s.search.proxy().clear();
    s.exec("UPDATE items SET name = 'after the interruption' WHERE id <= 5")
        .await;
    let log = s.log_path("reindex-rerun");
    let mut rerun = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let code = rerun
        .exit_within(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("the rerun did not finish\n{}", s.all_logs()));
    assert_eq!(code, Some(0), "rerun failed\n{}", s.all_logs());
    assert!(
        rerun.log().contains("Resuming the re-index"),
        "{}",
        rerun.log()
    );
    assert_eq!(
        s.search.alias_targets("public.items").await,
        vec!["public.items-v2"]
    );
    assert!(
        !s.search
            .indices()
            .await
            .contains(&"public.items-v1".to_string())
    );
    s.wait_equal("items", "public.items", Duration::from_secs(30))
        .await;
    s.assert_clean();
}

/// Inserts `per_tick` new rows into `items` every `tick` (ids from `first` up, one transaction
/// per tick), counting them in `written`, until stopped.
fn steady_inserts(
    url: String,
    first: i64,
    per_tick: i64,
    tick: Duration,
    written: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let mut next = first;
        let mut ticks = tokio::time::interval(tick);
        while !stop.is_cancelled() {
            ticks.tick().await;
            client
                .batch_execute(&format!(
                    "INSERT INTO items SELECT g, 'steady ' || g, g, NULL, NULL, NULL \
                     FROM generate_series({next}, {}) g",
                    next + per_tick - 1
                ))
                .await
                .expect("insert");
            next += per_tick;
            written.fetch_add(per_tick as u64, Ordering::Relaxed);
        }
    })
}

/// A stalled sink shows as growing lag. The runtime pauses fetching while the sink is stuck,
/// and librdkafka's statistics then held `walrelay_consumer_lag_messages` at its value when the
/// pause began, so `WalrelayConsumerLagGrowing` could never fire for the consumer it exists
/// for; a paused partition's lag is now taken from the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_indexer_reports_growing_lag() {
    let mut s = Stack::start_with_proxied_search(ITEMS).await;
    let (mut indexer, port) = indexer_with_metrics(&mut s, "index");
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    s.wait_streaming().await;

    // The search link hangs: the bulk request in flight never gets an answer.
    s.search.proxy().blackout();
    let written = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = steady_inserts(
        s.pg.url(&s.db),
        1_001,
        20,
        Duration::from_millis(200),
        Arc::clone(&written),
        stop.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_sum(port, "walrelay_consumer_paused_partitions")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "fetching never paused\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past one statistics interval and one lag refresh (5 s each) into the pause.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lag = move || async move {
        metric_sum(port, "walrelay_consumer_lag_messages")
            .await
            .unwrap_or(0.0)
    };
    let (lag_before, written_before) = (lag().await, written.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (lag_after, written_after) = (lag().await, written.load(Ordering::Relaxed));
    let grew = lag_after - lag_before;
    let between = (written_after - written_before) as f64;
    eprintln!(
        "while stalled: lag {lag_before} -> {lag_after} (+{grew}), {between} rows written between"
    );
    // The lag is refreshed every 5 s, so the 12 s window sees 7 to 17 s of writes.
    assert!(
        between >= 300.0 && grew >= between / 3.0,
        "the lag of a stalled consumer must grow: {lag_before} -> {lag_after} while {between} rows were written\n{}",
        s.all_logs()
    );
    assert!(
        metric_sum(port, "walrelay_consumer_paused_partitions")
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "fetching resumed during the stall\n{}",
        s.all_logs()
    );

    // Back: the index catches up with every row, and the lag returns to 0.
    s.search.proxy().restore();
    stop.cancel();
    load.await.expect("writer");
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while lag().await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the lag never returned to 0 ({})\n{}",
            lag().await,
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        indexer.try_exit().is_none(),
        "the indexer stopped\n{}",
        s.all_logs()
    );
    indexer.kill9();
}

/// A bare member of a stack's consumer group (cooperative, like walrelay's), polled on a
/// thread of its own; it commits nothing.
struct GroupMember {
    held: Arc<AtomicU64>,
    leave: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl GroupMember {
    fn join(s: &Stack) -> Self {
        let consumer: BaseConsumer = s
            .broker
            .client_config()
            .set("group.id", &s.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .create()
            .expect("a group member");
        consumer.subscribe(&[&s.topic]).expect("subscribe");
        let held = Arc::new(AtomicU64::new(0));
        let leave = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (held, leave) = (Arc::clone(&held), Arc::clone(&leave));
            move || {
                while !leave.load(Ordering::Relaxed) {
                    let _ = consumer.poll(Duration::from_millis(100));
                    if let Ok(a) = consumer.assignment() {
                        held.store(a.count() as u64, Ordering::Relaxed);
                    }
                }
                // Dropping the consumer closes it: it leaves the group.
            }
        });
        Self {
            held,
            leave,
            thread,
        }
    }

    /// How many partitions it holds.
    fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Leaves the group.
    fn leave(self) {
        self.leave.store(true, Ordering::Relaxed);
        self.thread.join().expect("the member's thread");
    }
}

/// Starts an indexer with metrics on a port of its own.
fn indexer_with_metrics(s: &mut Stack, name: &str) -> (Proc, u16) {
    let port = walrelay_tests::free_port();
    let log = s.log_path(name);
    let metrics = format!("127.0.0.1:{port}");
    let member = Proc::spawn(
        &consumer_bin(),
        &s.consumer_args("index", &["--metrics-addr", &metrics]),
        &[],
        &log,
    );
    (member, port)
}

/// Waits until `check` holds for the metric `name` summed over its series.
async fn wait_metric(s: &Stack, port: u16, name: &str, check: impl Fn(f64) -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric_sum(port, name).await.unwrap_or(-1.0);
        if check(v) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {name} is {v}\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_revoked_is_fetched_again_when_it_comes_back() {
    // librdkafka keeps an application's pause across a revoke and a re-assignment: a runtime
    // that forgets its pause at the revoke never fetches that partition again (found by the
    // chaos suite, where a notifier lost its membership during a stall and stood idle).
    let mut s = Stack::start_with_proxied_search(ITEMS).await;
    let (mut first, port) = indexer_with_metrics(&mut s, "index-first");
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    s.wait_streaming().await;
    wait_metric(
        &s,
        port,
        "walrelay_consumer_assigned_partitions",
        |v| v == 2.0,
        "the first member never held both partitions",
    )
    .await;

    // The search link hangs: the first member stalls and pauses both partitions.
    s.search.proxy().blackout();
    let written = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let load = steady_inserts(
        s.pg.url(&s.db),
        1_001,
        10,
        Duration::from_millis(200),
        Arc::clone(&written),
        stop.clone(),
    );
    wait_metric(
        &s,
        port,
        "walrelay_consumer_paused_partitions",
        |v| v == 2.0,
        "fetching never paused",
    )
    .await;

    // A second member joins: one partition moves to it, revoked from the first while paused.
    // It is a bare librdkafka member of the same group that commits nothing.
    let second = GroupMember::join(&s);
    let deadline = Instant::now() + Duration::from_secs(60);
    while second.held() != 1 {
        assert!(
            Instant::now() < deadline,
            "the second member never got a partition\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_metric(
        &s,
        port,
        "walrelay_consumer_assigned_partitions",
        |v| v == 1.0,
        "the first member kept both partitions",
    )
    .await;

    // Search is back: the stall ends while the partition is away.
    s.search.proxy().restore();
    wait_metric(
        &s,
        port,
        "walrelay_consumer_paused_partitions",
        |v| v == 0.0,
        "the first member never resumed",
    )
    .await;

    // The second member leaves: its partition comes back to the first, which must fetch it.
    second.leave();
    wait_metric(
        &s,
        port,
        "walrelay_consumer_assigned_partitions",
        |v| v == 2.0,
        "the partition never came back",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    load.await.expect("writer");
    assert!(
        written.load(Ordering::Relaxed) > 100,
        "the writer wrote too little"
    );
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    wait_metric(
        &s,
        port,
        "walrelay_consumer_paused_partitions",
        |v| v == 0.0,
        "a partition is paused at the end",
    )
    .await;
    assert!(
        first.try_exit().is_none(),
        "the first member stopped\n{}",
        s.all_logs()
    );
    first.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_started_before_the_topic_exists_picks_it_up() {
    let pg = PgCluster::start();
    let db = pg.create_database("wrc").await;
    pg.exec(&db, ITEMS).await;
    let broker = KafkaCluster::shared();
    let search = Indexes::new(&OpenSearch::shared().url());
    let topic = walrelay_tests::unique("late").replace('_', ".");
    let logs = tempfile::tempdir().expect("logs");
    let mut indexer = Proc::spawn(
        &consumer_bin(),
        &[
            "--kafka-brokers",
            &broker.brokers(),
            "--topic",
            &topic,
            "--group",
            &walrelay_tests::unique("grp"),
            "--search-url",
            search.url(),
            "--index-template",
            &search.template(),
            "index",
        ]
        .map(String::from),
        &[],
        &logs.path().join("index.log"),
    );
    // The indexer subscribes to a topic nobody has created yet; the producer comes later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slot = walrelay_tests::unique("slot");
    let args = broker.producer_args(&pg.url(&db), &topic, &slot);
    let init = std::process::Command::new(producer_bin())
        .args(args.iter().chain([&"init".to_string()]))
        .output()
        .expect("init");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut producer = Proc::spawn(
        &producer_bin(),
        &[args.clone(), vec!["run".into()]].concat(),
        &[],
        &logs.path().join("producer.log"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while search.count("public.items").await < 200 {
        assert!(
            Instant::now() < deadline,
            "the indexer never picked up the new topic:\n{}",
            indexer.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    producer.kill9();
    indexer.kill9();
}

/// Regression (found while reviewing the chaos suite): a consumer started while Kafka was
/// unreachable tried to create its dead-letter topic 6 times (about 65 s with the metadata
/// timeouts) and then exited. It now waits for Kafka, with backoff, like the rest of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indexer_started_while_kafka_is_unreachable_waits_for_it() {
    let s = Stack::start(ITEMS).await;
    let kafka: std::net::SocketAddr = s
        .broker
        .brokers()
        .split(',')
        .next()
        .and_then(|b| b.parse().ok())
        .expect("the shared broker's loopback address");
    let proxy = FaultProxy::start(kafka).expect("a fault proxy in front of Kafka");
    proxy.blackout();
    let logs = tempfile::tempdir().expect("logs");
    let mut indexer = Proc::spawn(
        &consumer_bin(),
        &[
            "--kafka-brokers",
            &proxy.addr().to_string(),
            "--topic",
            &s.topic,
            "--group",
            &s.group,
            "--search-url",
            s.search.indexes().url(),
            "--index-template",
            &s.search.indexes().template(),
            "index",
        ]
        .map(String::from),
        &[],
        &logs.path().join("index.log"),
    );
    // Longer than the old code's six attempts took to give up.
    let blackout = Duration::from_secs(80);
    if let Some(code) = indexer.exit_within(blackout).await {
        panic!(
            "the indexer exited ({code:?}) while Kafka was unreachable instead of waiting:\n{}",
            indexer.log()
        );
    }
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(90);
    while s.search.indexes().count("public.items").await < 200 {
        if let Some(code) = indexer.try_exit() {
            panic!("the indexer exited ({code:?}):\n{}", indexer.log());
        }
        assert!(
            Instant::now() < deadline,
            "the indexer did not catch up once Kafka was reachable:\n{}",
            indexer.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        indexer.log().contains("dead-letter topic"),
        "the wait was not reported:\n{}",
        indexer.log()
    );
    indexer.kill9();
}

/// The table's rows as the index should hold them: each column under its field (a renamed
/// column under the field its alias points at).
async fn rows_as_fields(s: &Stack, table: &str, alias: &str) -> BTreeMap<String, Value> {
    let props = s.search.properties(alias).await;
    let field_of = |col: &str| -> String {
        match props.get(col) {
            Some(m) if m["type"] == "alias" => m["path"].as_str().unwrap_or(col).to_string(),
            _ => col.to_string(),
        }
    };
    s.rows(table)
        .await
        .into_iter()
        .map(|(id, row)| {
            let row = row
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (field_of(k), v.clone()))
                        .collect::<Map<_, _>>()
                })
                .unwrap_or_default();
            (id, Value::Object(row))
        })
        .collect()
}

/// Equal, or the same scalar as text: an `ALTER COLUMN ... TYPE` rewrites every row in
/// Postgres without row events, so a document keeps the old representation (`10` for `'10'`)
/// until its row is next written.
fn same_value(doc: &Value, row: &Value) -> bool {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    doc == row || (!doc.is_object() && !row.is_object() && text(doc) == text(row))
}

/// Waits until every row of `table` is in `alias` with the same values under its fields, and
/// nothing else is (fields of dropped columns left in old documents are ignored).
async fn wait_equal_fields(s: &Stack, table: &str, alias: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = rows_as_fields(s, table, alias).await;
        let docs = s.docs(alias).await;
        let same = rows.len() == docs.len()
            && rows.iter().all(|(id, row)| {
                docs.get(id).is_some_and(|d| {
                    row.as_object().is_some_and(|r| {
                        r.iter()
                            .all(|(k, v)| same_value(d.get(k).unwrap_or(&Value::Null), v))
                    })
                })
            });
        if same {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{alias} never matched {table}:\nrows {rows:?}\ndocs {docs:?}\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_follows_schema_changes_and_a_reindex_resolves_a_type_conflict() {
    let mut s = Stack::start(
        "CREATE TABLE prods (id int PRIMARY KEY, name text, price int, qty int);
         INSERT INTO prods SELECT g, 'p' || g, g * 3, g FROM generate_series(1, 40) g;
         CREATE TABLE doomed (id int PRIMARY KEY, v text); INSERT INTO doomed VALUES (1, 'x');
         CREATE TABLE ev (id int, day date, note text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE ev_2024 PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         INSERT INTO ev VALUES (1, '2024-02-02', 'one');",
    )
    .await;
    let mut indexer = s.indexer();
    s.wait_equal("prods", "public.prods", Duration::from_secs(60))
        .await;
    s.wait_equal("doomed", "public.doomed", Duration::from_secs(30))
        .await;

    // Add, rename, drop, and DDL with DML in one transaction.
    s.exec("ALTER TABLE prods ADD COLUMN color text; UPDATE prods SET color = 'red' WHERE id <= 5")
        .await;
    s.exec("ALTER TABLE prods RENAME COLUMN name TO title; UPDATE prods SET title = 't' || id WHERE id <= 10").await;
    s.exec("BEGIN; ALTER TABLE prods DROP COLUMN price; INSERT INTO prods (id, title, qty) VALUES (100, 'new', 1); COMMIT").await;
    // A new table, renamed, truncated; a dropped table; a partitioned table's new column.
    s.exec("CREATE TABLE fresh (id int PRIMARY KEY, v text); INSERT INTO fresh VALUES (1, 'one')")
        .await;
    s.exec("ALTER TABLE fresh RENAME TO fresh2; INSERT INTO fresh2 VALUES (2, 'two')")
        .await;
    s.exec("TRUNCATE fresh2; INSERT INTO fresh2 VALUES (3, 'three')")
        .await;
    s.exec("DROP TABLE doomed").await;
    s.exec(
        "ALTER TABLE ev ADD COLUMN tag text; INSERT INTO ev VALUES (2, '2024-03-03', 'two', 't')",
    )
    .await;

    wait_equal_fields(&s, "prods", "public.prods", Duration::from_secs(60)).await;
    let props = s.search.properties("public.prods").await;
    assert_eq!(
        props["title"],
        serde_json::json!({"type": "alias", "path": "name"}),
        "{props:?}"
    );
    assert_eq!(props["color"]["type"], "text");
    let docs = s.docs("public.prods").await;
    assert!(
        docs["100"].get("price").is_none(),
        "a dropped column is not written"
    );
    assert_eq!(
        docs["3"]["name"], "t3",
        "rows written under the new name land in the old field"
    );
    s.wait_equal("fresh2", "public.fresh2", Duration::from_secs(30))
        .await;
    assert_eq!(
        s.search.alias_targets("public.fresh2").await,
        vec!["public.fresh-v1"]
    );
    assert!(
        s.search.alias_targets("public.fresh").await.is_empty(),
        "the old alias moved"
    );
    s.wait_equal("fresh2", "public.fresh2", Duration::from_secs(30))
        .await;
    // The partitioned table (composite key: documents are keyed `id|day`).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut notes: Vec<(Value, Value)> = s
            .docs("public.ev")
            .await
            .values()
            .map(|d| {
                (
                    d["note"].clone(),
                    d.get("tag").cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        notes.sort_by_key(|n| n.0.to_string());
        if notes == [("one".into(), Value::Null), ("two".into(), "t".into())] {
            break;
        }
        assert!(Instant::now() < deadline, "ev: {notes:?}\n{}", s.all_logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.search.properties("public.ev").await["tag"]["type"],
        "text"
    );
    assert!(
        !s.search
            .indices()
            .await
            .iter()
            .any(|i| i.starts_with("public.doomed")),
        "a dropped table's index is deleted: {:?}",
        s.search.indices().await
    );
    let meta = s.search.meta("public.prods").await;
    assert_eq!(
        meta["walrelay"]["fields"]["2"], "name",
        "column ids kept in _meta: {meta}"
    );

    // A type the mapping cannot take: logged and counted; the rows it refuses are
    // dead-lettered, and a re-index maps the column anew.
    s.exec(
        "ALTER TABLE prods ALTER COLUMN qty TYPE text; UPDATE prods SET qty = 'many' WHERE id = 1",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !indexer.log().contains("type_change") {
        assert!(
            Instant::now() < deadline,
            "no conflict logged\n{}",
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s.run_reindex().await;
    let targets = s.search.alias_targets("public.prods").await;
    assert!(
        targets.len() == 1 && targets[0] != "public.prods-v1",
        "the alias moved to the rebuilt index: {targets:?}"
    );
    let props = s.search.properties("public.prods").await;
    assert_eq!(
        props["qty"]["type"], "text",
        "the build maps the current type"
    );
    assert_eq!(
        props["title"]["type"], "text",
        "the build stores the column under its current name"
    );
    wait_equal_fields(&s, "prods", "public.prods", Duration::from_secs(60)).await;
    assert_eq!(s.docs("public.prods").await["1"]["qty"], "many");
    // After the re-index (a build cannot hold two tables under one name): a new table under the renamed one's old name gets an index of its own.
    s.exec("CREATE TABLE fresh (id int PRIMARY KEY, w int); INSERT INTO fresh VALUES (9, 9)")
        .await;
    s.wait_equal("fresh", "public.fresh", Duration::from_secs(30))
        .await;
    let (fresh, fresh2) = (
        s.search.alias_targets("public.fresh").await,
        s.search.alias_targets("public.fresh2").await,
    );
    assert!(
        fresh.len() == 1 && fresh2.len() == 1 && fresh != fresh2,
        "two tables, two indexes: {fresh:?} {fresh2:?}"
    );
    s.assert_clean();
    indexer.kill9();
}
