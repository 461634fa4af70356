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
