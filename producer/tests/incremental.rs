//! Incremental snapshots against real Postgres and Kafka: a table re-read in chunks between
//! watermarks while a writer updates and deletes its rows; the producer killed in the middle;
//! refusals, `--cancel` and `status`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Map, Value};
use walrelay_tests::topic::{Record, incremental, table_state, versions_never_go_back};

use crate::support::Env;

const ROWS: i64 = 50_000;

/// A table of `ROWS` rows, each with a version the writer increments.
async fn accounts(env: &Env) {
    env.pg
        .exec(
            &env.db,
            &format!(
                "CREATE TABLE acct (id bigint PRIMARY KEY, version int NOT NULL, note text);
                 INSERT INTO acct SELECT g, 0, 'row ' || g FROM generate_series(1, {ROWS}) g;"
            ),
        )
        .await;
}

/// Updates (version + 1) and deletes random rows, and inserts new ones, until told to stop;
/// returns how many statements it ran.
fn writer(env: &Env, stop: tokio_util::sync::CancellationToken) -> tokio::task::JoinHandle<u64> {
    let url = env.url();
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let mut next_id = ROWS + 1;
        let mut n = 0u64;
        while !stop.is_cancelled() {
            let mut sql = String::from("BEGIN;");
            for _ in 0..40 {
                let id = rng.gen_range(1..=ROWS);
                match rng.gen_range(0..100) {
                    0..=84 => sql.push_str(&format!(
                        "UPDATE acct SET version = version + 1 WHERE id = {id};"
                    )),
                    85..=94 => sql.push_str(&format!("DELETE FROM acct WHERE id = {id};")),
                    _ => {
                        sql.push_str(&format!("INSERT INTO acct VALUES ({next_id}, 0, 'new');"));
                        next_id += 1;
                    }
                }
                n += 1;
            }
            sql.push_str("COMMIT;");
            c.batch_execute(&sql).await.expect("write");
            // Busy, yet not so busy that a debug-build producer on two shared cores falls
            // far behind.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        n
    })
}

/// The table as Postgres has it, keyed like `table_state`.
async fn table_rows(env: &Env) -> BTreeMap<String, Map<String, Value>> {
    let c = env.pg.client(&env.db).await;
    c.query("SELECT id, version, note FROM acct", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let version: i32 = r.get(1);
            let note: Option<String> = r.get(2);
            let mut m = Map::new();
            m.insert("id".into(), Value::from(id));
            m.insert("version".into(), Value::from(version));
            m.insert("note".into(), note.map_or(Value::Null, Value::from));
            (id.to_string(), m)
        })
        .collect()
}

/// What the topic holds of row `id` of `acct`, one line per event.
fn history(records: &[Record], id: i64) -> String {
    let mut out = String::new();
    for x in records {
        let v: Value = serde_json::from_slice(&x.value).unwrap_or_default();
        let row = if v["after"].is_null() {
            &v["before"]
        } else {
            &v["after"]
        };
        if row["id"].as_i64() == Some(id) && v["source"]["table"] == "acct" {
            out.push_str(&format!(
                "  offset {} op {} version {} lsn {} commit_lsn {} txid {} incremental {}\n",
                x.offset,
                v["op"],
                row["version"],
                v["source"]["lsn"],
                v["source"]["commit_lsn"],
                v["source"]["txid"],
                v["source"]["incremental"]
            ));
        }
    }
    out
}

/// Checks [`versions_never_go_back`], printing the offending row's history on failure.
fn check_versions(records: &[Record]) -> usize {
    versions_never_go_back(records, "acct", "id", "version")
        .unwrap_or_else(|(id, e)| panic!("{e}\n{}", history(records, id)))
}

/// `(state, rows, chunks, dropped)` of the table's newest request.
async fn request_state(env: &Env, table: &str) -> Option<(String, i64, i64, i64)> {
    let c = env.pg.client(&env.db).await;
    c.query_opt(
        "SELECT state, rows_done, chunks_done, rows_dropped FROM walrelay.incremental_snapshot \
         WHERE table_name = $1 ORDER BY request_id DESC LIMIT 1",
        &[&table],
    )
    .await
    .expect("incremental_snapshot")
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

async fn wait_state(
    env: &Env,
    table: &str,
    timeout: Duration,
    done: impl Fn(&(String, i64, i64, i64)) -> bool,
) -> (String, i64, i64, i64) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = request_state(env, table).await
            && done(&s)
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "incremental snapshot of {table} never reached the state: {:?}\n{}",
            request_state(env, table).await,
            env.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["snapshot"];
    all.extend_from_slice(args);
    let out = env.cmd(&all);
    assert!(
        out.status.success(),
        "snapshot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads the topic until the rebuilt table equals Postgres', then checks the order rule.
async fn topic_matches_table(env: &Env) -> Vec<Record> {
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    let expected = table_rows(env).await;
    // Confirmed past every write: Kafka acknowledged every event of them, so reading the
    // topic to its end reads them all.
    let r = walrelay_tests::topic::read_to_end(
        &env.broker.brokers(),
        &env.topic,
        Duration::from_secs(180),
    );
    let got = table_state(&r, "public", "acct", "id");
    if got != expected {
        {
            // Which rows differ, and what the topic holds of them.
            let mut report = String::new();
            let keys: std::collections::BTreeSet<&String> =
                got.keys().chain(expected.keys()).collect();
            for k in keys
                .into_iter()
                .filter(|k| got.get(*k) != expected.get(*k))
                .take(5)
            {
                report.push_str(&format!(
                    "id {k}: topic {:?}, table {:?}\n",
                    got.get(k),
                    expected.get(k)
                ));
                report.push_str(&history(&r, k.parse().unwrap_or_default()));
            }
            panic!(
                "the topic does not rebuild the table ({} rows vs {}):\n{report}\n{}",
                got.len(),
                expected.len(),
                env.all_logs()
            );
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_under_concurrent_writes_matches_the_table() {
    resnapshot_under_writes(&[]).await;
}

/// The same under exactly-once delivery: a chunk counts once the Kafka transaction holding
/// its rows committed, and read_committed readers see the same guarantee.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resnapshot_under_exactly_once() {
    resnapshot_under_writes(&["--delivery", "exactly-once"]).await;
}

async fn resnapshot_under_writes(extra: &[&str]) {
    let mut env = Env::start().await;
    accounts(&env).await;
    env.init();
    // No initial snapshot: what the topic holds of the table's existing rows comes from the
    // incremental snapshot only.
    let mut args = vec!["--snapshot", "never", "--incremental-chunk-rows", "1000"];
    args.extend_from_slice(extra);
    let mut producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = writer(&env, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = request(&env, &["--tables", "public.acct"]);
    assert!(
        out.contains("public.acct: incremental snapshot requested"),
        "{out}"
    );
    let (state, rows, chunks, dropped) =
        wait_state(&env, "acct", Duration::from_secs(180), |s| s.0 == "done").await;
    stop.cancel();
    let statements = load.await.expect("writer");
    assert_eq!(state, "done");
    assert!(chunks >= 40, "chunks: {chunks}");
    assert!(
        dropped > 0,
        "no row was dropped by a window ({statements} writes during the snapshot): the window logic was not exercised"
    );
    let records = topic_matches_table(&env).await;
    let checked = check_versions(&records);
    let inc = records.iter().filter(|r| incremental(r)).count() as i64;
    assert_eq!(
        inc, rows,
        "incremental rows in the topic vs counted as done"
    );
    assert_eq!(checked as i64, rows);
    // Every existing row that survived the writer came through the incremental snapshot or
    // the stream: the table was rebuilt from the topic alone (no initial snapshot).
    assert!(rows > ROWS / 2, "rows: {rows}");
    eprintln!(
        "incremental: {rows} rows, {chunks} chunks, {dropped} dropped; writer: {statements} statements"
    );
    producer.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_resnapshot_resumes_at_the_last_chunk() {
    let mut env = Env::start().await;
    accounts(&env).await;
    env.init();
    let args = ["--snapshot", "never", "--incremental-chunk-rows", "500"];
    let mut first = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let load = writer(&env, stop.clone());
    request(&env, &["--tables", "public.acct"]);
    let (_, _, at_kill, _) =
        wait_state(&env, "acct", Duration::from_secs(120), |s| s.2 >= 10).await;
    first.kill9();
    let (state, _, chunks_after_kill, _) = request_state(&env, "acct").await.expect("request");
    assert_eq!(state, "running", "the snapshot was not in the middle");
    assert!(chunks_after_kill >= at_kill);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = env.spawn(&args);
    let (state, rows, chunks, _) =
        wait_state(&env, "acct", Duration::from_secs(180), |s| s.0 == "done").await;
    stop.cancel();
    load.await.expect("writer");
    assert_eq!(state, "done");
    // Resumed: the chunks counted before the kill stay counted, and at most the chunks in
    // flight at the kill were read twice.
    assert!(chunks > chunks_after_kill);
    let records = topic_matches_table(&env).await;
    check_versions(&records);
    let inc = records.iter().filter(|r| incremental(r)).count() as i64;
    assert!(
        inc <= rows + 2 * 500,
        "{inc} incremental rows in the topic for {rows} counted: the snapshot started over instead of resuming"
    );
    let before_kill = second.log();
    assert!(
        before_kill.contains("resume_after=Some("),
        "the restarted producer did not resume after a key:\n{before_kill}"
    );
    second.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_cancel_and_status() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE nokey (a int, b text);
             CREATE TABLE big (id int PRIMARY KEY, v text);
             INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 20000) g;",
        )
        .await;
    env.init();
    // A table without a key: refused, naming it and the fix; nothing is requested.
    let out = env.cmd(&["snapshot", "--tables", "public.nokey"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("table public.nokey has no primary key or replica-identity index")
            && err.contains("ADD PRIMARY KEY"),
        "{err}"
    );
    // A --where that does not apply is refused naming the option.
    let out = env.cmd(&["snapshot", "--tables", "public.big", "--where", "nope > 1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--where does not apply to public.big"));
    // Without --tables: refused.
    let out = env.cmd(&["snapshot"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(request_state(&env, "nokey").await.is_none());
    assert!(request_state(&env, "big").await.is_none());

    let mut producer = env.spawn(&["--incremental-chunk-rows", "100"]);
    env.wait_streaming(Duration::from_secs(60)).await;
    request(&env, &["--tables", "public.big", "--where", "id % 2 = 0"]);
    // A second request while one is under way is refused.
    let out = env.cmd(&["snapshot", "--tables", "public.big"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already under way"));
    wait_state(&env, "big", Duration::from_secs(60), |s| s.2 >= 3).await;
    let status = env.cmd(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("incremental snapshots:")
            && text.contains("public.big (request")
            && text.contains("running"),
        "{text}"
    );
    let out = request(&env, &["--cancel", "--tables", "public.big"]);
    assert!(
        out.contains("public.big: incremental snapshot cancelled"),
        "{out}"
    );
    let (state, _, chunks, _) = request_state(&env, "big").await.expect("request");
    assert_eq!(state, "cancelled");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (state, _, later, _) = request_state(&env, "big").await.expect("request");
    assert_eq!(state, "cancelled");
    assert!(
        later <= chunks + 1,
        "chunks went on after the cancel: {chunks} -> {later}"
    );
    let json = env.cmd(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&json.stdout).expect("status --json");
    let reqs = v["incremental"]
        .as_array()
        .expect("incremental in status --json");
    assert_eq!(reqs[0]["table"], "public.big");
    assert_eq!(reqs[0]["state"], "cancelled");
    assert_eq!(reqs[0]["where_clause"], "id % 2 = 0");
    assert!(reqs[0]["last_key"].is_array());
    // Only even ids were read, and only as many as the chunks done.
    let records = env.read_until(Duration::from_secs(30), |r| {
        r.iter().filter(|x| incremental(x)).count() >= 300
    });
    for r in records.iter().filter(|x| incremental(x)) {
        let id = r.envelope().after.unwrap_or_default()["id"]
            .as_i64()
            .expect("id");
        assert_eq!(id % 2, 0, "a row outside --where: {id}");
    }

    // A forged watermark (any role can write logical messages) is skipped, and streaming goes
    // on.
    env.pg
        .exec(
            &env.db,
            &format!(
                "SELECT pg_logical_emit_message(true, 'walrelay.watermark', 'v1:{}:{{\"session\":\"x\",\"chunk\":1,\"mark\":\"high\"}}')",
                "0".repeat(64)
            ),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !producer
        .log()
        .contains("Skipped a message in walrelay's watermark channel")
    {
        assert!(
            Instant::now() < deadline,
            "the forged watermark was not reported\n{}",
            producer.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A table captured after the initial snapshot is snapshotted by itself.
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE late (id int PRIMARY KEY, v text);
             INSERT INTO late SELECT g, 'l' || g FROM generate_series(1, 250) g;",
        )
        .await;
    // The DDL trigger added `late` to the publication; the slot's initial snapshot never
    // read it, so the producer starts an incremental snapshot of it by itself.
    let (state, rows, _, _) =
        wait_state(&env, "late", Duration::from_secs(60), |s| s.0 == "done").await;
    assert_eq!((state.as_str(), rows), ("done", 250));
    let records = env.read_until(Duration::from_secs(30), |r| {
        table_state(r, "public", "late", "id").len() == 250
    });
    assert!(
        records
            .iter()
            .filter(|x| x.envelope().source.table == "late")
            .any(incremental)
    );
    producer.terminate();
}
