//! The dashboards and alert rules in deploy/ use only metrics the binaries expose: the
//! producer, an indexer and a notifier run against a real stack, their `/metrics` are scraped,
//! and every `walrelay_*` name in deploy/grafana and deploy/prometheus must be among them.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use walrelay_tests::process::Proc;

use crate::notify::notify_args;
use crate::{Stack, consumer_bin};

/// `walrelay_*` names in a text (PromQL in JSON or YAML).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("walrelay_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

fn files(dir: &Path, ext: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(files(&p, ext));
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
    out
}

async fn scrape(port: u16, logs: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            && let Ok(t) = r.text().await
        {
            return t;
        }
        assert!(Instant::now() < deadline, "no /metrics on {port}\n{logs}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Metric names in an exposition, histogram series folded into their family.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(|n| {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n);
            [n.to_string(), base.to_string()]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alert_rules_use_only_exposed_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut wanted = BTreeSet::new();
    let mut sources = Vec::new();
    for p in files(&root.join("deploy/grafana/dashboards"), "json")
        .into_iter()
        .chain(files(&root.join("deploy/prometheus"), "yml"))
    {
        let text = std::fs::read_to_string(&p).expect("read");
        let found = names_in(&text);
        sources.push((p.display().to_string(), found.len()));
        wanted.extend(found);
    }
    assert!(
        wanted.len() > 25,
        "dashboards and rules name metrics: {sources:?}"
    );

    let mut s = Stack::start(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;",
    )
    .await;
    let index_metrics = walrelay_tests::free_port();
    let log = s.log_path("index");
    let mut indexer = Proc::spawn(
        &consumer_bin(),
        &s.consumer_args(
            "index",
            &["--metrics-addr", &format!("127.0.0.1:{index_metrics}")],
        ),
        &[],
        &log,
    );
    let notify_metrics = walrelay_tests::free_port();
    let mut args = notify_args(&s, walrelay_tests::free_port(), "notify");
    args.pop();
    // Its own group: the indexer's group would share the partitions with it.
    if let Some(i) = args.iter().position(|a| a == "--group") {
        args[i + 1] = walrelay_tests::unique("notifier");
    }
    args.extend([
        "--metrics-addr".to_string(),
        format!("127.0.0.1:{notify_metrics}"),
        "notify".to_string(),
    ]);
    let log = s.log_path("notify");
    let mut notifier = Proc::spawn(&consumer_bin(), &args, &[], &log);
    // The Postgres target, into a cluster of its own, in a group of its own.
    let target = walrelay_tests::postgres::PgCluster::start();
    let target_db = target.create_database("tgt").await;
    let replicate_metrics = walrelay_tests::free_port();
    let mut args: Vec<String> = [
        "replicate",
        "--kafka-brokers",
        &s.broker.brokers(),
        "--topic",
        &s.topic,
        "--group",
        &walrelay_tests::unique("replicator"),
        "--target-url",
        &target.url(&target_db),
        "--initial",
        "--metrics-addr",
        &format!("127.0.0.1:{replicate_metrics}"),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(s.broker.property_args());
    let log = s.log_path("replicate");
    let mut replicator = Proc::spawn(&consumer_bin(), &args, &[], &log);
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    s.exec("UPDATE items SET v = 'w' WHERE id < 10; DELETE FROM items WHERE id = 50")
        .await;
    s.wait_equal("items", "public.items", Duration::from_secs(60))
        .await;
    // librdkafka statistics (partition lag) arrive every 5 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut have = BTreeSet::new();
    for port in [
        s.producer_metrics,
        index_metrics,
        notify_metrics,
        replicate_metrics,
    ] {
        have.extend(exposed(&scrape(port, &s.all_logs()).await));
    }
    let missing: Vec<&String> = wanted.iter().filter(|n| !have.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "used in deploy/ but not exposed: {missing:?}\nexposed: {have:?}"
    );
    indexer.kill9();
    notifier.kill9();
    replicator.kill9();
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = names_in(
        r#"{"expr": "sum(rate(walrelay_producer_events_total[1m])) / walrelay_x_bucket", "y": "notwalrelay_z"}"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["walrelay_producer_events_total", "walrelay_x_bucket"]
    );
}
