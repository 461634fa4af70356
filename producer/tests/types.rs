//! Every value type round-trips, the same through the snapshot and the stream.

use std::time::Duration;

use serde_json::{Value, json};
use walrelay_tests::topic::Record;

use crate::support::Env;

const COLUMNS: &str = "
    id int PRIMARY KEY,
    i2 int2, i4 int4, i8 int8, num numeric, f4 float4, f8 float8, f_nan float8, f_inf float8,
    b bool, t text, vc varchar(20), ch char(3), j json, jb jsonb, by bytea, u uuid,
    d date, tm time, tmz timetz, ts timestamp, tstz timestamptz, iv interval,
    ai int[], at text[], a2 int[][], mood mood, dom posint, ip inet, big text";

const VALUES: &str = "
    32767, 2147483647, 9223372036854775807, 12345678901234567890.123456789, 1.5, 0.1, 'NaN', '-Infinity',
    true, E'line\\n\"quoted\"', 'varchar', 'ab', '{\"k\": [1, 2.50]}', '{\"z\": null, \"a\": 1}', '\\xdeadbeef',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '2024-02-29', '13:14:15.5', '13:14:15+02', '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02',
    '1 year 2 months 3 days 04:05:06', '{1,NULL,3}', '{\"a,b\",NULL,\"NULL\"}', '{{1,2},{3,4}}',
    'happy', 7, '10.0.0.1/32', repeat('x', 5000)";

fn expected() -> Value {
    json!({
        "i2": 32767, "i4": 2147483647, "i8": 9223372036854775807i64,
        "num": "12345678901234567890.123456789", "f4": 1.5, "f8": 0.1, "f_nan": "NaN", "f_inf": "-Infinity",
        "b": true, "t": "line\n\"quoted\"", "vc": "varchar", "ch": "ab ",
        "j": serde_json::from_str::<Value>(r#"{"k": [1, 2.50]}"#).expect("json"), "jb": {"a": 1, "z": null}, "by": "3q2+7w==",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "d": "2024-02-29", "tm": "13:14:15.5", "tmz": "13:14:15+02:00",
        "ts": "2024-01-02T03:04:05.123456", "tstz": "2024-01-02T01:04:05+00:00",
        "iv": "P1Y2M3DT4H5M6S", "ai": [1, null, 3], "at": ["a,b", null, "NULL"], "a2": [[1, 2], [3, 4]],
        "mood": "happy", "dom": 7, "ip": "10.0.0.1", "big": "x".repeat(5000)
    })
}

fn after_of(records: &[Record], id: i64) -> Option<serde_json::Map<String, Value>> {
    records
        .iter()
        .map(Record::envelope)
        .find(|e| {
            e.after
                .as_ref()
                .and_then(|a| a.get("id"))
                .and_then(Value::as_i64)
                == Some(id)
        })
        .and_then(|e| e.after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_type_round_trips_through_snapshot_and_stream() {
    let mut env = Env::start().await;
    env.pg
        .exec(&env.db, &format!(
            "CREATE TYPE mood AS ENUM ('sad', 'happy'); CREATE DOMAIN posint AS int CHECK (VALUE > 0);
             CREATE TABLE typed ({COLUMNS});
             INSERT INTO typed VALUES (1, {VALUES});"))
        .await;
    env.init();
    let mut producer = env.spawn(&[]);
    env.read_until(Duration::from_secs(60), |r| after_of(r, 1).is_some());
    env.pg
        .exec(&env.db, &format!("INSERT INTO typed VALUES (2, {VALUES});"))
        .await;
    let records = env.read_until(Duration::from_secs(60), |r| after_of(r, 2).is_some());
    let expected = expected();
    for id in [1, 2] {
        let mut after = after_of(&records, id).expect("row");
        assert_eq!(after.remove("id"), Some(json!(id)));
        for (k, v) in expected.as_object().expect("object") {
            assert_eq!(
                after.get(k),
                Some(v),
                "column {k} of row {id} (1 = snapshot, 2 = stream)"
            );
        }
        assert_eq!(
            after.len(),
            expected.as_object().map_or(0, |o| o.len()),
            "no extra columns"
        );
    }
    // int8 is written as exact digits, never through a float.
    let raw = records
        .iter()
        .find(|r| r.envelope().op == walrelay_common::event::Op::Read)
        .expect("snapshot row");
    assert!(String::from_utf8_lossy(&raw.value).contains("\"i8\":9223372036854775807"));
    producer.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_is_marked_and_full_identity_fills_it() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
                        CREATE TABLE docs_full (id int PRIMARY KEY, n int, body text);
                        ALTER TABLE docs_full REPLICA IDENTITY FULL;",
        )
        .await;
    env.init();
    let mut producer = env.spawn(&[]);
    env.wait_streaming(Duration::from_secs(60)).await;
    // Incompressible, so it is stored out of line (TOASTed).
    let body = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 700) g)";
    env.pg
        .exec(
            &env.db,
            &format!(
            "INSERT INTO docs VALUES (1, 0, {body}); INSERT INTO docs_full VALUES (1, 0, {body});
             UPDATE docs SET n = 1; UPDATE docs_full SET n = 1; DELETE FROM docs;"),
        )
        .await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        r.iter()
            .any(|x| x.envelope().op == walrelay_common::event::Op::Delete)
    });
    let updates: Vec<_> = records
        .iter()
        .map(Record::envelope)
        .filter(|e| e.op == walrelay_common::event::Op::Update)
        .collect();
    let docs = updates
        .iter()
        .find(|e| e.source.table == "docs")
        .expect("docs update");
    assert_eq!(docs.unchanged_toast, vec!["body".to_string()]);
    assert_eq!(
        docs.after.as_ref().and_then(|a| a.get("body")),
        Some(&json!(walrelay_common::event::UNCHANGED_TOAST)),
        "marked, never null"
    );
    let full = updates
        .iter()
        .find(|e| e.source.table == "docs_full")
        .expect("docs_full update");
    assert!(full.unchanged_toast.is_empty());
    assert_eq!(
        full.after
            .as_ref()
            .and_then(|a| a.get("body"))
            .and_then(Value::as_str)
            .map(str::len),
        Some(700 * 32)
    );
    assert_eq!(
        full.before.as_ref().and_then(|b| b.get("n")),
        Some(&json!(0)),
        "full old row"
    );
    let delete = records
        .iter()
        .map(Record::envelope)
        .find(|e| e.op == walrelay_common::event::Op::Delete)
        .expect("delete");
    assert_eq!(
        delete.before.map(|b| b.into_iter().collect::<Vec<_>>()),
        Some(vec![("id".to_string(), json!(1))]),
        "key only"
    );
    producer.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enum_swapped_and_dropped_while_stopped_still_delivers_every_row() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            "CREATE TYPE mood AS ENUM ('sad', 'happy');
             CREATE TABLE feel (id int PRIMARY KEY, m mood);
             INSERT INTO feel VALUES (1, 'sad');",
        )
        .await;
    env.init();
    let mut producer = env.spawn(&[]);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    assert_eq!(producer.terminate(), Some(0), "{}", env.all_logs());

    // While the producer is stopped: a row under the old type, then the usual enum migration
    // (new type, column converted, old type dropped, new type renamed), then a row under it.
    env.pg
        .exec(
            &env.db,
            "INSERT INTO feel VALUES (2, 'happy');
             CREATE TYPE mood_v2 AS ENUM ('sad', 'happy', 'fine');
             ALTER TABLE feel ALTER COLUMN m TYPE mood_v2 USING m::text::mood_v2;
             DROP TYPE mood;
             ALTER TYPE mood_v2 RENAME TO mood;
             INSERT INTO feel VALUES (3, 'fine');
             UPDATE feel SET m = 'fine' WHERE id = 1;",
        )
        .await;
    let mut producer = env.spawn(&[]);
    let records = env.read_until(Duration::from_secs(60), |r| {
        let rows = walrelay_tests::topic::table_state(r, "public", "feel", "id");
        rows.len() == 3
            && rows
                .values()
                .all(|row| row.get("m") == Some(&json!("fine")) || row.get("id") == Some(&json!(2)))
    });
    let rows = walrelay_tests::topic::table_state(&records, "public", "feel", "id");
    let m = |id: i64| {
        rows.values()
            .find(|r| r.get("id") == Some(&json!(id)))
            .and_then(|r| r.get("m").cloned())
    };
    assert_eq!(m(1), Some(json!("fine")));
    assert_eq!(
        m(2),
        Some(json!("happy")),
        "the row written under the dropped type, as text"
    );
    assert_eq!(m(3), Some(json!("fine")));
    assert!(
        producer.try_exit().is_none(),
        "the producer keeps streaming\n{}",
        env.all_logs()
    );
    assert_eq!(producer.terminate(), Some(0));
    let log = producer.log();
    assert!(
        log.contains("no longer exists in the catalog") && log.contains("column=\"m\""),
        "the column with the vanished type is named:\n{log}"
    );
}
