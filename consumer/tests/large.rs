//! Large rows through the indexer: a value under `--max-event-bytes` is indexed whole; a row
//! whose event was over it is indexed by the rule for replaced values (kept as unchanged TOAST:
//! the document keeps what it held for that column), and the stream goes on.

use std::time::{Duration, Instant};

use crate::Stack;

/// `n` bytes of incompressible text, as SQL.
fn big(bytes: usize) -> String {
    format!(
        "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, {}) g)",
        bytes / 32
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_holds_a_3mb_value_and_keeps_its_rule_for_a_40mb_one() {
    let mut s =
        Stack::start("CREATE TABLE docs (id int PRIMARY KEY, n int NOT NULL, body text);").await;
    let mut indexer = s.indexer();
    s.wait_streaming().await;
    s.exec(&format!(
        "INSERT INTO docs VALUES (1, 0, 'small');
         INSERT INTO docs VALUES (2, 0, {});
         INSERT INTO docs VALUES (3, 0, {});",
        big(3 << 20),
        big(40 << 20)
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(180);
    let docs = loop {
        let docs = s.search.documents("public.docs").await;
        if docs.len() == 3 {
            break docs;
        }
        assert!(
            Instant::now() < deadline,
            "{} documents; logs:\n{}",
            docs.len(),
            s.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rows = s.rows("docs").await;
    assert_eq!(
        docs["2"]["body"].as_str(),
        rows["2"]["body"].as_str(),
        "3 MB: indexed whole"
    );
    assert_eq!(docs["3"]["n"], 0);
    assert!(
        docs["3"].get("body").is_none(),
        "40 MB: replaced in the event, so the document keeps what it held (nothing yet)"
    );
    // The stream goes on past it, and a later value of the column is indexed.
    s.exec("UPDATE docs SET body = 'small now', n = 1 WHERE id = 3")
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let docs = s.search.documents("public.docs").await;
        if docs["3"]["body"] == "small now" {
            assert_eq!(docs["3"]["n"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "{}", s.all_logs());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(indexer.terminate(), Some(0), "{}", s.all_logs());
}
