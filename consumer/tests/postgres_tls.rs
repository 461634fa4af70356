//! The notifier's subscriptions store over verified TLS: a Postgres that accepts only
//! `hostssl`, `sslmode=verify-full` with the test's CA.

use std::time::{Duration, Instant};

use walrelay_tests::certs::TestCa;
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::Proc;

use crate::consumer_bin;

const TOKEN: &str = "tls-store-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_keeps_subscriptions_over_verified_tls() {
    let ca = TestCa::new("store CA");
    let server = ca.server("pg", &["localhost"]);
    let pg = PgCluster::start_tls(
        &server,
        &ca,
        "hostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust",
        &[],
    );
    let db = pg.create_database("store").await;
    let url = format!(
        "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca.cert_path().display()
    );
    let api_port = walrelay_tests::free_port();
    let logs = tempfile::tempdir().expect("logs");
    let args: Vec<String> = [
        "--kafka-brokers",
        &KafkaCluster::shared().brokers(),
        "--topic",
        &walrelay_tests::unique("store").replace('_', "."),
        "--postgres-url",
        &url,
        "--api-addr",
        &format!("127.0.0.1:{api_port}"),
        "--api-token",
        TOKEN,
        "notify",
    ]
    .map(String::from)
    .to_vec();
    let mut notify = Proc::spawn(&consumer_bin(), &args, &[], &logs.path().join("notify.log"));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let r = http
            .post(format!("http://127.0.0.1:{api_port}/v1/subscriptions"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"url": "https://hooks.example.com/walrelay"}))
            .send()
            .await;
        if let Ok(r) = r {
            break r.status().as_u16();
        }
        assert!(Instant::now() < deadline, "no API\n{}", notify.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 201, "{}", notify.log());
    // The row is in the database, written over the TLS session.
    let stored: i64 = pg
        .client(&db)
        .await
        .query_one("SELECT count(*) FROM walrelay.subscriptions", &[])
        .await
        .expect("subscriptions")
        .get(0);
    assert_eq!(stored, 1);
    assert_eq!(notify.terminate(), Some(0), "{}", notify.log());
}
