//! Every value type the producer maps reaches the real OpenSearch index: no row is refused by a
//! mapping (NaN and ±Infinity floats and numerics, 1000-digit numerics, infinite dates and
//! timestamps, arrays with nulls, json, bytea, times), each document's `_source` is the
//! event's row image, and each row is found by a search.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Stack;

const TYPED: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE TABLE typed (
        id int PRIMARY KEY,
        i2 int2, i8 int8, num numeric, num_wide numeric, f4 float4, f8 float8,
        b bool, t text, ch char(3), j json, jb jsonb, by bytea, u uuid,
        d date, tm time, tmz timetz, ts timestamp, tstz timestamptz, iv interval,
        ai int[], af float8[], at text[], a2 int[][], mood mood, ip inet);";

/// Row `id`: ordinary values when `extreme` is false, else the values a search field type
/// cannot hold.
fn insert(id: i32, extreme: bool) -> String {
    if extreme {
        format!(
            "INSERT INTO typed VALUES ({id}, -32768, -9223372036854775808, 'NaN',
             ('9' || repeat('0', 999))::numeric, 'Infinity', '-Infinity', false, 'extreme {id}',
             NULL, 'null', '[]', '\\x', '00000000-0000-0000-0000-000000000000',
             'infinity', '24:00:00', '00:00:00-12', '-infinity', 'infinity', '-178000000 years',
             '{{NULL}}', '{{1.5,NaN,NULL,-Infinity}}', '{{}}', '{{{{1,NULL}},{{NULL,4}}}}', 'sad', '::1')"
        )
    } else {
        format!(
            "INSERT INTO typed VALUES ({id}, 32767, 9223372036854775807,
             12345678901234567890.123456789, 0.5, 1.5, 0.1, true, E'line\\n\"quoted\" {id}',
             'ab', '{{\"k\": [1, 2.50]}}', '{{\"z\": null, \"a\": 1}}', '\\xdeadbeef',
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '13:14:15.5', '13:14:15+02',
             '2024-01-02 03:04:05.123456', '2024-01-02 03:04:05+02',
             '1 year 2 months 3 days 04:05:06', '{{1,NULL,3}}', '{{0.25,NULL}}',
             '{{\"a,b\",NULL,\"NULL\"}}', '{{{{1,2}},{{3,4}}}}', 'happy', '10.0.0.1/32')"
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_type_reaches_the_index_and_is_found() {
    // Rows 1 and 2 are taken by the snapshot, 3 and 4 are streamed.
    let schema = format!("{TYPED} {}; {};", insert(1, false), insert(2, true));
    let mut s = Stack::start(&schema).await;
    let mut indexer = s.indexer();
    s.exec(&format!("{}; {};", insert(3, false), insert(4, true)))
        .await;

    let deadline = Instant::now() + Duration::from_secs(90);
    let docs = loop {
        let docs = s.search.documents("public.typed").await;
        if docs.len() == 4 {
            break docs;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 4 rows indexed: {:?}\n{}",
            docs.len(),
            docs.keys().collect::<Vec<_>>(),
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // Each document's source is the event's row image (plus walrelay's version field).
    let records = walrelay_tests::topic::read_until(
        &s.broker.brokers(),
        &s.topic,
        Duration::from_secs(60),
        |r| {
            r.iter()
                .filter(|x| x.envelope().source.table == "typed" && x.envelope().after.is_some())
                .count()
                >= 4
        },
    );
    let images: BTreeMap<String, Value> = records
        .iter()
        .map(|r| r.envelope())
        .filter(|e| e.source.table == "typed")
        .filter_map(|e| {
            let after = e.after?;
            let id = after.get("id")?.to_string();
            Some((id, Value::Object(after.into_iter().collect())))
        })
        .collect();
    for (id, doc) in &docs {
        let mut doc = doc.clone();
        if let Some(o) = doc.as_object_mut() {
            assert!(o.remove("walrelay_version").is_some(), "versioned: {id}");
            assert!(o.remove("walrelay_seq").is_some(), "sequenced: {id}");
            assert!(
                o.remove("walrelay_partition").is_some(),
                "its partition recorded: {id}"
            );
        }
        assert_eq!(
            Some(&doc),
            images.get(id),
            "document {id} is the event's row image"
        );
    }
    assert_eq!(docs["2"]["num"], "NaN");
    assert_eq!(
        docs["2"]["num_wide"].as_str().map(str::len),
        Some(1000),
        "a 1000-digit numeric kept exactly"
    );
    assert_eq!(docs["4"]["f4"], "Infinity");
    assert_eq!(docs["3"]["num"], "12345678901234567890.123456789");

    // Every row is found: by its key, by text, and ordinary values by their typed fields.
    for id in 1..=4 {
        let hits = s
            .search
            .indexes()
            .search("public.typed", &format!("id:{id}"))
            .await;
        assert_eq!(hits.len(), 1, "row {id} found by id");
    }
    let quoted = s.search.indexes().search("public.typed", "t:quoted").await;
    assert_eq!(quoted.len(), 2, "text search: {quoted:?}");
    let ranged = s
        .search
        .indexes()
        .search(
            "public.typed",
            "num:[1e19 TO 2e19] AND d:[2024-01-01 TO 2024-12-31]",
        )
        .await;
    assert_eq!(ranged.len(), 2, "numeric and date range search: {ranged:?}");
    let extreme = s.search.indexes().search("public.typed", "t:extreme").await;
    assert_eq!(extreme.len(), 2, "rows with unindexable values are found");

    // Nothing was dead-lettered.
    let dlq = format!("{}.dlq", s.topic);
    let letters = walrelay_tests::topic::try_read_until(
        &s.broker.brokers(),
        &dlq,
        Duration::from_secs(2),
        |r| !r.is_empty(),
    )
    .unwrap_or_else(|r| r);
    assert!(
        letters.is_empty(),
        "dead letters: {:?}",
        letters
            .iter()
            .map(|l| String::from_utf8_lossy(&l.value)
                .chars()
                .take(200)
                .collect::<String>())
            .collect::<Vec<_>>()
    );
    assert!(
        indexer.try_exit().is_none(),
        "the indexer keeps running\n{}",
        s.all_logs()
    );
    assert_eq!(indexer.terminate(), Some(0), "{}", s.all_logs());
}
