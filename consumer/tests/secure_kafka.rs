//! Kafka with a SASL_SSL (SCRAM-SHA-512) listener only: the producer, `index`, the dead-letter
//! path, `reindex` and `notify` all work with the documented `--kafka-property` settings; a
//! client without them gets nothing; an unsafe property is refused at start.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use walrelay_tests::certs::TestCa;
use walrelay_tests::kafka::{KafkaCluster, SaslSsl};
use walrelay_tests::opensearch::{Indexes, OpenSearch};
use walrelay_tests::process::Proc;

use crate::{ITEMS, Search, Stack, consumer_bin, producer_bin};

const SCRAM_PASSWORD: &str = "scram-Secret-5b7e";
const TOKEN: &str = "sasl-test-token-0123456789";

/// A receiver on 127.0.0.2 that counts the POSTs it answers 200 to.
async fn counting_receiver() -> (u16, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0")
        .await
        .expect("bind the receiver");
    let port = listener.local_addr().expect("addr").port();
    let c = Arc::clone(&count);
    let app = axum::Router::new().fallback(move || {
        let c = Arc::clone(&c);
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            axum::http::StatusCode::OK
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_works_over_sasl_ssl_with_the_documented_properties() {
    let ca = TestCa::new("kafka test CA");
    let broker = Arc::new(KafkaCluster::start_sasl_ssl(&SaslSsl {
        ca: &ca,
        username: "walrelay",
        password: SCRAM_PASSWORD,
    }));
    let search = Search::Real(Indexes::new(&OpenSearch::shared().url()));
    let mut s = Stack::start_with(ITEMS, search, Arc::clone(&broker)).await;

    // Producer and indexer.
    let mut indexer = s.indexer();
    s.wait_equal("items", "public.items", Duration::from_secs(90))
        .await;

    // The dead-letter producer: a record that is no envelope, written over SASL_SSL.
    let junk: FutureProducer = broker.client_config().create().expect("producer");
    junk.send(
        FutureRecord::to(&s.topic)
            .key("junk")
            .payload("{not json")
            .partition(0),
        Duration::from_secs(10),
    )
    .await
    .expect("produce junk over SASL_SSL");
    let dlq = format!("{}.dlq", s.topic);
    let reader: BaseConsumer = broker
        .client_config()
        .set("group.id", walrelay_tests::unique("dlq"))
        .create()
        .expect("consumer");
    let mut from_start = rdkafka::TopicPartitionList::new();
    from_start
        .add_partition_offset(&dlq, 0, rdkafka::Offset::Beginning)
        .expect("partition");
    reader.assign(&from_start).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut letter = None;
    while letter.is_none() && Instant::now() < deadline {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(500)) {
            let reason = m.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == "walrelay.dlq.reason")
                    .and_then(|x| x.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            });
            letter = Some((m.payload().unwrap_or_default().to_vec(), reason));
        }
    }
    let (payload, reason) = letter.unwrap_or_else(|| panic!("no dead letter\n{}", s.all_logs()));
    assert_eq!(payload, b"{not json");
    assert_eq!(reason.as_deref(), Some("decode"));

    // reindex: a fresh group from offset zero, then the alias swap.
    s.exec("UPDATE items SET name = 'over sasl' WHERE id <= 3")
        .await;
    s.run_reindex().await;
    assert_eq!(
        s.search.alias_targets("public.items").await,
        vec!["public.items-v2"]
    );
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;

    // notify: a subscription's receiver gets the next change.
    let (port, delivered) = counting_receiver().await;
    let api_port = walrelay_tests::free_port();
    let mut args: Vec<String> = [
        "--kafka-brokers",
        &broker.brokers(),
        "--topic",
        &s.topic,
        "--group",
        &walrelay_tests::unique("notify"),
        "--postgres-url",
        &s.pg.url(&s.db),
        "--api-addr",
        &format!("127.0.0.1:{api_port}"),
        "--api-token",
        TOKEN,
        "--allow-targets",
        "127.0.0.2/32",
    ]
    .map(String::from)
    .to_vec();
    for p in broker.client_properties() {
        args.push("--kafka-property".into());
        args.push(p);
    }
    args.push("notify".into());
    let log = s.log_path("notify");
    let mut notify = Proc::spawn(&consumer_bin(), &args, &[], &log);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = http
            .post(format!("http://127.0.0.1:{api_port}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .json(
                &serde_json::json!({"url": format!("http://127.0.0.2:{port}/hook"),
                                      "table": "items", "ops": ["u"]}),
            )
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        if created == Some(201) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the notifier's API never answered: {created:?}\n{}",
            notify.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = delivered.load(Ordering::SeqCst);
    s.exec("UPDATE items SET qty = qty + 1 WHERE id = 10").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while delivered.load(Ordering::SeqCst) <= before {
        assert!(
            Instant::now() < deadline,
            "no webhook delivered over SASL_SSL\n{}",
            notify.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A client without the properties gets no metadata from the SASL_SSL listener.
    let plain: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.brokers())
        .set("log_level", "0")
        .create()
        .expect("plain client");
    assert!(
        plain
            .fetch_metadata(Some(&s.topic), Duration::from_secs(3))
            .is_err(),
        "a plaintext client must not get through"
    );

    // An unsafe property is refused before anything starts.
    let out = std::process::Command::new(producer_bin())
        .args(s.producer_args(&["--kafka-property", "acks=1", "run"]))
        .output()
        .expect("run the producer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("acks=1 is refused"), "{stderr}");
    assert!(
        !stderr.contains(SCRAM_PASSWORD),
        "the SASL password leaked: {stderr}"
    );

    for p in [&mut indexer, &mut notify] {
        assert_eq!(p.terminate(), Some(0), "{}", s.all_logs());
    }
    // No log of any process of the run (producer, indexer, reindex, notifier) carries the SASL
    // password or the API token.
    for entry in std::fs::read_dir(s.logs.path()).expect("logs") {
        let path = entry.expect("log").path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for secret in [SCRAM_PASSWORD, TOKEN] {
            assert!(!text.contains(secret), "{} leaks a secret", path.display());
        }
    }
}
