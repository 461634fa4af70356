//! The slot's lifecycle: an interrupted snapshot is taken again; a vanished slot is refused.

use std::time::Duration;

use walrelay_common::event::Op;

use crate::support::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_snapshot_takes_the_snapshot_again() {
    let mut env = Env::start().await;
    env.pg
        .exec(&env.db, "CREATE TABLE big (id int PRIMARY KEY, pad text);
                        INSERT INTO big SELECT g, repeat('p', 200) FROM generate_series(1, 100000) g;")
        .await;
    env.init();
    let mut p = env.spawn(&[
        "--max-buffer-bytes",
        "1MiB",
        "--snapshot-chunk-pages",
        "64",
        "--snapshot-parallelism",
        "2",
    ]);
    // Kill once some snapshot rows are in Kafka but not all.
    env.read_until(Duration::from_secs(60), |r| r.len() >= 2000);
    p.kill9();
    let status = env.cmd(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(st["snapshot_status"], "pending", "{st}");
    let mut p = env.spawn(&[]);
    // A complete second snapshot: every id among the snapshot rows with the newest consistent
    // point. Only parsed once there can be that many (the first attempt's rows come first):
    // parsing every record at each of the reader's batches made the wait quadratic, and on a
    // loaded machine it ran out of time.
    let records = env.read_until(Duration::from_secs(120), |r| {
        if r.len() <= 100_000 {
            return false;
        }
        let newest = r
            .iter()
            .map(|x| x.envelope())
            .filter(|e| e.op == Op::Read)
            .map(|e| e.source.lsn)
            .max();
        let n = r
            .iter()
            .map(|x| x.envelope())
            .filter(|e| Some(e.source.lsn) == newest && e.op == Op::Read)
            .count();
        n == 100_000
    });
    assert!(
        records.len() > 100_000,
        "the first, partial snapshot is in the topic too"
    );
    let st: serde_json::Value =
        serde_json::from_slice(&env.cmd(&["status", "--json"]).stdout).expect("status json");
    assert_eq!(st["snapshot_status"], "done", "{st}");
    assert_eq!(st["snapshot_tables"][0]["rows"], 100_000, "{st}");
    p.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_after_its_snapshot_is_refused() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);",
        )
        .await;
    env.init();
    let mut p = env.spawn(&[]);
    env.read_until(Duration::from_secs(60), |r| !r.is_empty());
    assert_eq!(p.terminate(), Some(0));
    env.pg
        .exec(
            &env.db,
            &format!("SELECT pg_drop_replication_slot('{}')", env.slot),
        )
        .await;
    let mut p = env.spawn(&[]);
    let code = env.exit_code(&mut p, Duration::from_secs(60)).await;
    assert_eq!(
        code,
        Some(3),
        "refuses with exit code 3\n{}",
        env.all_logs()
    );
    assert!(env.all_logs().contains("vanished"), "{}", env.all_logs());
    assert!(!env.slot_exists().await, "never recreated silently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_cannot_be_split_stops_loudly_and_is_not_confirmed() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE notes (id int PRIMARY KEY, body text);",
        )
        .await;
    env.init();
    // message.max.bytes is walrelay's to set (from --max-event-bytes): refused, naming the fix.
    let out = env.cmd(&["--kafka-property", "message.max.bytes=20000", "run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--max-event-bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut p = env.spawn(&["--max-event-bytes", "64KiB"]);
    env.wait_streaming(Duration::from_secs(60)).await;
    // A row over the limit is split (see large.rs); a schema event is not: a table of 1000
    // long-named columns makes one of about 250 KB.
    let columns: Vec<String> = (0..1000)
        .map(|i| format!("a_rather_long_column_name_to_make_the_schema_event_large_{i:04} int"))
        .collect();
    env.pg
        .exec(
            &env.db,
            &format!(
                "CREATE TABLE wide (id int PRIMARY KEY, {}); INSERT INTO wide (id) VALUES (1);",
                columns.join(", ")
            ),
        )
        .await;
    let committed = env.insert_lsn().await;
    let c = env.pg.client(&env.db).await;
    let code = env.exit_code(&mut p, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "stops with an error\n{}", env.all_logs());
    let logs = env.all_logs();
    assert!(
        logs.contains("wide") && logs.contains("--max-event-bytes"),
        "names the table and the setting\n{logs}"
    );
    let unconfirmed: bool = c
        .query_one(
            "SELECT confirmed_flush_lsn < $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.slot, &committed],
        )
        .await
        .expect("slot")
        .get(0);
    assert!(
        unconfirmed,
        "the transaction stays unconfirmed, so a fixed producer re-reads it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_wal_was_removed_is_refused() {
    let mut env = Env::start_with(&[("max_slot_wal_keep_size", "1MB")]).await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE t (id int PRIMARY KEY, pad text); INSERT INTO t VALUES (1, 'x');",
        )
        .await;
    env.init();
    let mut p = env.spawn(&[]);
    env.wait_streaming(Duration::from_secs(60)).await;
    assert_eq!(p.terminate(), Some(0));
    // With the producer stopped, WAL past max_slot_wal_keep_size and a checkpoint remove what
    // the slot still needed.
    let c = env.pg.client(&env.db).await;
    let mut status = String::new();
    for _ in 0..10 {
        c.batch_execute(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 20) FROM generate_series(2, 20000) g ON CONFLICT (id) DO UPDATE SET pad = EXCLUDED.pad;
             SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .expect("generate WAL");
        status = c
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.slot],
            )
            .await
            .expect("slot")
            .get::<_, Option<String>>(0)
            .unwrap_or_default();
        if status == "lost" {
            break;
        }
    }
    assert_eq!(status, "lost", "the test could not invalidate the slot");
    let mut p = env.spawn(&[]);
    assert_eq!(
        env.exit_code(&mut p, Duration::from_secs(60)).await,
        Some(3),
        "refuses with exit code 3\n{}",
        env.all_logs()
    );
    assert!(
        env.all_logs().contains("wal_status = lost"),
        "{}",
        env.all_logs()
    );
}
