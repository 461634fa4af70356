//! Large rows never halt capture: an event up to `--max-event-bytes` is written whole (walrelay
//! sizes the topics it creates), a larger one goes in chunks to `<topic>.oversized` and its row
//! carries a reference, and a topic that existed with a smaller limit is handled the same way.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde_json::Value;
use sha2::{Digest, Sha256};
use walrelay_common::event::{Envelope, Op, UNCHANGED_TOAST};
use walrelay_common::oversized::{Reassembler, Reference};
use walrelay_tests::topic::{self, Record};

use crate::support::Env;

/// `n` bytes of incompressible text (md5 hex digests), as SQL.
fn big(bytes: usize) -> String {
    format!(
        "(SELECT string_agg(md5(g::text || random()::text), '') FROM generate_series(1, {}) g)",
        bytes / 32
    )
}

fn find<'a>(records: &'a [Record], table: &str, id: i64, op: Op) -> Option<&'a Record> {
    records.iter().find(|r| {
        let e = r.envelope();
        e.source.table == table
            && e.op == op
            && e.after
                .as_ref()
                .and_then(|a| a.get("id"))
                .and_then(Value::as_i64)
                == Some(id)
    })
}

/// Every oversized event of the chunk topic, put together, by id.
fn reassemble(env: &Env, chunk_topic: &str) -> HashMap<String, Vec<u8>> {
    let records = topic::read_to_end(&env.broker.brokers(), chunk_topic, Duration::from_secs(60));
    let mut r = Reassembler::new(256 << 20);
    let mut whole = HashMap::new();
    for rec in &records {
        if let Some((id, text)) = r.push(&rec.value).expect("chunks put together") {
            assert_eq!(rec.key, id.as_bytes(), "a chunk is keyed by its event's id");
            whole.insert(id, text);
        }
    }
    whole
}

/// The SHA-256 of `docs.body` of row `id`, as Postgres computes it.
async fn body_sha(env: &Env, id: i64) -> String {
    let c = env.pg.client(&env.db).await;
    c.query_one(
        "SELECT encode(sha256(convert_to(body, 'UTF8')), 'hex') FROM docs WHERE id = $1",
        &[&(id as i32)],
    )
    .await
    .expect("sha")
    .get(0)
}

fn sha_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks that `rec` is a row whose `body` was replaced and that the reference it carries (in
/// the envelope and in the header) leads to the whole event, whose body is Postgres' value.
async fn assert_replaced_and_whole(
    env: &Env,
    rec: &Record,
    whole: &HashMap<String, Vec<u8>>,
    id: i64,
) {
    let e = rec.envelope();
    let after = e.after.as_ref().expect("after");
    assert_eq!(after.get("body"), Some(&Value::from(UNCHANGED_TOAST)));
    assert_eq!(
        after.get("n"),
        Some(&Value::from(0)),
        "the other values stay"
    );
    assert_eq!(e.unchanged_toast, vec!["body".to_string()], "sinks keep it");
    let reference: Reference = e.oversized.clone().expect("a reference");
    assert_eq!(reference.topic, format!("{}.oversized", env.topic));
    assert_eq!(reference.columns, vec!["body".to_string()]);
    assert_eq!(reference.partition, rec.partition);
    let header = rec
        .headers
        .iter()
        .find(|(k, _)| k == walrelay_common::oversized::HEADER)
        .map(|(_, v)| serde_json::from_slice::<Reference>(v).expect("header is a reference"));
    assert_eq!(
        header.as_ref(),
        Some(&reference),
        "the header says the same"
    );
    let text = whole
        .get(&reference.id)
        .expect("the chunks are there, whole");
    assert_eq!(text.len() as u64, reference.bytes);
    let full = Envelope::from_slice(text).expect("the whole event is an envelope");
    assert_eq!(full.op, e.op);
    assert!(full.oversized.is_none() && full.unchanged_toast.is_empty());
    let body = full
        .after
        .as_ref()
        .and_then(|a| a.get("body"))
        .and_then(Value::as_str)
        .expect("the whole body");
    assert!(body.len() > 16 << 20);
    assert_eq!(
        sha_hex(body),
        body_sha(env, id).await,
        "row {id}'s body, exactly"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3mb_and_a_40mb_value_under_the_defaults_never_stop_the_stream() {
    let mut env = Env::start().await;
    env.pg
        .exec(
            &env.db,
            &format!(
                "CREATE TABLE docs (id int PRIMARY KEY, n int NOT NULL, body text);
                 CREATE TABLE other (id int PRIMARY KEY, v text);
                 INSERT INTO docs VALUES (1, 0, {});",
                big(40 << 20)
            ),
        )
        .await;
    env.init();
    let mut producer = env.spawn(&[]);
    env.wait_streaming(Duration::from_secs(120)).await;
    env.pg
        .exec(
            &env.db,
            &format!(
                "INSERT INTO docs VALUES (2, 0, {});
                 INSERT INTO docs VALUES (3, 0, {});
                 INSERT INTO other VALUES (1, 'after the big ones');
                 UPDATE docs SET n = 1 WHERE id = 3;
                 INSERT INTO other VALUES (2, 'still streaming');",
                big(3 << 20),
                big(40 << 20)
            ),
        )
        .await;
    let records = env.read_until(Duration::from_secs(120), |r| {
        find(r, "other", 2, Op::Create).is_some()
    });
    // 3 MB: whole, in the main topic.
    let three = find(&records, "docs", 2, Op::Create)
        .expect("row 2")
        .envelope();
    let body = three
        .after
        .as_ref()
        .and_then(|a| a.get("body"))
        .and_then(Value::as_str)
        .expect("body");
    assert_eq!(sha_hex(body), body_sha(&env, 2).await);
    assert!(three.oversized.is_none());
    // 40 MB, from the snapshot and from the stream: replaced, with a reference to the whole.
    let whole = reassemble(&env, &format!("{}.oversized", env.topic));
    assert_eq!(whole.len(), 2, "two oversized events");
    let snap = find(&records, "docs", 1, Op::Read).expect("snapshot row 1");
    assert_replaced_and_whole(&env, snap, &whole, 1).await;
    let streamed = find(&records, "docs", 3, Op::Create).expect("row 3");
    assert_replaced_and_whole(&env, streamed, &whole, 3).await;
    // The update left the body as it was: unchanged TOAST, a small event.
    let update = find(&records, "docs", 3, Op::Update)
        .expect("update")
        .envelope();
    assert!(update.oversized.is_none());
    assert_eq!(update.unchanged_toast, vec!["body".to_string()]);
    assert!(find(&records, "other", 1, Op::Create).is_some());
    // Nothing after them was held back, and the slot moved past them.
    env.wait_confirmed_current(Duration::from_secs(60)).await;
    assert!(producer.try_exit().is_none(), "{}", env.all_logs());
    producer.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_with_a_smaller_limit_gets_chunks_and_check_names_it() {
    let mut env = Env::start().await;
    // The topic exists already, with Kafka's usual 1 MB limit.
    let admin: AdminClient<DefaultClientContext> =
        env.broker.client_config().create().expect("admin");
    let topic = NewTopic::new(&env.topic, 1, TopicReplication::Fixed(1))
        .set("max.message.bytes", "1048588");
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        r.expect("topic created");
    }
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE docs (id int PRIMARY KEY, n int NOT NULL, body text);",
        )
        .await;
    env.init();
    let check = env.cmd(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        report.contains("max.message.bytes") && report.contains(".oversized"),
        "check names the topic's limit and what happens: {report}"
    );
    let mut producer = env.spawn(&[]);
    env.wait_streaming(Duration::from_secs(60)).await;
    env.pg
        .exec(
            &env.db,
            &format!(
                "INSERT INTO docs VALUES (1, 0, {}); INSERT INTO docs VALUES (2, 0, 'small');",
                big(3 << 20)
            ),
        )
        .await;
    let records = env.read_until(Duration::from_secs(60), |r| {
        find(r, "docs", 2, Op::Create).is_some()
    });
    let rec = find(&records, "docs", 1, Op::Create).expect("row 1");
    let e = rec.envelope();
    let reference = e
        .oversized
        .clone()
        .expect("a reference: the topic takes only 1 MB");
    let whole = reassemble(&env, &reference.topic);
    let full = Envelope::from_slice(&whole[&reference.id]).expect("whole");
    let body = full
        .after
        .as_ref()
        .and_then(|a| a.get("body"))
        .and_then(Value::as_str)
        .expect("body");
    assert_eq!(sha_hex(body), body_sha(&env, 1).await);
    producer.terminate();
}
