//! The producer as deploy/ observes it: a real Prometheus runs the repository's scrape config
//! and alert rules (targets rewritten to this test's loopback port, 2 s intervals, the rules'
//! own `for:` durations), every query of the producer dashboard returns series while the
//! producer snapshots and streams, and `WalrelayKafkaUnreachable` goes pending and then fires
//! when the broker is stopped, and not before.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::prometheus::{AlertState, Prometheus, repo_root};

use crate::support::Env;

/// Inserts, updates and deletes a few rows every 100 ms until aborted.
fn workload(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        for i in 0i64.. {
            c.batch_execute(&format!(
                "INSERT INTO ledger (amount) SELECT g FROM generate_series(1, 5) g;
                 UPDATE ledger SET amount = amount + 1 WHERE id = {i} % 200 + 1;
                 DELETE FROM ledger WHERE id = (SELECT min(id) FROM ledger WHERE id > 200);"
            ))
            .await
            .expect("workload");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_panels_have_data_and_kafka_alert_fires_when_the_broker_stops() {
    // A broker of its own: this test stops it.
    let mut env = Env::start_on(&[], Arc::new(KafkaCluster::start(1))).await;
    // Rows before the producer starts: its snapshot fills the snapshot panels.
    env.pg
        .exec(
            &env.db,
            "CREATE TABLE ledger (id bigserial PRIMARY KEY, amount int NOT NULL);
             INSERT INTO ledger (amount) SELECT g FROM generate_series(1, 2000) g;",
        )
        .await;
    env.init();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", walrelay_tests::free_port())
        .parse()
        .expect("metrics address");
    let mut producer = env.spawn(&["--metrics-addr", &metrics.to_string()]);
    let prom = Prometheus::start(&[("producer", metrics)])
        .await
        .expect("start Prometheus");
    env.wait_streaming(Duration::from_secs(60)).await;
    let writer = workload(env.url());
    // A schema change while streaming.
    env.pg
        .exec(&env.db, "ALTER TABLE ledger ADD COLUMN note text;")
        .await;
    prom.wait_up("walrelay-producer", 1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", prom.log_tail(20), env.all_logs()));

    // Every query of the producer dashboard returns series (rates over 1 m and 5 m need a few
    // scrapes; the confirmed-LSN age needs a 15 s subquery step with a change).
    let dashboard = repo_root().join("deploy/grafana/dashboards/producer.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let panels = loop {
        let panels = prom
            .evaluate_dashboard(&dashboard)
            .await
            .expect("evaluate the producer dashboard");
        let empty: Vec<_> = panels
            .iter()
            .filter(|q| q.series == 0 || q.error.is_some())
            .collect();
        if empty.is_empty() {
            break panels;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "producer dashboard queries without data: {empty:#?}\n{}",
            env.all_logs()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert!(panels.len() >= 15, "every panel's query: {panels:#?}");
    let alerts = prom.alerts().await.expect("alerts");
    assert!(
        !alerts.iter().any(|a| a.name == "WalrelayKafkaUnreachable"),
        "Kafka is up: {alerts:?}"
    );

    // The broker goes away: readiness says kafka=0, the alert is pending, then fires after its
    // `for: 1m`.
    let stopped = SystemTime::now();
    env.broker.stop();
    let pending = prom
        .wait_alert(
            "WalrelayKafkaUnreachable",
            AlertState::Pending,
            Duration::from_secs(90),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", env.all_logs()));
    assert_eq!(pending.labels["job"], "walrelay-producer", "{pending:?}");
    assert_eq!(
        pending.labels["instance"],
        metrics.to_string(),
        "{pending:?}"
    );
    assert_eq!(pending.labels["severity"], "critical", "{pending:?}");
    prom.wait_alert(
        "WalrelayKafkaUnreachable",
        AlertState::Firing,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", env.all_logs()));
    assert!(
        producer.try_exit().is_none(),
        "the producer keeps running\n{}",
        env.all_logs()
    );

    // The history agrees: pending from after the stop, firing no sooner than a minute later.
    // (A range query sees a sample at the next step: wait for one past the firing.)
    tokio::time::sleep(prom.interval() * 2).await;
    let history = prom
        .alert_history(stopped - Duration::from_secs(60), SystemTime::now())
        .await
        .expect("alert history");
    let spans: Vec<_> = history
        .iter()
        .filter(|s| s.name == "WalrelayKafkaUnreachable")
        .collect();
    let first = |state| {
        spans
            .iter()
            .find(|s| s.state == state)
            .map(|s| s.from)
            .unwrap_or_else(|| panic!("no {state:?} span: {history:#?}"))
    };
    let (pending_at, firing_at) = (first(AlertState::Pending), first(AlertState::Firing));
    assert!(
        pending_at >= stopped,
        "pending only after the stop: {history:#?}"
    );
    let held = firing_at
        .duration_since(pending_at)
        .unwrap_or_else(|_| panic!("firing before pending: {history:#?}"));
    assert!(
        held >= Duration::from_secs(55),
        "fires after `for: 1m`, not {held:?}: {history:#?}"
    );
    writer.abort();
    producer.kill9();
}
