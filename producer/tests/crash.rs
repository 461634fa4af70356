//! The producer killed with SIGKILL at random moments, restarted many times, loses no committed
//! change, and every re-delivered event is byte-identical to its first copy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use walrelay_common::event::Op;

use crate::stream::{items_from_pg, items_from_topic, write_load};
use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_loses_no_committed_change() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id bigint PRIMARY KEY, val int, note text);
                        CREATE TABLE ledger (id bigserial PRIMARY KEY, amount int NOT NULL);
                        INSERT INTO items SELECT g, g, 'row ' || g FROM generate_series(1, 500) g;",
        )
        .await;
    env.init();
    let load = tokio::spawn(write_load(env.url(), Duration::from_secs(25), 7));
    let url = env.url();
    let ledger = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(25) {
            let rows = (n % 10) + 1;
            c.batch_execute(&format!(
                "INSERT INTO ledger (amount) SELECT g FROM generate_series(1, {rows}) g"
            ))
            .await
            .expect("ledger");
            n += 1;
            // Paced: a steady stream with many commits for the kills to land between.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // The first run takes the snapshot; then SIGKILL at random moments of the stream.
    let mut first = env.spawn(&["--max-buffer-bytes", "1MiB"]);
    env.wait_streaming(Duration::from_secs(60)).await;
    first.kill9();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(42);
    for _ in 0..8 {
        let mut p = env.spawn(&["--max-buffer-bytes", "1MiB"]);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2500))).await;
        p.kill9();
    }
    let mut producer = env.spawn(&[]);
    load.await.expect("load");
    ledger.await.expect("ledger");
    let expected = items_from_pg(&env).await;
    let c = env.pg.client(&env.db).await;
    let ledger_ids: BTreeSet<i64> = c
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("ledger ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let records = env.read_until(Duration::from_secs(120), |r| {
        let seen: BTreeSet<i64> = r
            .iter()
            .map(|x| x.envelope())
            .filter(|e| e.source.table == "ledger" && e.op != Op::Delete)
            .filter_map(|e| e.after.and_then(|a| a.get("id").and_then(|v| v.as_i64())))
            .collect();
        seen == ledger_ids && items_from_topic(r) == expected
    });
    // Duplicates are byte-identical: one payload per (commit LSN, position) of a streamed change.
    let mut copies: BTreeMap<(u64, u64, Vec<u8>), BTreeSet<Vec<u8>>> = BTreeMap::new();
    for r in &records {
        let e = r.envelope();
        if !e.source.snapshot {
            copies
                .entry((e.source.commit_lsn, e.source.seq, r.key.clone()))
                .or_default()
                .insert(r.value.clone());
        }
    }
    for (k, v) in &copies {
        assert_eq!(
            v.len(),
            1,
            "re-delivery of {k:?} differs from the first copy: {v:?}"
        );
    }
    let streamed = records
        .iter()
        .filter(|r| !r.envelope().source.snapshot)
        .count();
    let duplicates = streamed - copies.len();
    eprintln!(
        "records {} streamed {} distinct {} duplicates {duplicates}",
        records.len(),
        streamed,
        copies.len()
    );
    assert_eq!(producer.terminate(), Some(0), "{}", env.all_logs());
}
