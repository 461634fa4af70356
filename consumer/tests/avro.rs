//! The indexer reads the producer's `--format avro` topic (schemas from a real registry) and
//! keeps the index equal to the table, through TOAST, deletes and schema changes, as with JSON.

use std::time::Duration;

use walrelay_tests::process::Proc;
use walrelay_tests::registry::SchemaRegistry;

use crate::{ITEMS, Stack, consumer_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_avro_topic_is_indexed_like_json_through_schema_changes() {
    let registry = SchemaRegistry::shared();
    let url = registry.url();
    let mut s = Stack::start_with_producer_args(
        ITEMS,
        &["--format", "avro", "--schema-registry-url", &url],
    )
    .await;
    let log = s.log_path("index");
    let mut indexer = Proc::spawn(
        &consumer_bin(),
        &s.consumer_args("index", &["--schema-registry-url", &url]),
        &[],
        &log,
    );
    s.wait_equal("items", "public.items", Duration::from_secs(90))
        .await;
    s.exec("UPDATE items SET big = repeat('0123456789', 20000) WHERE id = 7")
        .await;
    s.exec("UPDATE items SET qty = -7 WHERE id = 7; DELETE FROM items WHERE id > 150;")
        .await;
    // A new schema version mid-stream (a column added, a new Avro schema registered); every
    // row is touched so each document carries the column (renamed columns become aliases in
    // the index, for either format, so the table's and the documents' names would differ).
    s.exec("ALTER TABLE items ADD COLUMN note text; UPDATE items SET note = 'n' || id; INSERT INTO items (id, name, qty, note) VALUES (500, 'new', 1, 'x');")
        .await;
    s.wait_equal("items", "public.items", Duration::from_secs(90))
        .await;
    // Rename, drop and a compatible retype (int4 -> int8: BACKWARD accepts it; int -> text it
    // refuses, see the producer's tests), each a new registered schema version, followed by
    // the index as with JSON: a renamed column becomes an alias of its old field.
    s.exec("ALTER TABLE items RENAME COLUMN name TO title; UPDATE items SET title = 't' || id WHERE id <= 10;")
        .await;
    s.exec("ALTER TABLE items DROP COLUMN note; INSERT INTO items (id, title, qty) VALUES (600, 'x', 1);")
        .await;
    s.exec("ALTER TABLE items ALTER COLUMN qty TYPE int8; UPDATE items SET qty = 5000000000 WHERE id = 2;")
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let docs = s.docs("public.items").await;
        let done = docs.contains_key("600")
            && docs.get("2").and_then(|d| d.get("qty"))
                == Some(&serde_json::json!(5_000_000_000_i64))
            && docs.get("3").and_then(|d| d.get("name")) == Some(&serde_json::json!("t3"));
        if done {
            assert!(
                docs["600"].get("note").is_none(),
                "a dropped column is not written"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the index did not follow: {:?}\n{}",
            (docs.get("600"), docs.get("2"), docs.get("3")),
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let props = s.search.properties("public.items").await;
    assert_eq!(
        props["title"],
        serde_json::json!({"type": "alias", "path": "name"}),
        "{props:?}"
    );
    // The records are Avro in the Confluent wire format, not JSON.
    let records =
        walrelay_tests::topic::read_to_end(&s.broker.brokers(), &s.topic, Duration::from_secs(30));
    assert!(!records.is_empty());
    assert!(
        records.iter().all(|r| r.value.first() == Some(&0)),
        "every record starts with the magic byte"
    );
    let logs = s.all_logs();
    assert!(!logs.contains("dead-letter"), "{logs}");
    indexer.terminate();
}
