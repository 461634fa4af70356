//! Writes only to a table that is not captured do not make the slot retain WAL.

use std::time::Duration;

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
    let mut retained = i64::MAX;
    for _ in 0..30 {
        c.batch_execute("CHECKPOINT").await.expect("checkpoint");
        retained = c
            .query_one(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .expect("slot")
            .get(0);
        if retained < 2 * 16 * 1024 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        retained < 2 * 16 * 1024 * 1024,
        "slot retains {retained} bytes of WAL\n{}",
        env.all_logs()
    );
    producer.terminate();
}
