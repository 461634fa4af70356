//! Broker failover: a three-node Kafka cluster (replication factor 3, `min.insync.replicas=2`),
//! the producer streaming under concurrent transactions, and the leader of the busiest
//! partition SIGKILLed and later restarted, twice. Every committed row reaches the topic, each
//! key's changes keep their commit order, and the slot never confirms what Kafka lost.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::util::Timeout;
use walrelay_tests::kafka::KafkaCluster;

use crate::stream::{items_from_pg, items_from_topic, write_load};
use crate::support::Env;

/// The partition of `topic` holding the most records.
fn busiest_partition(brokers: &str, topic: &str, partitions: i32) -> i32 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("consumer");
    (0..partitions)
        .max_by_key(|p| {
            consumer
                .fetch_watermarks(topic, *p, Timeout::After(Duration::from_secs(10)))
                .map(|(lo, hi)| hi - lo)
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_partition_leader_twice_loses_and_reorders_nothing() {
    let cluster = Arc::new(KafkaCluster::start(3));
    let mut env = Env::start_on(&[], Arc::clone(&cluster)).await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id bigint PRIMARY KEY, val int, note text);
             CREATE TABLE ledger (id bigserial PRIMARY KEY, amount int NOT NULL);
             INSERT INTO items SELECT g, g, 'row ' || g FROM generate_series(1, 500) g;",
        )
        .await;
    env.init();
    let mut producer = env.spawn(&[
        "--topic-partitions",
        "3",
        "--partition-key",
        "primary-key",
        "--max-buffer-bytes",
        "4MiB",
    ]);
    env.wait_streaming(Duration::from_secs(120)).await;
    let load = tokio::spawn(write_load(env.url(), Duration::from_secs(45), 11));
    let url = env.url();
    let ledger = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(45) {
            c.batch_execute("INSERT INTO ledger (amount) SELECT g FROM generate_series(1, 5) g")
                .await
                .expect("ledger");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let brokers = cluster.brokers();
    let mut killed = Vec::new();
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let partition = busiest_partition(&brokers, &env.topic, 3);
        let leader = cluster
            .leader_of(&env.topic, partition)
            .unwrap_or_else(|| panic!("partition {partition} has no leader"));
        eprintln!("round {round}: SIGKILL node {leader}, leader of partition {partition}");
        cluster.kill_node(leader);
        // The partition gets a new leader among the two remaining replicas.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match cluster.leader_of(&env.topic, partition) {
                Some(l) if l != leader => break,
                _ => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new leader for partition {partition}\n{}",
                cluster.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            producer.try_exit().is_none(),
            "the producer keeps running while a broker is down\n{}",
            env.all_logs()
        );
        cluster.restart_node(leader);
        cluster.wait_brokers(3, Duration::from_secs(120));
        killed.push(leader);
    }
    load.await.expect("load");
    ledger.await.expect("ledger");
    env.wait_confirmed_current(Duration::from_secs(120)).await;

    // Every row of both tables is in the topic, as the tables hold them now.
    let expected = items_from_pg(&env).await;
    let c = env.pg.client(&env.db).await;
    let ledger_ids: BTreeSet<i64> = c
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("ledger ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ledger_ids.len() > 1000, "the ledger load ran");
    let records = env.read_until(Duration::from_secs(120), |r| {
        let seen: BTreeSet<i64> = r
            .iter()
            .filter(|x| x.envelope().source.table == "ledger")
            .filter_map(|x| {
                x.envelope()
                    .after
                    .and_then(|a| a.get("id").and_then(|v| v.as_i64()))
            })
            .collect();
        seen.is_superset(&ledger_ids) && items_from_topic(r) == expected
    });

    // Per key, changes appear in commit order (commit LSN, then sequence); a position seen
    // before may come again only as a re-delivery of the same event.
    let mut last: BTreeMap<(String, Vec<u8>), (u64, u64)> = BTreeMap::new();
    let mut seen: BTreeSet<(u64, u64, Vec<u8>)> = BTreeSet::new();
    let mut ordered = records.clone();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    for r in &ordered {
        let e = r.envelope();
        if e.source.snapshot || r.key.is_empty() {
            continue;
        }
        let pos = (e.source.commit_lsn, e.source.seq);
        let k = (e.source.table.clone(), r.key.clone());
        let first_copy = seen.insert((pos.0, pos.1, r.key.clone()));
        if let Some(prev) = last.get(&k)
            && pos < *prev
        {
            assert!(
                !first_copy,
                "key {:?} of {}: change at {pos:?} after {prev:?} (partition {}, offset {})",
                String::from_utf8_lossy(&r.key),
                e.source.table,
                r.partition,
                r.offset
            );
        }
        let newest = last.get(&k).map_or(pos, |prev| pos.max(*prev));
        last.insert(k, newest);
    }
    eprintln!(
        "killed nodes {killed:?}; {} records, {} ledger rows",
        records.len(),
        ledger_ids.len()
    );
    assert_eq!(producer.terminate(), Some(0), "{}", env.all_logs());
}
