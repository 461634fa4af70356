//! The broker stopped for 30 s and started again: nothing is lost, readiness says so meanwhile.

use std::collections::BTreeSet;
use std::time::Duration;

use walrelay_tests::kafka::KafkaCluster;

use crate::support::Env;

async fn get(url: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_thirty_seconds_loses_nothing() {
    // A broker of its own: this test stops it.
    let mut env = Env::start_on(&[], std::sync::Arc::new(KafkaCluster::start(1))).await;
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, amount int NOT NULL);",
        )
        .await;
    env.init();
    let metrics = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let mut producer = env.spawn(&["--metrics-addr", &metrics, "--max-buffer-bytes", "2MiB"]);
    let readyz = format!("http://{metrics}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if get(&readyz).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "producer never ready\n{}", env.all_logs());
    let url = env.url();
    let writer = tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(40) {
            c.batch_execute("INSERT INTO ledger (amount) SELECT g FROM generate_series(1, 20) g")
                .await
                .expect("insert");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.broker.stop();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (code, body) = get(&readyz).await;
    assert_eq!(code, 503, "not ready while Kafka is away: {body}");
    assert!(body.contains("kafka"), "{body}");
    assert!(
        producer.try_exit().is_none(),
        "the producer keeps running\n{}",
        env.all_logs()
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    env.broker.restart();
    writer.await.expect("writer");
    let c = env.pg.client(&env.db).await;
    let ids: BTreeSet<i64> = c
        .query("SELECT id FROM ledger", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    env.read_until(Duration::from_secs(120), |r| {
        let seen: BTreeSet<i64> = r
            .iter()
            .filter_map(|x| {
                x.envelope()
                    .after
                    .and_then(|a| a.get("id").and_then(|v| v.as_i64()))
            })
            .collect();
        seen.is_superset(&ids)
    });
    let mut ok = false;
    for _ in 0..50 {
        if get(&readyz).await.0 == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "ready again after the broker returned");
    assert_eq!(producer.terminate(), Some(0), "{}", env.all_logs());
}
