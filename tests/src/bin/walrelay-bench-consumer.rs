//! The consumer's benchmark harness: prints figures, asserts nothing.
//!
//! Against the in-process librdkafka mock cluster (hosted by `walrelay-mock-broker`) and the
//! search stand-in in discard mode (it parses every bulk request and answers at once, so the
//! figures are the consumer's own cost):
//!
//! 1. fill: N synthetic envelopes (six columns, about 500 bytes) into a 16-partition topic (the
//!    mock keeps 100k messages per partition; the harness refuses more than it can hold);
//! 2. index: `walrelay-consumer index` from offset zero until its group committed every event:
//!    events/s (target ≥ 100k);
//! 3. reindex: `walrelay-consumer reindex` over the same N events, wall time to its exit
//!    (target ≤ 20 s for 1M).
//!
//! Usage: `scripts/bench-consumer.sh [--events N]`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use walrelay_tests::broker::MockBroker;
use walrelay_tests::process::{Proc, cpu_seconds_of};
use walrelay_tests::search::{Faults, SearchStandIn};

const TOPIC: &str = "walrelay.benchc";
/// The mock cluster keeps only the last 100k messages of a partition; 16 partitions hold 1M.
const PARTITIONS: i32 = 16;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    walrelay_tests::sibling_bin(name).map_err(anyhow::Error::msg)
}

fn envelope(i: u64) -> String {
    let lsn = 100_000_000 + i * 120;
    format!(
        concat!(
            r#"{{"op":"{op}","before":null,"after":{{"id":{id},"email":"user{id}@example.com","#,
            r#""name":"Customer number {id}","balance":{bal}.25,"tags":["a","b{t}"],"active":true}},"#,
            r#""source":{{"version":"0.1.0","connector":"walrelay","db":"bench","schema":"public","#,
            r#""table":"customers","lsn":{lsn},"commit_lsn":{lsn},"txid":{tx},"ts_ms":1700000000000,"#,
            r#""snapshot":false,"seq":1}},"ts_ms":1700000000000,"key":["id"],"#,
            r#""types":{{"id":"integer","email":"text","name":"text","balance":"numeric","tags":"text[]","active":"boolean"}}}}"#
        ),
        op = if i.is_multiple_of(10) { "u" } else { "c" },
        id = i % 500_000,
        bal = i % 10_000,
        t = i % 7,
        lsn = lsn,
        tx = 1000 + i,
    )
}

fn fill(brokers: &str, events: u64) -> anyhow::Result<u64> {
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    let mut bytes = 0u64;
    for i in 0..events {
        let value = envelope(i);
        bytes += value.len() as u64;
        let key = format!("{{\"id\":{}}}", i % 500_000);
        loop {
            match producer.send(
                BaseRecord::<String, String>::to(TOPIC)
                    .key(&key)
                    .payload(&value),
            ) {
                Ok(()) => break,
                Err((_, _)) => producer.poll(Duration::from_millis(10)),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(bytes)
}

/// Sum of committed offsets of `group` over the topic's partitions.
fn committed(brokers: &str, group: &str) -> anyhow::Result<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(TOPIC, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum())
}

fn common_args(brokers: &str, search: &str, group: &str) -> Vec<String> {
    [
        "--kafka-brokers",
        brokers,
        "--topic",
        TOPIC,
        "--group",
        group,
        "--search-url",
        search,
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut events: u64 = 1_000_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => events = v.parse()?,
            _ => bail!("unknown option {flag}"),
        }
    }
    if events > 100_000 * PARTITIONS as u64 {
        bail!(
            "at most {} events: the mock cluster keeps 100k per partition",
            100_000 * PARTITIONS
        );
    }
    let broker = MockBroker::start(
        &sibling("walrelay-mock-broker")?,
        &[&format!("{TOPIC}:{PARTITIONS}"), &format!("{TOPIC}.dlq:1")],
    );
    let search = SearchStandIn::start().await;
    search.set_faults(Faults {
        discard: true,
        ..Faults::default()
    });
    let consumer = sibling("walrelay-consumer")?;
    let logs = tempfile::tempdir()?;
    let brokers = broker.brokers().to_string();
    println!(
        "walrelay consumer benchmark: {events} events, {PARTITIONS} partitions, mock cluster, stand-in in discard mode"
    );

    let t = Instant::now();
    let b = brokers.clone();
    let bytes = tokio::task::spawn_blocking(move || fill(&b, events)).await??;
    println!(
        "fill: {events} events ({:.0} bytes each) in {:.1} s",
        bytes as f64 / events as f64,
        t.elapsed().as_secs_f64()
    );

    // Index.
    let group = "bench-indexer";
    let harness_cpu_before = cpu_seconds_of(std::process::id()).unwrap_or(0.0);
    let t = Instant::now();
    let mut p = Proc::spawn(
        &consumer,
        &[
            common_args(&brokers, &search.url(), group),
            vec!["index".into()],
        ]
        .concat(),
        &[],
        &logs.path().join("index.log"),
    );
    // The first commit marks the end of start-up (process start, group join, first fetch).
    let mut first: Option<(Instant, i64)> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let b = brokers.clone();
        let done = tokio::task::spawn_blocking(move || committed(&b, group)).await??;
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
        }
        if done >= events as i64 {
            break;
        }
        if let Some(code) = p.try_exit() {
            bail!("the indexer exited ({code:?}):\n{}", p.log());
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the indexer did not finish in 10 minutes ({done} of {events})");
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let steady =
        first.map(|(at, n)| (events as i64 - n) as f64 / at.elapsed().as_secs_f64().max(0.001));
    let rss = p.peak_rss_bytes().unwrap_or(0);
    let consumer_cpu = p.cpu_seconds().unwrap_or(0.0);
    let harness_cpu = cpu_seconds_of(std::process::id()).unwrap_or(0.0) - harness_cpu_before;
    p.terminate();
    if std::env::var_os("WALRELAY_BENCH_SHOW_LOGS").is_some() {
        let log = p.log();
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines {
            eprintln!("{l}");
        }
    }
    let (items, _) = search.bulk_stats();
    if items < events {
        bail!("only {items} of {events} events reached the stand-in");
    }
    println!(
        "index: {events} events in {secs:.2} s = {:.0} events/s (target >= 100000: {}), bulk items {items}, peak RSS {:.1} MiB (includes start-up and group join)",
        events as f64 / secs,
        if events as f64 / secs >= 100_000.0 {
            "met"
        } else {
            "NOT met"
        },
        rss as f64 / (1 << 20) as f64
    );
    if let Some(rate) = steady {
        println!(
            "index steady state (first commit to last): {rate:.0} events/s (target >= 100000: {})",
            if rate >= 100_000.0 { "met" } else { "NOT met" }
        );
    }
    println!(
        "index CPU: consumer {consumer_cpu:.1} s ({:.1} µs/event), harness with the stand-in {harness_cpu:.1} s, {} cores",
        consumer_cpu * 1e6 / events as f64,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Re-index over the same history.
    let t = Instant::now();
    let mut r = Proc::spawn(
        &consumer,
        &[
            common_args(&brokers, &search.url(), group),
            vec!["--grace-period".into(), "0s".into(), "reindex".into()],
        ]
        .concat(),
        &[],
        &logs.path().join("reindex.log"),
    );
    let code = loop {
        if let Some(code) = r.try_exit() {
            break code;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("reindex did not finish in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if code != Some(0) {
        bail!("reindex exited {code:?}:\n{}", r.log());
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "reindex: {events} events, start to exit {secs:.2} s (target <= 20 s for 1M: {})",
        if secs <= 20.0 * events as f64 / 1e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}
