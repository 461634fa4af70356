//! `--delivery exactly-once`: Kafka transactions, the progress topic, and fencing.
//!
//! The workload is multi-statement Postgres transactions whose first statement records, in
//! `txlog`, how many row events the transaction makes; a `read_committed` reader can then tell
//! a whole transaction from a part of one. The reader samples the topic while the producer is
//! dead (after each SIGKILL), when anything visible is all Kafka will ever show of that moment.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use walrelay_common::event::{Envelope, Op};

use crate::support::Env;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, val int, note text);
     CREATE TABLE counters (id int PRIMARY KEY, v bigint NOT NULL);
     CREATE TABLE txlog (id bigserial PRIMARY KEY, events int NOT NULL);
     INSERT INTO items SELECT g, g, 'row ' || g FROM generate_series(1, 300) g;
     INSERT INTO counters SELECT g, 0 FROM generate_series(1, 50) g;";

/// Multi-statement transactions until `duration` is over; each first writes its event count
/// to `txlog`. Returns the number committed.
async fn ledger_load(url: String, duration: Duration, seed: u64) -> u64 {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < duration {
        let mut body = String::new();
        let mut events = 1; // the txlog row
        for _ in 0..rng.gen_range(1..7) {
            let id: i64 = rng.gen_range(1..600);
            match rng.gen_range(0..3) {
                // Exactly one event each: an insert or an update.
                0 => body.push_str(&format!(
                    "INSERT INTO items VALUES ({id}, {}, 'n{}') ON CONFLICT (id) DO UPDATE SET val = items.val + 1, note = excluded.note;",
                    rng.gen_range(0..1000),
                    rng.r#gen::<u32>()
                )),
                1 => body.push_str(&format!(
                    "UPDATE counters SET v = v + 1 WHERE id = {};",
                    rng.gen_range(1..=50)
                )),
                // Two events: an insert and its delete.
                _ => {
                    let tmp = 1_000_000 + rng.gen_range(0..1_000_000i64);
                    body.push_str(&format!(
                        "INSERT INTO items VALUES ({tmp}, 0, 'tmp') ON CONFLICT (id) DO NOTHING; DELETE FROM items WHERE id = {tmp};"
                    ));
                    events += 1;
                }
            }
            events += 1;
        }
        let sql = format!("BEGIN; INSERT INTO txlog (events) VALUES ({events}); {body} COMMIT;");
        client.batch_execute(&sql).await.expect("write");
        n += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(2..8))).await;
    }
    n
}

/// A `read_committed` reader of every partition that keeps what it read.
struct Reader {
    consumer: BaseConsumer,
    records: Vec<Envelope>,
}

impl Reader {
    fn new(brokers: &str, topic: &str, partitions: i32) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", walrelay_tests::unique("eos"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        Self {
            consumer,
            records: Vec::new(),
        }
    }

    /// Reads until nothing new has arrived for `quiet`.
    fn catch_up(&mut self, quiet: Duration) {
        let mut last_new = Instant::now();
        while last_new.elapsed() < quiet {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let env =
                        Envelope::from_slice(m.payload().unwrap_or_default()).expect("envelope");
                    self.records.push(env);
                    last_new = Instant::now();
                }
                Some(Err(KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(e)) => eprintln!("reader: {e}"),
            }
        }
    }
}

/// What the reader saw, by Postgres transaction (commit LSN).
#[derive(Default, Debug)]
struct Ledger {
    /// Streamed row events per transaction (by commit LSN and position).
    copies: BTreeMap<(u64, u64), u32>,
    /// Events per transaction, and the count its txlog row announced.
    per_txn: BTreeMap<u64, (u64, Option<u64>)>,
}

fn ledger(records: &[Envelope]) -> Ledger {
    let mut l = Ledger::default();
    for e in records {
        if e.source.snapshot || !matches!(e.op, Op::Create | Op::Update | Op::Delete) {
            continue;
        }
        *l.copies
            .entry((e.source.commit_lsn, e.source.seq))
            .or_default() += 1;
        let entry = l.per_txn.entry(e.source.commit_lsn).or_default();
        entry.0 += 1;
        if e.source.table == "txlog" {
            entry.1 = e
                .after
                .as_ref()
                .and_then(|a| a.get("events"))
                .and_then(|v| v.as_u64());
        }
    }
    l
}

impl Ledger {
    fn duplicates(&self) -> u32 {
        self.copies.values().map(|c| c - 1).sum()
    }

    /// Transactions of which the reader holds only a part (distinct events below the count).
    fn partial(&self) -> Vec<u64> {
        let mut distinct: BTreeMap<u64, u64> = BTreeMap::new();
        for (lsn, _) in self.copies.keys() {
            *distinct.entry(*lsn).or_default() += 1;
        }
        self.per_txn
            .iter()
            .filter(|(lsn, (_, announced))| {
                announced.is_none_or(|n| distinct.get(lsn).copied().unwrap_or(0) != n)
            })
            .map(|(lsn, _)| *lsn)
            .collect()
    }
}

struct KillReport {
    kills: u32,
    duplicates: u32,
    partial_samples: usize,
}

/// 30 SIGKILLs at random moments under the ledger load with `delivery`, sampling after each;
/// then checks that nothing is missing and the rebuilt state equals the tables.
async fn kill_thirty_times(delivery: &str, seed: u64) -> KillReport {
    let mut env = Env::start().await;
    env.pg.exec(&env.db, SCHEMA).await;
    env.init();
    let args = [
        "--delivery",
        delivery,
        "--partition-key",
        "primary-key",
        "--topic-partitions",
        "3",
        "--max-buffer-bytes",
        "1MiB",
    ];
    let mut first = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(90)).await;
    let load = tokio::spawn(ledger_load(env.url(), Duration::from_secs(3600), seed));
    let mut reader = Reader::new(&env.broker.brokers(), &env.topic, 3);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
    first.kill9();
    let mut kills = 1;
    let mut partial_samples = 0;
    loop {
        // The producer is dead: what a read_committed reader sees now stays as it is.
        reader.catch_up(Duration::from_millis(600));
        let mut partial = ledger(&reader.records).partial();
        if !partial.is_empty() {
            // A partition's part may just not be fetched yet: look again, longer.
            reader.catch_up(Duration::from_secs(3));
            partial = ledger(&reader.records).partial();
        }
        if !partial.is_empty() {
            partial_samples += 1;
            if delivery == "exactly-once" {
                panic!(
                    "after kill {kills}: {} partial transactions visible to read_committed (first {:?})\n{}",
                    partial.len(),
                    partial.first(),
                    env.all_logs()
                );
            }
        }
        if kills == 30 {
            break;
        }
        let mut p = env.spawn(&args);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2500))).await;
        p.kill9();
        kills += 1;
    }
    load.abort();
    let _ = load.await;
    let mut producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.wait_confirmed_current(Duration::from_secs(120)).await;
    assert_eq!(producer.terminate(), Some(0), "{}", env.all_logs());

    // Everything committed in Postgres is there, whole; the state rebuilt equals the tables.
    reader.catch_up(Duration::from_millis(1500));
    let l = ledger(&reader.records);
    let c = env.pg.client(&env.db).await;
    let txlog: BTreeSet<i64> = c
        .query("SELECT id FROM txlog", &[])
        .await
        .expect("txlog")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let seen_txlog: BTreeSet<i64> = reader
        .records
        .iter()
        .filter(|e| e.source.table == "txlog" && e.op == Op::Create)
        .filter_map(|e| e.after.as_ref()?.get("id")?.as_i64())
        .collect();
    let missing: Vec<_> = txlog.difference(&seen_txlog).collect();
    assert!(
        missing.is_empty(),
        "{delivery}: {} committed transactions missing (first {:?})\n{}",
        missing.len(),
        missing.first(),
        env.all_logs()
    );
    assert!(
        l.partial().is_empty(),
        "{delivery}: partial transactions at the end: {:?}",
        l.partial()
    );
    let state = rebuild(&reader.records);
    let items: BTreeMap<i64, (i32, String)> = c
        .query("SELECT id, val, note FROM items", &[])
        .await
        .expect("items")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(state.items.len(), items.len(), "{delivery}: items rows");
    assert!(
        state.items == items,
        "{delivery}: items rebuilt from the topic differ from the table"
    );
    let counters: BTreeMap<i32, i64> = c
        .query("SELECT id, v FROM counters", &[])
        .await
        .expect("counters")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(state.counters, counters, "{delivery}: counters");
    KillReport {
        kills,
        duplicates: l.duplicates(),
        partial_samples,
    }
}

#[derive(Default)]
struct State {
    items: BTreeMap<i64, (i32, String)>,
    counters: BTreeMap<i32, i64>,
}

/// Applies row events in the order read (one row's events are in one partition, in order).
fn rebuild(records: &[Envelope]) -> State {
    let mut s = State::default();
    for e in records {
        let row = e.after.as_ref().or(e.before.as_ref());
        let Some(row) = row else { continue };
        let id = row.get("id").and_then(|v| v.as_i64());
        match (e.source.table.as_str(), e.op, id) {
            ("items", Op::Delete, Some(id)) => {
                s.items.remove(&id);
            }
            ("items", Op::Create | Op::Update | Op::Read, Some(id)) => {
                let val = row.get("val").and_then(|v| v.as_i64()).unwrap_or(0) as i32;
                let note = row
                    .get("note")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string();
                s.items.insert(id, (val, note));
            }
            ("counters", Op::Create | Op::Update | Op::Read, Some(id)) => {
                let v = row.get("v").and_then(|v| v.as_i64()).unwrap_or(0);
                s.counters.insert(id as i32, v);
            }
            _ => {}
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_thirty_kills_leave_no_duplicate_and_no_partial_transaction() {
    let r = kill_thirty_times("exactly-once", 11).await;
    eprintln!(
        "exactly-once: kills {} duplicates {} partial samples {}",
        r.kills, r.duplicates, r.partial_samples
    );
    assert_eq!(r.duplicates, 0, "exactly-once wrote duplicates");
    assert_eq!(r.partial_samples, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_thirty_kills_show_duplicates_and_lose_nothing() {
    let r = kill_thirty_times("at-least-once", 12).await;
    eprintln!(
        "at-least-once: kills {} duplicates {} partial samples {}",
        r.kills, r.duplicates, r.partial_samples
    );
    // What at-least-once allows: re-sent transactions after kills (0 missing was checked).
    assert!(
        r.duplicates > 0,
        "30 kills under load re-send something under at-least-once"
    );
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A producer frozen with an open Kafka transaction loses its replication connection; a
/// second producer takes the slot with the same transactional id. Its start fences the first
/// (whose open transaction is aborted, never visible), and when the first wakes up its commit
/// is refused: it stops with "fenced" instead of interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_producer_on_the_same_slot_fences_the_first() {
    let mut env = Env::start().await;
    env.pg.exec(&env.db, SCHEMA).await;
    env.init();
    // A long interval: the first producer surely holds an open transaction when frozen.
    let mut first = env.spawn(&["--delivery", "exactly-once", "--transaction-interval", "3s"]);
    env.wait_streaming(Duration::from_secs(90)).await;
    let load = tokio::spawn(ledger_load(env.url(), Duration::from_secs(3600), 5));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(first.pid(), "-STOP");
    let c = env.pg.client(&env.db).await;
    c.execute(
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1",
        &[&env.slot],
    )
    .await
    .expect("terminate the walsender");
    let mut second = env.spawn(&["--delivery", "exactly-once"]);
    env.wait_streaming(Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(first.pid(), "-CONT");
    // Woken, the first sees its replication connection gone and its Kafka identity fenced:
    // whichever it notices first, it never writes again. It stops with "fenced", or (when the
    // dropped connection ended its session first) waits for the slot, which the second holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first_log = first.log();
    match first.try_exit() {
        Some(code) => {
            eprintln!("the first producer stopped: fenced");
            assert_eq!(code, Some(1), "the fenced producer stops\n{first_log}");
            assert!(
                first_log.contains("fenced"),
                "it says it was fenced\n{first_log}"
            );
        }
        None => {
            eprintln!("the first producer waits for the slot");
            assert!(
                first_log.contains("another producer holds the slot"),
                "the first neither stopped nor waits for the slot\n{first_log}"
            );
            first.kill9();
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    load.abort();
    let _ = load.await;
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    assert_eq!(second.terminate(), Some(0), "{}", env.all_logs());

    let mut reader = Reader::new(&env.broker.brokers(), &env.topic, 1);
    reader.catch_up(Duration::from_millis(1500));
    let l = ledger(&reader.records);
    assert_eq!(l.duplicates(), 0, "the two producers interleaved");
    assert!(l.partial().is_empty(), "partial: {:?}", l.partial());
    let committed: i64 = c
        .query_one("SELECT count(*) FROM txlog", &[])
        .await
        .expect("txlog")
        .get(0);
    let seen = reader
        .records
        .iter()
        .filter(|e| e.source.table == "txlog" && e.op == Op::Create)
        .count();
    assert_eq!(seen as i64, committed, "every committed transaction, once");
}

/// Reads `topic` (all partitions) as JSON values until `n` records arrived.
fn json_records(brokers: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    walrelay_tests::topic::read_until(brokers, topic, Duration::from_secs(60), |r| r.len() >= n)
        .iter()
        .map(|r| serde_json::from_slice(&r.value).expect("json"))
        .collect()
}

/// `--transaction-metadata`: each data event says its place in its transaction, and
/// `<topic>.transactions` has BEGIN before and END after it with the counts per table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_metadata_tells_a_consumer_when_it_holds_a_whole_transaction() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY);",
        )
        .await;
    env.init();
    let mut p = env.spawn(&[
        "--delivery",
        "exactly-once",
        "--transaction-metadata",
        "--snapshot",
        "never",
    ]);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.pg
        .exec(
            &env.db,
            "BEGIN; INSERT INTO a VALUES (1, 'x'), (2, 'y'); INSERT INTO b VALUES (7); UPDATE a SET v = 'z' WHERE id = 1; COMMIT;
             BEGIN; CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1); COMMIT;
             DELETE FROM b;",
        )
        .await;
    let brokers = env.broker.brokers();
    let meta = json_records(&brokers, &format!("{}.transactions", env.topic), 4);
    let events: Vec<serde_json::Value> = json_records(&brokers, &env.topic, 5)
        .into_iter()
        .filter(|e| e["op"] != "ddl")
        .collect();
    assert_eq!(p.terminate(), Some(0), "{}", env.all_logs());
    let status: Vec<&str> = meta
        .iter()
        .map(|m| m["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(status, ["BEGIN", "END", "BEGIN", "END"], "{meta:#?}");
    let first_id = meta[0]["id"].as_str().expect("id");
    assert_eq!(meta[1]["id"], meta[0]["id"]);
    assert!(meta[0]["event_count"].is_null());
    assert_eq!(meta[1]["event_count"], 4);
    assert_eq!(
        meta[1]["data_collections"],
        serde_json::json!([
            {"data_collection": "public.a", "event_count": 3},
            {"data_collection": "public.b", "event_count": 1}
        ])
    );
    assert_eq!(
        meta[3]["event_count"], 1,
        "the temp-table transaction has none"
    );
    let first: Vec<_> = events
        .iter()
        .filter(|e| e["transaction"]["id"] == first_id)
        .map(|e| {
            (
                e["source"]["table"].as_str().unwrap_or("").to_string(),
                e["transaction"]["total_order"].as_u64().unwrap_or(0),
                e["transaction"]["data_collection_order"]
                    .as_u64()
                    .unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        first,
        [
            ("a".to_string(), 1, 1),
            ("a".to_string(), 2, 2),
            ("b".to_string(), 3, 1),
            ("a".to_string(), 4, 3)
        ]
    );
    // The shared decoder reads the block too.
    let decoded: Envelope = serde_json::from_value(events[0].clone()).expect("envelope");
    assert_eq!(
        decoded.transaction.as_ref().map(|t| t.id.as_str()),
        Some(first_id)
    );
    let txid = events[0]["source"]["txid"].as_u64().expect("txid");
    let commit_lsn = events[0]["source"]["commit_lsn"].as_u64().expect("lsn");
    assert_eq!(first_id, format!("{txid}:{commit_lsn}"));
}
