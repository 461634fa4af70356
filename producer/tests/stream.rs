//! Snapshot plus stream under concurrent writes rebuilds exactly the table's final state.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use walrelay_common::event::Op;
use walrelay_tests::topic::{Record, table_state};

use crate::support::Env;

/// `id -> (val, note)` as the topic describes `public.items`.
pub fn items_from_topic(records: &[Record]) -> BTreeMap<i64, (Option<i64>, Option<String>)> {
    table_state(records, "public", "items", "id")
        .into_values()
        .map(|row| {
            let id = row.get("id").and_then(|v| v.as_i64()).expect("id");
            let val = row.get("val").and_then(|v| v.as_i64());
            let note = row.get("note").and_then(|v| v.as_str()).map(str::to_string);
            (id, (val, note))
        })
        .collect()
}

pub async fn items_from_pg(env: &Env) -> BTreeMap<i64, (Option<i64>, Option<String>)> {
    let c = env.pg.client(&env.db).await;
    c.query("SELECT id, val::int8, note FROM items", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                (r.get::<_, Option<i64>>(1), r.get::<_, Option<String>>(2)),
            )
        })
        .collect()
}

/// Random inserts, updates and deletes on `items` for `duration`, in small transactions.
pub async fn write_load(env_url: String, duration: Duration, seed: u64) -> u64 {
    let (client, conn) = tokio_postgres::connect(&env_url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let start = std::time::Instant::now();
    let mut txns = 0;
    while start.elapsed() < duration {
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.gen_range(1..8) {
            let id: i64 = rng.gen_range(1..3000);
            match rng.gen_range(0..4) {
                0 | 1 => sql.push_str(&format!(
                    "INSERT INTO items VALUES ({id}, {}, 'n{}') ON CONFLICT (id) DO UPDATE SET val = items.val + 1;",
                    rng.gen_range(0..1000),
                    rng.r#gen::<u32>()
                )),
                2 => sql.push_str(&format!("UPDATE items SET val = val + 1, note = note || 'x' WHERE id = {id};")),
                _ => sql.push_str(&format!("DELETE FROM items WHERE id = {id};")),
            }
        }
        sql.push_str("COMMIT;");
        client.batch_execute(&sql).await.expect("write");
        txns += 1;
        // Paced: many small commits interleave with the snapshot and the kills.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    txns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_under_concurrent_writes_rebuilds_the_table() {
    let mut env = Env::start().await;
    env.pg
        .exec(&env.db, "CREATE TABLE items (id bigint PRIMARY KEY, val int, note text);
                        INSERT INTO items SELECT g, g, 'row ' || g FROM generate_series(1, 2000) g;")
        .await;
    env.init();
    // Writes run before, during and after the snapshot.
    let load = tokio::spawn(write_load(env.url(), Duration::from_secs(6), 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut producer = env.spawn(&["--snapshot-chunk-pages", "4", "--snapshot-parallelism", "3"]);
    let txns = load.await.expect("load");
    assert!(txns > 20, "the load ran");
    let expected = items_from_pg(&env).await;
    let records = env.read_until(Duration::from_secs(90), |r| items_from_topic(r) == expected);
    let ops: Vec<Op> = records
        .iter()
        .map(|r| r.envelope().op)
        .filter(|op| *op != Op::Ddl && !op.is_snapshot_marker())
        .collect();
    assert_eq!(
        records.first().map(|r| r.envelope().op),
        Some(Op::Ddl),
        "the table's schema event comes first"
    );
    assert!(
        ops.iter().filter(|o| **o == Op::Read).count() >= 1900,
        "snapshot rows present"
    );
    for op in [Op::Create, Op::Update, Op::Delete] {
        assert!(ops.contains(&op), "streamed {op:?} present");
    }
    // Every snapshot row precedes every streamed change in the (single) partition.
    let first_stream = ops
        .iter()
        .position(|o| *o != Op::Read)
        .expect("stream events");
    assert!(
        ops[first_stream..].iter().all(|o| *o != Op::Read),
        "no snapshot row after a streamed change"
    );
    assert_eq!(
        producer.terminate(),
        Some(0),
        "SIGTERM exits 0\n{}",
        env.all_logs()
    );
}
