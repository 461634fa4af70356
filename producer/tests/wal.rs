//! What the slot retains: writes only to a table that is not captured do not make it retain
//! WAL, and the retained-WAL gauge keeps counting while Kafka is unreachable.

use std::time::Duration;

use walrelay_tests::metrics;

use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_an_uncaptured_table_do_not_grow_retained_wal() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE captured (id int PRIMARY KEY); CREATE TABLE other (id serial, pad text);
                        INSERT INTO captured VALUES (1);",
        )
        .await;
    let out = env.cmd(&["--tables", "public.captured", "init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut producer = env.spawn(&["--tables", "public.captured"]);
    env.read_until(Duration::from_secs(60), |r| !r.is_empty());
    // About 64 MiB of WAL in a table outside the publication.
    for _ in 0..8 {
        env.pg
            .exec(&env.db, "INSERT INTO other (pad) SELECT repeat(md5(g::text), 8) FROM generate_series(1, 25000) g")
            .await;
    }
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    let c = env.pg.client(&env.db).await;
    let mut held = i64::MAX;
    for _ in 0..30 {
        c.batch_execute("CHECKPOINT").await.expect("checkpoint");
        held = env.retained_wal().await;
        if held < 2 * 16 * 1024 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        held < 2 * 16 * 1024 * 1024,
        "slot retains {held} bytes of WAL\n{}",
        env.all_logs()
    );
    producer.terminate();
}

/// A producer that (re)starts while Kafka is unreachable never gets a session as far as
/// streaming; the slot's gauges must still follow the WAL it holds, or the alert on retained
/// WAL growing is blind in the outage it exists for (the chaos run of 2026-12-03 found it
/// reading 0 through Kafka blackouts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_wal_is_reported_while_kafka_is_unreachable() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id int PRIMARY KEY, pad text);",
        )
        .await;
    env.init();
    let mut producer = env.spawn(&[]);
    env.read_until(Duration::from_secs(60), |r| !r.is_empty());
    producer.terminate();

    // A broker address nothing listens on.
    let nowhere = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let metrics = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let mut producer = env.spawn_on_brokers(&nowhere, &["--metrics-addr", &metrics]);
    let name = "walrelay_producer_slot_retained_wal_bytes";
    let mut last = 0.0;
    for round in 1..=2 {
        // About 3.5 MiB of WAL in a captured table per round, which the slot must hold.
        env.pg
            .exec(
                &env.db,
                &format!(
                    "INSERT INTO items SELECT g, repeat(md5(g::text), 8) \
                     FROM generate_series({}, {}) g",
                    round * 100_000,
                    round * 100_000 + 9_999
                ),
            )
            .await;
        let want = env.retained_wal().await;
        assert!(want > 2 << 20, "the slot retains only {want} bytes");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = metrics::value(&metrics, name).await;
            if seen.is_some_and(|v| v >= want as f64 && v > last) {
                last = seen.unwrap_or_default();
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} reads {seen:?} while the slot retains {want} bytes (round {round})\n{}",
                env.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        producer.try_exit().is_none(),
        "the producer waits for Kafka\n{}",
        env.all_logs()
    );
    producer.terminate();
}
