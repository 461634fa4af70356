//! What leaves the database: `--columns-exclude`, `--columns-mask` and `--row-filter` against
//! real Postgres 15 and Kafka. Every record of the topic (keys and values, raw bytes) is
//! searched for the withheld values; hashes are checked against Postgres' own `sha256`; the
//! filtered table rebuilt from the topic must equal the `SELECT … WHERE` of its predicate.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use walrelay_common::event::Op;
use walrelay_tests::topic::Record;

use crate::support::Env;

const SALT: &str = "salt-5f0c2b7d9e1a4c36";
/// Values that must never be in the topic, whatever their column's fate.
const SECRETS: [&str; 8] = [
    "pwhash-SNAP-1",
    "pwhash-STREAM-2",
    "ssn-111-22-3333",
    "ssn-444-55-6666",
    "ann@example.org",
    "bob@example.org",
    "note-SECRET-a",
    "reset-SECRET-default",
];

fn stdout_and_err(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `init` with extra options, which must succeed.
fn init_with(env: &Env, extra: &[&str]) {
    let mut args = extra.to_vec();
    args.push("init");
    let out = env.cmd(&args);
    assert!(out.status.success(), "init: {}", stdout_and_err(&out));
}

/// Postgres' own SHA-256 of the salt followed by `value` (independent of the producer's).
async fn pg_hash(env: &Env, value: &str) -> String {
    env.pg
        .client(&env.db)
        .await
        .query_one(
            "SELECT encode(sha256(convert_to($1 || $2, 'UTF8')), 'hex')",
            &[&SALT, &value],
        )
        .await
        .expect("sha256")
        .get(0)
}

fn events<'r>(
    records: &'r [Record],
    table: &str,
) -> Vec<(&'r Record, walrelay_common::event::Envelope)> {
    records
        .iter()
        .map(|r| (r, r.envelope()))
        .filter(|(_, e)| e.source.table == table)
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

const POLICY: [&str; 8] = [
    "--columns-exclude",
    "public.*.password_*,public.users.ssn",
    "--columns-mask",
    "public.users.email=hash,public.users.note=redact,public.accounts.acct=hash",
    "--partition-key",
    "primary-key",
    "--mask-salt",
    SALT,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_and_masked_columns_never_leave_in_any_event() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, ssn text, note text, age int);
             ALTER TABLE users REPLICA IDENTITY FULL;
             CREATE TABLE accounts (acct text PRIMARY KEY, balance int, password_pin text);
             INSERT INTO users VALUES (1, 'ann@example.org', 'pwhash-SNAP-1', 'ssn-111-22-3333', 'note-SECRET-a', 30),
                                      (2, NULL, NULL, NULL, NULL, 40);
             INSERT INTO accounts VALUES ('ACCT-RAW-0001', 10, 'pin-1');",
        )
        .await;
    env.init();

    // `check` shows the plan, never the salt.
    let mut check = POLICY.to_vec();
    check.push("check");
    let out = env.cmd(&check);
    let text = stdout_and_err(&out);
    assert!(!text.contains(SALT), "check prints the salt:\n{text}");
    assert!(
        text.contains(
            "public.users: excluded: password_hash, ssn; masked: email=hash, note=redact"
        ),
        "{text}"
    );
    assert!(text.contains("mask salt: set"), "{text}");
    check.push("--json");
    let out = env.cmd(&check);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !text.contains(SALT),
        "check --json prints the salt:\n{text}"
    );
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let users = json["plan"]["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["table"] == "public.users"))
        .unwrap_or_else(|| panic!("no users in the plan: {text}"));
    assert_eq!(
        users["excluded"],
        serde_json::json!(["password_hash", "ssn"])
    );
    assert_eq!(
        users["masked"][0],
        serde_json::json!({"column": "email", "mask": "hash"})
    );

    let mut producer = env.spawn(&POLICY);
    env.wait_streaming(Duration::from_secs(60)).await;
    let admin = env.pg.client(&env.db).await;
    for sql in [
        "INSERT INTO users VALUES (3, 'bob@example.org', 'pwhash-STREAM-2', 'ssn-444-55-6666', 'note-SECRET-a', 50)",
        // The same email as the snapshot's row 1: the same hash.
        "UPDATE users SET email = 'ann@example.org', age = 51 WHERE id = 3",
        "UPDATE users SET age = 31 WHERE id = 1",
        "DELETE FROM users WHERE id = 1",
        "ALTER TABLE users ADD COLUMN password_reset text DEFAULT 'reset-SECRET-default'",
        "INSERT INTO users (id, email, age) VALUES (4, 'bob@example.org', 60)",
        "UPDATE accounts SET balance = 11 WHERE acct = 'ACCT-RAW-0001'",
        "INSERT INTO accounts VALUES ('ACCT-RAW-0002', 20, 'pin-2')",
        "INSERT INTO users (id, age) VALUES (999, 0)",
    ] {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let records = env.read_until(Duration::from_secs(90), |r| {
        r.iter()
            .any(|x| contains(&x.value, "\"id\":999") && contains(&x.value, "\"op\":\"c\""))
    });
    producer.terminate();

    // No raw secret in any record's key or value, and no excluded column name either.
    for r in &records {
        for s in SECRETS.iter().chain(
            [
                "ACCT-RAW-0001",
                "ACCT-RAW-0002",
                "password_hash",
                "password_reset",
                "password_pin",
                "\"ssn\"",
                SALT,
            ]
            .iter(),
        ) {
            assert!(
                !contains(&r.value, s) && !contains(&r.key, s),
                "record {}:{} carries {s:?}: key {} value {}",
                r.partition,
                r.offset,
                String::from_utf8_lossy(&r.key),
                String::from_utf8_lossy(&r.value)
            );
        }
    }
    let ann = pg_hash(&env, "ann@example.org").await;
    let bob = pg_hash(&env, "bob@example.org").await;
    let acct1 = pg_hash(&env, "ACCT-RAW-0001").await;
    let users = events(&records, "users");
    let email_of =
        |image: &Option<Map<String, Value>>| image.as_ref().and_then(|m| m.get("email")).cloned();
    let mut seen = BTreeMap::new();
    for (_, e) in &users {
        seen.entry(e.op.code()).and_modify(|n| *n += 1).or_insert(1);
        let types = e.types.parse();
        for image in [&e.before, &e.after].into_iter().flatten() {
            assert!(
                !image.contains_key("password_hash") && !image.contains_key("ssn"),
                "{image:?}"
            );
            if let Some(note) = image.get("note").and_then(Value::as_str) {
                assert_eq!(note, "***", "note is redacted");
            }
        }
        if !types.is_empty() {
            assert_eq!(types.get("email"), Some(&Value::from("text")), "{types:?}");
            assert!(!types.contains_key("ssn") && !types.contains_key("password_hash"));
            let ids = e.column_ids.parse();
            assert!(
                !ids.contains_key("ssn") && ids.contains_key("email"),
                "{ids:?}"
            );
        }
        match e.op {
            Op::Read => {
                let id = e
                    .after
                    .as_ref()
                    .and_then(|a| a.get("id"))
                    .and_then(Value::as_i64);
                let email = email_of(&e.after);
                match id {
                    Some(1) => assert_eq!(email, Some(Value::from(ann.clone())), "snapshot hash"),
                    Some(2) => assert_eq!(email, Some(Value::Null), "NULL stays NULL"),
                    other => panic!("snapshot row {other:?}"),
                }
            }
            Op::Update if e.after.as_ref().and_then(|a| a.get("id")) == Some(&Value::from(3)) => {
                // Same value as the snapshot's row: the same hash (joins hold).
                assert_eq!(email_of(&e.after), Some(Value::from(ann.clone())));
                assert_eq!(email_of(&e.before), Some(Value::from(bob.clone())));
            }
            Op::Delete => {
                let before = e
                    .before
                    .as_ref()
                    .expect("REPLICA IDENTITY FULL: the old row");
                assert_eq!(before.get("email"), Some(&Value::from(ann.clone())));
                assert_eq!(before.get("age"), Some(&Value::from(31)));
                assert!(!before.contains_key("ssn"));
            }
            Op::Ddl => {
                let ddl = e.ddl.as_ref().expect("ddl");
                let names: Vec<&str> = ddl.columns.iter().map(|c| c.name.as_str()).collect();
                assert!(
                    !names
                        .iter()
                        .any(|n| n.starts_with("password") || *n == "ssn"),
                    "{names:?}"
                );
                let email = ddl
                    .columns
                    .iter()
                    .find(|c| c.name == "email")
                    .expect("email");
                assert_eq!((email.type_name.as_str(), email.type_oid), ("text", 25));
                if ddl.command.as_deref() == Some("ALTER TABLE") {
                    assert_eq!(ddl.sql, None, "the statement names an excluded column");
                }
            }
            _ => {}
        }
    }
    for op in ["r", "c", "u", "d", "ddl"] {
        assert!(seen.contains_key(op), "no {op} event of users: {seen:?}");
    }
    // A schema event after ADD COLUMN (the trigger's), without the new excluded column.
    assert!(
        users.iter().any(|(_, e)| e.op == Op::Ddl
            && e.ddl.as_ref().and_then(|d| d.command.as_deref()) == Some("ALTER TABLE")),
        "no schema event of the ALTER TABLE"
    );
    // A masked key column: the key is the hash, the same for every event of the row.
    let accounts = events(&records, "accounts");
    let keys: Vec<String> = accounts
        .iter()
        .filter(|(_, e)| matches!(e.op, Op::Read | Op::Update))
        .map(|(r, _)| String::from_utf8_lossy(&r.key).to_string())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter()
            .all(|k| *k == format!("{{\"acct\":\"{acct1}\"}}")),
        "{keys:?}"
    );

    // The salt is in no log line.
    for f in std::fs::read_dir(env.logs.path()).expect("logs") {
        let log = std::fs::read_to_string(f.expect("log").path()).unwrap_or_default();
        assert!(!log.contains(SALT), "a log carries the salt");
        assert!(
            !log.contains("pwhash-STREAM-2"),
            "a log carries a row value"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_columns_cannot_be_excluded_and_bad_row_filters_are_named() {
    let env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE t (id int PRIMARY KEY, region text, v int);",
        )
        .await;
    let out = env.cmd(&["--columns-exclude", "public.t.id", "init"]);
    let text = stdout_and_err(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("--columns-exclude: column \"id\" of public.t is part of its key")
            && text.contains("--columns-mask public.t.id=hash"),
        "{text}"
    );
    // A predicate on a column outside the replica identity (the primary key): Postgres would
    // accept it and refuse every later UPDATE of the table; walrelay refuses it first.
    let out = env.cmd(&["--row-filter", "public.t: region = 'eu'", "init"]);
    let text = stdout_and_err(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("--row-filter public.t: the predicate uses \"region\"")
            && text.contains("REPLICA IDENTITY FULL"),
        "{text}"
    );
    // ... and nothing of it stayed in the publication.
    let filters: i64 = env
        .pg
        .client(&env.db)
        .await
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE rowfilter IS NOT NULL",
            &[],
        )
        .await
        .expect("publication")
        .get(0);
    assert_eq!(filters, 0);
    let out = env.cmd(&["--row-filter", "public.t: nosuch > 1", "init"]);
    let text = stdout_and_err(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("--row-filter public.t: Postgres refused the predicate for public.t")
            && text.contains("column \"nosuch\" does not exist"),
        "{text}"
    );
    let out = env.cmd(&["--row-filter", "public.nosuch: id > 1", "init"]);
    let text = stdout_and_err(&out);
    assert!(
        !out.status.success() && text.contains("--row-filter public.nosuch: no table captured"),
        "{text}"
    );
    // On a key column the filter is accepted; `run` with other filters refuses to start.
    init_with(&env, &["--row-filter", "public.t: id > 10"]);
    let out = env.cmd(&["--row-filter", "public.t: id > 20", "run"]);
    let text = stdout_and_err(&out);
    assert!(
        !out.status.success()
            && text.contains("--row-filter differs from what `init` applied")
            && text.contains("applied: public.t: id > 10; configured: public.t: id > 20"),
        "{text}"
    );
}

/// The rows of `orders` the topic describes: upsert on c/u/r, remove on d.
fn orders_from_topic(records: &[Record]) -> BTreeMap<i64, (String, i64)> {
    let mut rows = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        let e = r.envelope();
        if e.source.table != "orders" {
            continue;
        }
        let row = |m: &Option<Map<String, Value>>| {
            let m = m.as_ref().expect("image");
            (
                m.get("id").and_then(Value::as_i64).expect("id"),
                m.get("region")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                m.get("qty").and_then(Value::as_i64).unwrap_or_default(),
            )
        };
        match e.op {
            Op::Create | Op::Update | Op::Read => {
                let (id, region, qty) = row(&e.after);
                rows.insert(id, (region, qty));
            }
            Op::Delete => {
                rows.remove(&row(&e.before).0);
            }
            _ => {}
        }
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_filter_rebuilds_exactly_the_filtered_select() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE orders (id int PRIMARY KEY, region text NOT NULL, qty int);
             ALTER TABLE orders REPLICA IDENTITY FULL;
             CREATE TABLE marker (id int PRIMARY KEY);
             INSERT INTO orders SELECT g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, g FROM generate_series(1, 60) g;",
        )
        .await;
    let filter = ["--row-filter", "public.orders: region = 'eu'"];
    init_with(&env, &filter);
    let mut producer = env.spawn(&filter);
    env.wait_streaming(Duration::from_secs(60)).await;
    let admin = env.pg.client(&env.db).await;
    admin
        .batch_execute(
            "INSERT INTO orders VALUES (100, 'eu', 1), (101, 'us', 1);
             UPDATE orders SET region = 'eu' WHERE id IN (1, 2, 101);   -- moving in
             UPDATE orders SET region = 'us' WHERE id IN (3, 6, 100);   -- moving out
             UPDATE orders SET qty = qty + 1000 WHERE region = 'eu';    -- within
             UPDATE orders SET qty = qty + 5000 WHERE region = 'us';    -- outside
             DELETE FROM orders WHERE id IN (9, 4, 1);                  -- in, out, moved in
             INSERT INTO marker VALUES (1);",
        )
        .await
        .expect("writes");
    let expected: BTreeMap<i64, (String, i64)> = admin
        .query(
            "SELECT id, region, qty::int8 FROM orders WHERE region = 'eu'",
            &[],
        )
        .await
        .expect("select")
        .iter()
        .map(|r| (r.get::<_, i32>(0).into(), (r.get(1), r.get(2))))
        .collect();
    assert!(expected.len() > 15, "{expected:?}");
    let records = env.read_until(Duration::from_secs(90), |r| {
        r.iter().any(|x| {
            contains(&x.value, "\"table\":\"marker\"") && contains(&x.value, "\"op\":\"c\"")
        })
    });
    producer.terminate();
    assert_eq!(orders_from_topic(&records), expected);
    let orders = events(&records, "orders");
    // Nothing of a row outside the filter was ever written.
    for (_, e) in &orders {
        for image in [&e.before, &e.after].into_iter().flatten() {
            let id = image.get("id").and_then(Value::as_i64).unwrap_or_default();
            assert!(
                image.get("region") == Some(&Value::from("eu"))
                    || (e.op == Op::Delete && [3, 6, 100].contains(&id)),
                "{:?} {image:?}",
                e.op
            );
        }
    }
    // PG15: an update moving a row into the filter is an insert, out of it a delete.
    let ops_of = |id: i64| -> Vec<&str> {
        orders
            .iter()
            .filter(|(_, e)| {
                [&e.before, &e.after]
                    .into_iter()
                    .flatten()
                    .any(|m| m.get("id").and_then(Value::as_i64) == Some(id))
            })
            .map(|(_, e)| e.op.code())
            .collect()
    };
    assert_eq!(ops_of(101), ["c", "u"], "moved in: an insert");
    assert_eq!(ops_of(100), ["c", "d"], "moved out: a delete");
    assert_eq!(ops_of(4), Vec::<&str>::new(), "never in the filter");
    assert_eq!(ops_of(3), ["r", "d"], "snapshot row moved out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_tables_outside_tables_never_reaches_the_topic() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE captured (id int PRIMARY KEY, v text);
             CREATE TABLE hidden_payroll (id int PRIMARY KEY, salary_secret int);
             CREATE SCHEMA vault;
             CREATE TABLE vault.keys (id int PRIMARY KEY, k text);
             CREATE PUBLICATION other_pub FOR TABLE hidden_payroll;",
        )
        .await;
    let tables = ["--tables", "public.captured"];
    init_with(&env, &tables);
    let mut producer = env.spawn(&tables);
    env.wait_streaming(Duration::from_secs(60)).await;
    // A schema event carries its query string whole, unless the query held several statements
    // (see the README's "What leaves the database").
    let admin = env.pg.client(&env.db).await;
    for sql in [
        "ALTER TABLE hidden_payroll ADD COLUMN bonus_secret int",
        "INSERT INTO hidden_payroll VALUES (1, 100, 5)",
        "CREATE TABLE hidden_new (id int PRIMARY KEY, token_secret text)",
        "ALTER TABLE vault.keys RENAME COLUMN k TO k_secret",
        "DROP TABLE hidden_new",
        "ALTER TABLE captured ADD COLUMN w int",
        // One query with a captured table's DDL and another's: under the default
        // `--ddl-statement redact` the schema event carries none of the query's text.
        "ALTER TABLE captured ADD COLUMN z int; ALTER TABLE hidden_payroll ADD COLUMN perk_secret int",
        "INSERT INTO captured VALUES (1, 'one', 1)",
    ] {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let records = env.read_until(Duration::from_secs(90), |r| {
        r.iter().any(|x| {
            contains(&x.value, "\"table\":\"captured\"") && contains(&x.value, "\"op\":\"c\"")
        })
    });
    producer.terminate();
    assert!(
        records.iter().any(|r| r.envelope().op == Op::Ddl),
        "the captured table's schema event is there"
    );
    for r in &records {
        for s in ["hidden", "payroll", "vault", "secret"] {
            assert!(
                !contains(&r.value, s) && !contains(&r.key, s),
                "{s:?} leaked: {}",
                String::from_utf8_lossy(&r.value)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_later_with_an_excluded_key_stops_the_producer() {
    let mut env = Env::start().await;
    env.pg
        .exec(&env.db, "CREATE TABLE early (id int PRIMARY KEY, v int);")
        .await;
    let policy = ["--columns-exclude", "public.*.secret_id"];
    init_with(&env, &policy);
    let mut producer = env.spawn(&policy);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE tokens (secret_id text PRIMARY KEY, v int)",
        )
        .await;
    env.pg
        .exec(&env.db, "INSERT INTO tokens VALUES ('TOKEN-RAW-77', 1)")
        .await;
    let code = env.exit_code(&mut producer, Duration::from_secs(60)).await;
    let log = producer.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "--columns-exclude: column \\\"secret_id\\\" of public.tokens is part of its key"
        ) || log.contains(
            "--columns-exclude: column \"secret_id\" of public.tokens is part of its key"
        ),
        "{log}"
    );
    let records = walrelay_tests::topic::read_to_end(
        &env.broker.brokers(),
        &env.topic,
        Duration::from_secs(10),
    );
    assert!(!records.is_empty(), "the snapshot of early is there");
    for r in &records {
        assert!(
            !contains(&r.value, "TOKEN-RAW-77") && !contains(&r.value, "tokens"),
            "{}",
            String::from_utf8_lossy(&r.value)
        );
    }
}

/// Under `--format avro`: the raw bytes of every record (Avro binary writes strings as their
/// UTF-8 bytes) and every schema registered for the topic are searched for the withheld values
/// and column names; the hash of a known value is in the records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_and_schemas_carry_no_excluded_or_raw_masked_value() {
    let registry = walrelay_tests::registry::SchemaRegistry::shared();
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text, ssn text, note text, age int);
             ALTER TABLE users REPLICA IDENTITY FULL;
             CREATE TABLE accounts (acct text PRIMARY KEY, balance int, password_pin text);
             INSERT INTO users VALUES (1, 'ann@example.org', 'pwhash-SNAP-1', 'ssn-111-22-3333', 'note-SECRET-a', 30);
             INSERT INTO accounts VALUES ('ACCT-RAW-0001', 10, 'pin-1');",
        )
        .await;
    env.init();
    let url = registry.url();
    let mut args = POLICY.to_vec();
    args.extend(["--format", "avro", "--schema-registry-url", &url]);
    let mut producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(90)).await;
    let admin = env.pg.client(&env.db).await;
    for sql in [
        "INSERT INTO users VALUES (3, 'bob@example.org', 'pwhash-STREAM-2', 'ssn-444-55-6666', 'note-SECRET-a', 50)",
        "UPDATE users SET email = 'ann@example.org' WHERE id = 3",
        "DELETE FROM users WHERE id = 1",
        "ALTER TABLE users ADD COLUMN password_reset text DEFAULT 'reset-SECRET-default'",
        "INSERT INTO users (id, email, age) VALUES (999, 'bob@example.org', 60)",
    ] {
        admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }
    let bob = pg_hash(&env, "bob@example.org").await;
    let ann = pg_hash(&env, "ann@example.org").await;
    // The last insert's hash (of the email of row 999, also row 3's first) arrives last.
    let records = env.read_until(Duration::from_secs(90), |r| {
        r.iter().filter(|x| contains(&x.value, &bob)).count() >= 3
    });
    producer.terminate();
    assert!(
        records.iter().any(|r| contains(&r.value, &ann)),
        "the snapshot's hash of ann"
    );
    for r in &records {
        for s in SECRETS.iter().chain(
            [
                "ACCT-RAW-0001",
                "password_hash",
                "password_reset",
                "password_pin",
                "ssn",
                SALT,
            ]
            .iter(),
        ) {
            assert!(
                !contains(&r.value, s) && !contains(&r.key, s),
                "record {}:{} carries {s:?}",
                r.partition,
                r.offset
            );
        }
    }
    let subjects: Vec<String> = registry
        .subjects()
        .into_iter()
        .filter(|s| s.starts_with(&env.topic))
        .collect();
    assert!(subjects.len() >= 2, "{subjects:?}");
    for subject in &subjects {
        for v in registry.versions(subject) {
            let (status, body) = registry
                .get(&format!("/subjects/{subject}/versions/{v}"))
                .expect("the registry answers");
            assert_eq!(status, 200, "{body}");
            for s in ["password_hash", "password_reset", "password_pin", "ssn"] {
                assert!(!body.contains(s), "{subject} v{v} names {s}: {body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_later_gets_its_row_filter_from_the_ddl_trigger() {
    let mut env = Env::start().await;
    env.pg
        .exec(&env.db, "CREATE TABLE marker (id int PRIMARY KEY);")
        .await;
    let filter = ["--row-filter", "public.later_*: id > 10"];
    init_with(&env, &filter);
    let mut producer = env.spawn(&filter);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.pg
        .exec(&env.db, "CREATE TABLE later_a (id int PRIMARY KEY, v text)")
        .await;
    env.pg
        .exec(
            &env.db,
            "INSERT INTO later_a VALUES (5, 'below-FILTER'), (15, 'above');
             INSERT INTO marker VALUES (1);",
        )
        .await;
    let rowfilter: Option<String> = env
        .pg
        .client(&env.db)
        .await
        .query_one(
            "SELECT rowfilter FROM pg_publication_tables WHERE pubname = $1 AND tablename = 'later_a'",
            &[&env.slot],
        )
        .await
        .expect("later_a is published")
        .get(0);
    assert_eq!(rowfilter.as_deref(), Some("(id > 10)"));
    let records = env.read_until(Duration::from_secs(90), |r| {
        r.iter().any(|x| {
            contains(&x.value, "\"table\":\"marker\"") && contains(&x.value, "\"op\":\"c\"")
        })
    });
    producer.terminate();
    let later: Vec<_> = events(&records, "later_a")
        .into_iter()
        .filter(|(_, e)| e.op == Op::Create)
        .map(|(_, e)| e.after.and_then(|a| a.get("id").and_then(Value::as_i64)))
        .collect();
    assert_eq!(later, [Some(15)]);
    assert!(!records.iter().any(|r| contains(&r.value, "below-FILTER")));
}
