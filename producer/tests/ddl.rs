//! DDL in the ordered log: schema events before the rows that depend on them, on every
//! partition, under every partition key; stable column ids; the Relation fallback.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use walrelay_common::event::{Envelope, Op};
use walrelay_tests::process::Proc;
use walrelay_tests::topic::{Record, check_schema_order, table_state};

use crate::support::Env;

const PARTITIONS: i32 = 3;

/// Short transactions on `items` that stay valid whatever DDL runs meanwhile: inserts of the
/// key alone, no-op updates (full row images under the schema of the moment), deletes.
async fn racing_writes(url: String, stop: tokio_util::sync::CancellationToken) -> u64 {
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let mut txns = 0;
    while !stop.is_cancelled() {
        let id: i64 = rng.gen_range(1000..1200);
        let sql = match rng.gen_range(0..3) {
            0 => format!("INSERT INTO items (id) VALUES ({id}) ON CONFLICT DO NOTHING"),
            1 => format!(
                "UPDATE items SET id = id WHERE id = {}",
                rng.gen_range(1..30)
            ),
            _ => format!("DELETE FROM items WHERE id = {id}"),
        };
        client.batch_execute(&sql).await.expect("racing write");
        txns += 1;
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    txns
}

fn envelopes(records: &[Record]) -> Vec<(i32, Envelope)> {
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    sorted.iter().map(|r| (r.partition, r.envelope())).collect()
}

/// The schema events of `table` on partition 0, in order, each version once (a restart
/// delivers the unconfirmed ones again, byte-identical).
fn schema_events(records: &[Record], table: &str) -> Vec<Envelope> {
    let mut seen = BTreeSet::new();
    envelopes(records)
        .into_iter()
        .filter(|(p, e)| *p == 0 && e.op == Op::Ddl && e.source.table == table)
        .map(|(_, e)| e)
        .filter(|e| seen.insert(e.schema_version))
        .collect()
}

fn ids(e: &Envelope) -> BTreeMap<String, i32> {
    e.ddl
        .as_ref()
        .map(|d| d.columns.iter().map(|c| (c.name.clone(), c.id)).collect())
        .unwrap_or_default()
}

/// `id -> (a2, d, e)` from the topic (rows are applied as written: a consumer maps old names
/// through the column ids; here the rename is known).
fn items_topic(records: &[Record]) -> BTreeMap<i64, Vec<Value>> {
    table_state(records, "public", "items", "id")
        .into_values()
        .map(|row| {
            let id = row.get("id").and_then(Value::as_i64).unwrap_or(-1);
            let pick = |c: &str| row.get(c).cloned().unwrap_or(Value::Null);
            // A row not written since the rename still has the column's old name.
            let a2 = row
                .get("a2")
                .or(row.get("a"))
                .cloned()
                .unwrap_or(Value::Null);
            (id, vec![a2, pick("d"), pick("e")])
        })
        .collect()
}

async fn items_pg(env: &Env) -> BTreeMap<i64, Vec<Value>> {
    let c = env.pg.client(&env.db).await;
    c.query("SELECT id, a2, d, e FROM items", &[])
        .await
        .expect("select")
        .iter()
        .map(|r| {
            let a2: Option<String> = r.get(1);
            let d: Option<i32> = r.get(2);
            let e: Option<i32> = r.get(3);
            (
                r.get::<_, i64>(0),
                vec![
                    a2.map_or(Value::Null, Value::from),
                    d.map_or(Value::Null, Value::from),
                    e.map_or(Value::Null, Value::from),
                ],
            )
        })
        .collect()
}

async fn ddl_under(mode: &str) {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id bigint PRIMARY KEY, a text, b int, gen bigint GENERATED ALWAYS AS (id * 2) STORED);
             INSERT INTO items (id, a, b) SELECT g, 'a' || g, g FROM generate_series(1, 40) g;
             CREATE TABLE events (id bigint, day date, payload text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
             CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
             INSERT INTO events VALUES (1, '2024-03-01', 'one');",
        )
        .await;
    let out = env.cmd(&["--tables", "public.*", "init"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "init: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("event triggers installed"), "{stdout}");
    let args = [
        "--tables",
        "public.*",
        "--partition-key",
        mode,
        "--topic-partitions",
        "3",
    ];
    let mut producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(60)).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(racing_writes(env.url(), stop.clone()));
    let pause = || tokio::time::sleep(Duration::from_millis(150));
    let admin = env.pg.client(&env.db).await;
    let sql = |s: &'static str| {
        let admin = &admin;
        async move {
            admin
                .batch_execute(s)
                .await
                .unwrap_or_else(|e| panic!("{s}: {e:?}"))
        }
    };
    sql("ALTER TABLE items ADD COLUMN c text DEFAULT 'x'").await;
    pause().await;
    sql("ALTER TABLE items RENAME COLUMN a TO a2").await;
    pause().await;
    sql("ALTER TABLE items ALTER COLUMN b TYPE bigint").await;
    pause().await;
    // A crash between DDLs: the next session must tag rows with the versions it had.
    producer.kill9();
    producer = env.spawn(&args);
    sql("ALTER TABLE items DROP COLUMN c").await;
    pause().await;
    // DDL and DML in one transaction, rows before and after the DDL.
    sql("BEGIN; INSERT INTO items (id, a2) VALUES (5000, 'before'); ALTER TABLE items ADD COLUMN d int;
         INSERT INTO items (id, d) VALUES (5001, 7); UPDATE items SET d = 1 WHERE id < 5; COMMIT")
        .await;
    sql("BEGIN; ALTER TABLE items ADD COLUMN e int; UPDATE items SET e = 2 WHERE id BETWEEN 5 AND 9;
         ALTER TABLE items RENAME COLUMN e TO e_tmp; ALTER TABLE items RENAME COLUMN e_tmp TO e; COMMIT")
        .await;
    // The DDL inside a savepoint (another subtransaction than the rows around it).
    sql("BEGIN; INSERT INTO items (id) VALUES (5002); SAVEPOINT s; ALTER TABLE items ADD COLUMN f int;
         RELEASE s; INSERT INTO items (id, f) VALUES (5003, 3); COMMIT")
        .await;
    sql("CREATE TABLE fresh (id int PRIMARY KEY, v text); INSERT INTO fresh VALUES (1, 'one')")
        .await;
    sql("ALTER TABLE fresh RENAME TO fresh2; INSERT INTO fresh2 VALUES (2, 'two')").await;
    sql("TRUNCATE fresh2; INSERT INTO fresh2 VALUES (3, 'three')").await;
    sql("CREATE TABLE doomed (id int PRIMARY KEY); INSERT INTO doomed VALUES (1); DROP TABLE doomed")
        .await;
    sql("ALTER TABLE events ADD COLUMN tag text; INSERT INTO events VALUES (2, '2024-04-01', 'two', 't')")
        .await;
    sql("CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO events VALUES (3, '2025-02-01', 'three', 'u')")
        .await;
    sql("CREATE INDEX ON items (a2)").await;
    pause().await;
    stop.cancel();
    let txns = writer.await.expect("writer");
    assert!(txns > 50, "racing writes ran: {txns}");
    sql("INSERT INTO items (id, a2) VALUES (9999, 'last')").await;
    let expected = items_pg(&env).await;
    let done = |r: &[Record]| {
        items_topic(r) == expected
            && table_state(r, "public", "events", "id").len() == 3
            && table_state(r, "public", "fresh2", "id").len() == 1
    };
    let records = walrelay_tests::topic::try_read_until(
        &env.broker.brokers(),
        &env.topic,
        Duration::from_secs(90),
        done,
    )
    .unwrap_or_else(|r| {
        let got = items_topic(&r);
        let diff: Vec<_> = expected
            .iter()
            .filter(|(k, v)| got.get(k) != Some(v))
            .take(10)
            .collect();
        let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(k)).take(10).collect();
        panic!(
            "{mode}: {} records; items differ {diff:?} extra {extra:?}; events {:?}; fresh2 {:?}\n{}",
            r.len(),
            table_state(&r, "public", "events", "id"),
            table_state(&r, "public", "fresh2", "id"),
            env.all_logs()
        )
    });

    let rows = check_schema_order(&records).unwrap_or_else(|e| panic!("{mode}: {e}"));
    assert!(rows > 100, "{rows} row events checked");

    // Every schema event is on every partition.
    let mut copies: BTreeMap<(String, u64), BTreeSet<i32>> = BTreeMap::new();
    for (p, e) in envelopes(&records) {
        if e.op == Op::Ddl {
            copies
                .entry((e.source.table.clone(), e.schema_version))
                .or_default()
                .insert(p);
        }
    }
    for (k, parts) in &copies {
        assert_eq!(
            parts.len(),
            PARTITIONS as usize,
            "{mode}: {k:?} on {parts:?}"
        );
    }

    let items = schema_events(&records, "items");
    let first = ids(&items[0]);
    assert_eq!(
        items[0].ddl.as_ref().map(|d| d.origin.as_str()),
        Some("snapshot")
    );
    assert!(
        items[0]
            .ddl
            .as_ref()
            .is_some_and(|d| d.columns.iter().any(|c| c.name == "gen" && c.generated)),
        "generated column flagged"
    );
    assert!(
        !items[0].column_ids.parse().contains_key("gen"),
        "generated columns are not in row images"
    );
    let last = ids(items.last().expect("items events"));
    assert_eq!(first["a"], last["a2"], "a rename keeps the column id");
    assert_eq!(first["b"], last["b"], "a type change keeps the column id");
    let versions: Vec<u64> = items.iter().map(|e| e.schema_version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions grow: {versions:?}"
    );
    let c_id = items
        .iter()
        .find_map(|e| ids(e).get("c").copied())
        .expect("c added");
    assert!(
        !last.contains_key("c") && !last.values().any(|&i| i == c_id),
        "c's id retired"
    );
    assert!(
        last["d"] > c_id && last["e"] > last["d"] && last["f"] > last["e"],
        "added columns get new ids"
    );
    let retype = items
        .iter()
        .find(|e| {
            e.ddl
                .as_ref()
                .and_then(|d| d.sql.as_deref())
                .is_some_and(|s| s.contains("TYPE bigint"))
        })
        .expect("retype event");
    let b = retype
        .ddl
        .as_ref()
        .and_then(|d| d.columns.iter().find(|c| c.name == "b"))
        .expect("b");
    assert_eq!(
        (b.type_oid, b.type_name.as_str(), b.logical.as_str()),
        (20, "bigint", "integer")
    );
    assert!(
        items
            .iter()
            .all(|e| e.ddl.as_ref().is_some_and(|d| d.origin != "relation")),
        "with triggers, no fallback events"
    );
    // One event per effective change: the index creation and the partition added are none.
    // snapshot, add c, rename a, retype b, drop c, add d, (add e + 2 renames in one txn: 3),
    // add f in a savepoint
    assert_eq!(items.len(), 10, "{mode}: {versions:?}");

    let fresh = schema_events(&records, "fresh");
    let ddl = fresh[0].ddl.as_ref().expect("ddl");
    assert_eq!(
        (ddl.origin.as_str(), ddl.command.as_deref()),
        ("trigger", Some("CREATE TABLE"))
    );
    let renamed = schema_events(&records, "fresh2");
    let prev = renamed[0]
        .ddl
        .as_ref()
        .and_then(|d| d.previous.clone())
        .expect("previous name");
    assert_eq!(
        (prev.schema.as_str(), prev.table.as_str()),
        ("public", "fresh")
    );
    let doomed = schema_events(&records, "doomed");
    assert_eq!(doomed.len(), 2, "created, then dropped");
    assert!(
        doomed[1]
            .ddl
            .as_ref()
            .is_some_and(|d| d.dropped && d.command.as_deref() == Some("DROP TABLE"))
    );
    let events = schema_events(&records, "events");
    assert_eq!(
        events.len(),
        2,
        "snapshot and add column; the new partition changes nothing"
    );
    assert!(ids(&events[1]).contains_key("tag"));
    assert!(
        schema_events(&records, "events_2024").is_empty()
            && schema_events(&records, "events_2025").is_empty(),
        "partitions are published through their root"
    );
    stop_producer(&env, &mut producer);
}

fn stop_producer(env: &Env, producer: &mut Proc) {
    assert_eq!(
        producer.terminate(),
        Some(0),
        "SIGTERM exits 0\n{}",
        env.all_logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_events_precede_rows_keyed_by_schema() {
    ddl_under("schema").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_events_precede_rows_keyed_by_table() {
    ddl_under("table").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_events_precede_rows_keyed_by_primary_key() {
    ddl_under("primary-key").await;
}

/// Without the event triggers (a role that may not create them), schema events come from
/// Relation messages at the next row, and a rename still keeps the column id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_event_triggers_relation_messages_give_schema_events() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            &format!(
                "CREATE ROLE app LOGIN REPLICATION; ALTER DATABASE {} OWNER TO app; GRANT CREATE ON SCHEMA public TO app;",
                env.db
            ),
        )
        .await;
    env.user = "app".into();
    let app = env.url();
    let exec = |sql: &'static str| {
        let app = app.clone();
        async move {
            let (c, conn) = tokio_postgres::connect(&app, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            c.batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    };
    exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, a text); INSERT INTO items VALUES (1, 'one');
          CREATE TABLE quiet (id int PRIMARY KEY, v text)",
    )
    .await;
    let check = env.cmd(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        report.contains("ddl capture") && report.contains("superuser"),
        "{report}"
    );
    let out = env.cmd(&["init"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "init: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("warning: DDL event triggers not installed"),
        "{stdout}"
    );
    let mut producer = env.spawn(&["--partition-key", "primary-key", "--topic-partitions", "3"]);
    env.wait_streaming(Duration::from_secs(60)).await;
    exec("ALTER TABLE items ADD COLUMN c int; INSERT INTO items VALUES (2, 'two', 2)").await;
    exec("ALTER TABLE items RENAME COLUMN a TO a2; UPDATE items SET c = 3 WHERE id = 1").await;
    // A DDL on a table nobody writes to is not seen until its next row.
    exec("ALTER TABLE quiet ADD COLUMN w int").await;
    exec("INSERT INTO items VALUES (3, 'three', 3)").await;
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        table_state(r, "public", "items", "id").len() == 3
    });
    assert!(
        schema_events(&records, "quiet").len() == 1,
        "only the snapshot's schema of quiet"
    );
    exec("INSERT INTO quiet VALUES (1, 'v', 1)").await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        table_state(r, "public", "quiet", "id").len() == 1
    });
    check_schema_order(&records).unwrap_or_else(|e| panic!("{e}"));
    let items = schema_events(&records, "items");
    let origins: Vec<&str> = items
        .iter()
        .filter_map(|e| e.ddl.as_ref().map(|d| d.origin.as_str()))
        .collect();
    assert_eq!(origins, ["snapshot", "relation", "relation"]);
    assert_eq!(
        ids(&items[0])["a"],
        ids(&items[2])["a2"],
        "the rename kept the id"
    );
    assert!(
        items[1].ddl.as_ref().is_some_and(|d| d.sql.is_none()),
        "no DDL text without triggers"
    );
    let quiet = schema_events(&records, "quiet");
    assert_eq!(quiet.len(), 2);
    assert!(ids(&quiet[1]).contains_key("w"));
    stop_producer(&env, &mut producer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_role_can_neither_forge_nor_stop_the_ddl_channel() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id bigint PRIMARY KEY, v text); INSERT INTO items VALUES (1, 'one');
             CREATE ROLE mallory LOGIN;",
        )
        .await;
    env.init();
    let metrics = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let mut producer = env.spawn(&["--metrics-addr", &metrics]);
    env.wait_streaming(Duration::from_secs(60)).await;

    let mallory_url = env
        .url()
        .replace("postgres://postgres@", "postgres://mallory@");
    let (mallory, conn) = tokio_postgres::connect(&mallory_url, tokio_postgres::NoTls)
        .await
        .expect("connect as mallory");
    tokio::spawn(conn);
    let forged_body = serde_json::json!({
        "command": "DROP TABLE", "object": "public.items", "sql": "DROP TABLE items",
        "publications": [], "dropped": true,
        "table": {"table_oid": 1, "schema": "public", "table": "items", "columns": []}
    })
    .to_string();
    for content in [
        "{garbage".to_string(),
        forged_body.clone(),
        format!("v1:{}:{forged_body}", "0".repeat(64)),
        "v1:short".to_string(),
    ] {
        mallory
            .query_one(
                "SELECT pg_logical_emit_message(true, 'walrelay.ddl', $1::text)::text",
                &[&content],
            )
            .await
            .unwrap_or_else(|e| panic!("mallory emits a message: {e}"));
    }
    let stolen = mallory
        .query_opt("SELECT key FROM walrelay.ddl_key", &[])
        .await;
    assert!(
        stolen.is_err(),
        "an unprivileged role must not read the key"
    );

    // A real schema change afterwards is still verified and applied.
    env.pg
        .exec(
            &env.db,
            "ALTER TABLE items ADD COLUMN w int; INSERT INTO items VALUES (2, 'two', 2)",
        )
        .await;
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        table_state(r, "public", "items", "id").len() == 2
    });
    assert!(
        producer.try_exit().is_none(),
        "the producer keeps streaming\n{}",
        env.all_logs()
    );
    let events = schema_events(&records, "items");
    let origins: Vec<(&str, bool)> = events
        .iter()
        .filter_map(|e| e.ddl.as_ref().map(|d| (d.origin.as_str(), d.dropped)))
        .collect();
    assert_eq!(
        origins,
        [("snapshot", false), ("trigger", false)],
        "no forged schema event, the real one verified"
    );
    assert!(ids(&events[1]).contains_key("w"));
    let body = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        body.lines()
            .any(|l| l == "walrelay_producer_errors_total{kind=\"ddl_rejected\"} 4"),
        "four rejected messages counted:\n{}",
        body.lines()
            .filter(|l| l.contains("errors_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    stop_producer(&env, &mut producer);
}
