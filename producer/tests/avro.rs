//! `--format avro` against a real schema registry (Apicurio), decoded by independent clients
//! (Python's confluent-kafka `AvroDeserializer` and fastavro), and `--compat debezium` read by
//! Apache Flink's Debezium formats.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use walrelay_tests::registry::{SchemaRegistry, flink_table, python_decode};

use crate::support::Env;

const COLUMNS: &str = "
    id int PRIMARY KEY,
    i2 int2, i4 int4, i8 int8, num numeric, n102 numeric(10,2), f4 float4, f8 float8, f_nan float8, f_inf float8,
    b bool, t text, vc varchar(20), j json, jb jsonb, by bytea, u uuid,
    d date, tm time, tmz timetz, ts timestamp, tstz timestamptz, iv interval,
    ai int[], at text[], mood mood, nul text, big text";

const VALUES: &str = "
    32767, 2147483647, 9223372036854775807, 12345678901234567890.123456789, 12.5, 1.5, 0.1, 'NaN', '-Infinity',
    true, E'line\\n\"quoted\"', 'varchar', '{\"k\": [1, 2.50]}', '{\"z\": null, \"a\": 1}', '\\xdeadbeef',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '2024-02-29', '13:14:15.5', '13:14:15+02', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02',
    '1 year 2 months 3 days 04:05:06', '{1,NULL,3}', '{\"a,b\",NULL,\"NULL\"}',
    'happy', NULL, repeat('x', 5000)";

/// Each value as Python's decoders give it (tests/services/python/README.md).
fn expected() -> Value {
    json!({
        "i2": 32767, "i4": 2147483647, "i8": 9223372036854775807i64,
        "num": "12345678901234567890.123456789", "n102": "12.50",
        "f4": 1.5, "f8": 0.1, "f_nan": "NaN", "f_inf": "-Infinity",
        "b": true, "t": "line\n\"quoted\"", "vc": "varchar",
        "j": "{\"k\": [1, 2.50]}", "jb": "{\"a\": 1, \"z\": null}", "by": "3q2+7w==",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "d": "2024-02-29", "tm": "13:14:15.500000", "tmz": "13:14:15+02",
        "ts": "2024-01-02T03:04:05.123456+00:00", "tstz": "2024-01-02T01:04:05.000000+00:00",
        "iv": "P1Y2M3DT4H5M6S", "ai": [1, null, 3], "at": ["a,b", null, "NULL"],
        "mood": "happy", "nul": null, "big": "x".repeat(5000)
    })
}

fn avro_args(registry: &SchemaRegistry, routing: &str) -> Vec<String> {
    [
        "--format",
        "avro",
        "--schema-registry-url",
        &registry.url(),
        "--topic-routing",
        routing,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Decoded records of `topics` until `done` holds.
fn decode_until(
    env: &Env,
    registry: &SchemaRegistry,
    topics: &[&str],
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ready = topics.iter().all(|t| {
            walrelay_tests::topic::try_record_count(&env.broker.brokers(), t).is_some_and(|n| n > 0)
        });
        if ready {
            let records = python_decode(&env.broker.brokers(), &registry.url(), topics);
            if done(&records) {
                return records;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the records never arrived\n{}",
            env.all_logs()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn rows<'a>(records: &'a [Value], table: &str, op: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter_map(|r| r.get("value"))
        .filter(|v| {
            v.pointer("/source/table").and_then(Value::as_str) == Some(table)
                && v.get("op").and_then(Value::as_str) == Some(op)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_decodes_with_pythons_avro_deserializer_under_both_routings() {
    let registry = SchemaRegistry::shared();
    for routing in ["single", "per-table"] {
        let mut env = Env::start().await;
        env.pg
            .exec(
                &env.db,
                &format!(
                    "CREATE TYPE mood AS ENUM ('sad', 'happy');
                     CREATE TABLE typed ({COLUMNS});
                     CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
                     INSERT INTO typed VALUES (1, {VALUES});"
                ),
            )
            .await;
        env.init();
        let mut args = avro_args(&registry, routing);
        args.push("--transaction-metadata=true".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut producer = env.spawn(&args);
        env.wait_streaming(Duration::from_secs(90)).await;
        let body = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 700) g)";
        env.pg
            .exec(
                &env.db,
                &format!(
                    "INSERT INTO typed VALUES (2, {VALUES});
                     INSERT INTO docs VALUES (1, 0, {body}); UPDATE docs SET n = 1;
                     DELETE FROM typed WHERE id = 1;"
                ),
            )
            .await;
        let (typed_topic, docs_topic) = match routing {
            "single" => (env.topic.clone(), env.topic.clone()),
            _ => (
                format!("{}.public.typed", env.topic),
                format!("{}.public.docs", env.topic),
            ),
        };
        let mut topics = vec![typed_topic.as_str()];
        if docs_topic != typed_topic {
            topics.push(&docs_topic);
        }
        let records = decode_until(&env, &registry, &topics, |r| {
            !rows(r, "typed", "d").is_empty() && !rows(r, "docs", "u").is_empty()
        });
        let expected = expected();
        let snapshot = rows(&records, "typed", "r");
        let streamed = rows(&records, "typed", "c");
        assert_eq!((snapshot.len(), streamed.len()), (1, 1), "{routing}");
        for (id, v) in [(1, snapshot[0]), (2, streamed[0])] {
            let after = v.get("after").and_then(Value::as_object).expect("after");
            assert_eq!(after.get("id"), Some(&json!(id)));
            for (k, want) in expected.as_object().expect("object") {
                assert_eq!(
                    after.get(k),
                    Some(want),
                    "{routing}: column {k} of row {id}"
                );
            }
            assert_eq!(after.len(), expected.as_object().map_or(0, |o| o.len()) + 1);
            assert_eq!(
                v.pointer("/source/snapshot").and_then(Value::as_str),
                Some(if id == 1 { "true" } else { "false" }),
                "Debezium's string"
            );
        }
        // The key is the Avro Key record; a delete has the old key and no after.
        let delete = rows(&records, "typed", "d")[0];
        assert_eq!(delete.get("after"), Some(&Value::Null));
        assert_eq!(delete.pointer("/before/id"), Some(&json!(1)));
        let keys: Vec<&Value> = records
            .iter()
            .filter(|r| r.pointer("/value/source/table").and_then(Value::as_str) == Some("typed"))
            .filter(|r| {
                matches!(
                    r.pointer("/value/op").and_then(Value::as_str),
                    Some("r" | "c" | "u" | "d")
                )
            })
            .filter_map(|r| r.get("key"))
            .collect();
        assert!(keys.iter().all(|k| k.get("id").is_some()), "{keys:?}");
        // Unchanged TOAST: Debezium's placeholder, and named.
        let update = rows(&records, "docs", "u")[0];
        assert_eq!(
            update.pointer("/after/body").and_then(Value::as_str),
            Some(walrelay_common::event::UNCHANGED_TOAST)
        );
        assert_eq!(update.get("unchanged_toast"), Some(&json!(["body"])));
        // Subjects: topic-record-name with one topic, topic-name per table.
        let subjects = registry.subjects();
        // Avro names: each dotted part starts with a letter or `_`.
        let namespace: Vec<String> = env
            .topic
            .split('.')
            .map(|p| match p.starts_with(|c: char| c.is_ascii_digit()) {
                true => format!("_{p}"),
                false => p.to_string(),
            })
            .collect();
        let want = match routing {
            "single" => format!(
                "{}-{}.public.typed.Envelope",
                env.topic,
                namespace.join(".")
            ),
            _ => format!("{typed_topic}-value"),
        };
        assert!(subjects.contains(&want), "{want} not in {subjects:?}");
        // Transaction metadata: Debezium's BEGIN/END records, in Avro too, and the events'
        // transaction block.
        let txns = python_decode(
            &env.broker.brokers(),
            &registry.url(),
            &[&format!("{}.transactions", env.topic)],
        );
        let statuses: Vec<&str> = txns
            .iter()
            .filter_map(|r| r.pointer("/value/status").and_then(Value::as_str))
            .collect();
        assert!(
            statuses.contains(&"BEGIN") && statuses.contains(&"END"),
            "{statuses:?}"
        );
        assert!(
            streamed[0].pointer("/transaction/total_order").is_some(),
            "{}",
            streamed[0]
        );
        producer.terminate();
    }
}

/// A producer streaming `schema_sql`'s tables in Avro with `routing`.
async fn streaming(
    schema_sql: &str,
    routing: &str,
) -> (
    Env,
    walrelay_tests::process::Proc,
    std::sync::Arc<SchemaRegistry>,
) {
    let registry = SchemaRegistry::shared();
    let mut env = Env::start().await;
    env.pg.exec(&env.db, schema_sql).await;
    env.init();
    let args = avro_args(&registry, routing);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(90)).await;
    (env, producer, registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_change_stops_naming_the_subject_and_the_change() {
    let (env, mut producer, registry) = streaming(
        "CREATE TABLE gauges (id int PRIMARY KEY, reading int4);",
        "per-table",
    )
    .await;
    env.pg
        .exec(&env.db, "INSERT INTO gauges VALUES (1, 5);")
        .await;
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    // int → text: a reader of the new schema cannot read the old records (BACKWARD refuses).
    env.pg
        .exec(
            &env.db,
            "ALTER TABLE gauges ALTER COLUMN reading TYPE text; INSERT INTO gauges VALUES (2, 'high');",
        )
        .await;
    let lsn = env.insert_lsn().await;
    let code = env.exit_code(&mut producer, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "a definite error\n{}", env.all_logs());
    let subject = format!("{}.public.gauges-value", env.topic);
    let log = producer.log();
    assert!(
        log.contains(&subject) && log.contains("incompatible") && log.contains("reading text"),
        "{log}"
    );
    assert!(
        !env.confirmed_past(&lsn).await,
        "nothing confirmed past the change"
    );
    assert_eq!(
        registry.versions(&subject).len(),
        1,
        "the registry kept one version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_avro_cannot_carry_stops_the_producer_naming_table_and_column() {
    let (env, mut producer, _registry) = streaming(
        "CREATE TABLE grid (id int PRIMARY KEY, cells int[]);",
        "single",
    )
    .await;
    env.pg
        .exec(
            &env.db,
            "INSERT INTO grid VALUES (1, '{1,2}'), (2, '{{1,2},{3,4}}');",
        )
        .await;
    let lsn = env.insert_lsn().await;
    let code = env.exit_code(&mut producer, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "a definite error\n{}", env.all_logs());
    let log = producer.log();
    assert!(
        log.contains("public.grid")
            && log.contains("\"cells\"")
            && log.contains("multi-dimensional"),
        "{log}"
    );
    assert!(
        !env.confirmed_past(&lsn).await,
        "nothing confirmed past the event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_under_avro_with_the_registry_frozen_for_thirty_seconds() {
    let registry = SchemaRegistry::shared();
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE items (id int PRIMARY KEY, name text, qty int4);
             INSERT INTO items VALUES (1, 'a', 1);",
        )
        .await;
    env.init();
    let args = avro_args(&registry, "per-table");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut producer = env.spawn(&args);
    env.wait_streaming(Duration::from_secs(90)).await;
    let topic = format!("{}.public.items", env.topic);
    let subject = format!("{topic}-value");
    assert_eq!(registry.versions(&subject).len(), 1);
    // The registry hangs; the next change needs a new schema version.
    registry.freeze();
    env.pg
        .exec(
            &env.db,
            "ALTER TABLE items ADD COLUMN note text; INSERT INTO items VALUES (2, 'b', 2, 'n');",
        )
        .await;
    let lsn = env.insert_lsn().await;
    let frozen = Instant::now();
    while frozen.elapsed() < Duration::from_secs(30) {
        assert!(
            !env.confirmed_past(&lsn).await,
            "confirmed while the registry could not take the new schema"
        );
        assert!(
            producer.try_exit().is_none(),
            "the producer stopped\n{}",
            env.all_logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    registry.thaw();
    env.pg
        .exec(
            &env.db,
            "ALTER TABLE items RENAME COLUMN name TO label; INSERT INTO items VALUES (3, 'c', 3, 'n');
             ALTER TABLE items ALTER COLUMN qty TYPE int8; INSERT INTO items VALUES (4, 'd', 4, 'n');
             ALTER TABLE items DROP COLUMN note; INSERT INTO items VALUES (5, 'e', 5);",
        )
        .await;
    env.wait_confirmed_current(Duration::from_secs(90)).await;
    let records = decode_until(&env, &registry, &[&topic], |r| {
        rows(r, "items", "c").len() == 4
    });
    let after = |id: i64| {
        rows(&records, "items", "c")
            .into_iter()
            .chain(rows(&records, "items", "r"))
            .find(|v| v.pointer("/after/id") == Some(&json!(id)))
            .and_then(|v| v.get("after").cloned())
            .expect("row")
    };
    assert_eq!(after(1), json!({"id": 1, "name": "a", "qty": 1}));
    assert_eq!(
        after(2),
        json!({"id": 2, "name": "b", "qty": 2, "note": "n"})
    );
    assert_eq!(
        after(3),
        json!({"id": 3, "label": "c", "qty": 3, "note": "n"})
    );
    assert_eq!(
        after(4),
        json!({"id": 4, "label": "d", "qty": 4, "note": "n"})
    );
    assert_eq!(after(5), json!({"id": 5, "label": "e", "qty": 5}));
    // A new version for each shape: add, rename, retype, drop.
    assert!(
        registry.versions(&subject).len() >= 5,
        "{:?}",
        registry.versions(&subject)
    );
    let ddl = records
        .iter()
        .filter(|r| r.pointer("/value/op").and_then(Value::as_str) == Some("ddl"))
        .count();
    assert!(ddl >= 4, "schema events decode too ({ddl})");
    producer.terminate();
}

/// Concurrent inserts, updates and deletes on `items` while the producer streams.
async fn churn(env: &Env) {
    let c = env.pg.client(&env.db).await;
    for round in 0..40 {
        let id = 100 + round;
        c.batch_execute(&format!(
            "BEGIN;
             INSERT INTO items VALUES ({id}, 'n{id}', {id}.25);
             UPDATE items SET price = price + 1, name = name || '!' WHERE id = {};
             DELETE FROM items WHERE id = {};
             COMMIT;",
            id - 5,
            id - 20,
        ))
        .await
        .expect("churn");
    }
}

async fn postgres_items(env: &Env) -> Vec<Value> {
    env.pg
        .client(&env.db)
        .await
        .query("SELECT id::int8, name, price::text FROM items ORDER BY id", &[])
        .await
        .expect("items")
        .iter()
        .map(|r| {
            json!({"id": r.get::<_, i64>(0), "name": r.get::<_, Option<String>>(1), "price": r.get::<_, Option<String>>(2)})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flink_reads_compat_debezium_topics_as_changelog_tables_in_json_and_avro() {
    let registry = SchemaRegistry::shared();
    for format in ["json", "avro"] {
        let mut env = Env::start().await;
        env.pg
            .exec(
                &env.db,
                "CREATE TABLE items (id int8 PRIMARY KEY, name text, price numeric(10,2));
                 ALTER TABLE items REPLICA IDENTITY FULL;
                 INSERT INTO items SELECT g, 'i' || g, g * 1.5 FROM generate_series(1, 50) g;",
            )
            .await;
        env.init();
        let mut args = vec![
            "--compat".to_string(),
            "debezium".into(),
            "--topic-routing".into(),
            "per-table".into(),
            "--partition-key".into(),
            "primary-key".into(),
        ];
        if format == "avro" {
            args.extend([
                "--format".into(),
                "avro".into(),
                "--schema-registry-url".into(),
                registry.url(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut producer = env.spawn(&args);
        env.wait_streaming(Duration::from_secs(90)).await;
        churn(&env).await;
        // A schema change goes to <topic>.schema-changes, not into the table's topic.
        env.pg
            .exec(&env.db, "ALTER TABLE items ADD COLUMN extra text; UPDATE items SET extra = 'x' WHERE id = 30;")
            .await;
        env.wait_confirmed_current(Duration::from_secs(90)).await;
        let topic = format!("{}.public.items", env.topic);
        let (fmt, reg) = match format {
            "json" => ("debezium-json", None),
            _ => ("debezium-avro-confluent", Some(registry.url())),
        };
        let table = flink_table(
            &env.broker.brokers(),
            &topic,
            fmt,
            reg.as_deref(),
            "id BIGINT, name STRING, price DECIMAL(10,2)",
            "id",
            &[],
        )
        .unwrap_or_else(|e| panic!("{format}: {e}\n{}", env.all_logs()));
        let want = postgres_items(&env).await;
        assert_eq!(table.len(), want.len(), "{format}");
        assert_eq!(table, want, "{format}: Flink's table equals Postgres'");
        let schema_changes = walrelay_tests::topic::try_record_count(
            &env.broker.brokers(),
            &format!("{}.schema-changes", env.topic),
        );
        assert!(schema_changes.is_some_and(|n| n >= 1), "{schema_changes:?}");
        producer.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_of_one_schema_all_succeed() {
    use walrelay_common::registry::{Registry, RegistryAuth, RegistryOptions};
    let registry = SchemaRegistry::shared();
    let subject = walrelay_tests::unique("race");
    let schema = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"}]}"#;
    // Each its own client, as separate producers or snapshot workers with cold caches.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = Registry::new(&RegistryOptions {
                url: registry.url(),
                auth: RegistryAuth::None,
                ca_file: None,
                timeout: Duration::from_secs(10),
            })
            .expect("client");
            let subject = subject.clone();
            tokio::spawn(async move {
                let mut last = None;
                // A 5xx (Apicurio's storage lock timeouts under a race) is retried, as the
                // emitter does.
                for _ in 0..20 {
                    match client.register(&subject, schema).await {
                        Ok(id) => return Ok(id),
                        Err(e) if e.is_transient() => {
                            last = Some(e);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(last.expect("an error"))
            })
        })
        .collect();
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let id = t.await.expect("task").unwrap_or_else(|e| panic!("{e}"));
        ids.insert(id);
    }
    // Apicurio may keep a racing registration as a second version with its own id: every id
    // given out names the same schema, which is what a reader needs.
    for id in &ids {
        let (status, body) = registry
            .get(&format!("/schemas/ids/{id}"))
            .expect("the registry answers");
        assert_eq!(status, 200, "{body}");
        let got: Value = serde_json::from_str(&body).expect("json");
        let text = got["schema"].as_str().expect("schema text");
        assert_eq!(
            serde_json::from_str::<Value>(text).expect("schema json"),
            serde_json::from_str::<Value>(schema).expect("schema json"),
            "id {id}"
        );
    }
}
