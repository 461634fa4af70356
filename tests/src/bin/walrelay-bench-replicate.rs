//! The Postgres target's benchmark (`walrelay-consumer replicate`): prints figures, asserts
//! nothing.
//!
//! 1. Real servers: a source and a target Postgres 15 ([`walrelay_tests::postgres`]), a
//!    single-node Apache Kafka, the producer streaming the source (2 partitions,
//!    primary-key keying, as the tests run it).
//! 2. Throughput: `--rows` rows (default 1M) inserted into `items (id bigint PK, t text, n
//!    int, ts timestamptz, j jsonb)` in 1000-row transactions and streamed into the topic
//!    first; then the replicator starts (`--initial`) and the time from its start until the
//!    target's `walrelay.applied` covers every record is measured: rows/s applied, its CPU
//!    seconds and peak RSS, and the target database's CPU seconds over the same time.
//! 3. Latency: with the replicator running, `--rate` rows/s (default 5000) are inserted for
//!    `--seconds` (default 20) in 50-row transactions into `ticks (id bigserial PK, at
//!    timestamptz DEFAULT clock_timestamp())`; the target's copy of the table has an extra
//!    column `applied_at timestamptz DEFAULT clock_timestamp()` (added by the bench once the
//!    replicator created the table), so `applied_at - at` is source insert to target apply,
//!    per row: p50, p99, max.
//!
//! Usage: `scripts/bench-replicate.sh [--rows N] [--rate N] [--seconds N] [-- REPLICATOR
//! OPTIONS...]`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::{Proc, cpu_seconds_of};

struct Opts {
    rows: u64,
    rate: u64,
    seconds: u64,
    /// Passed to the replicator as they are (after `--`).
    extra: Vec<String>,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        rows: 1_000_000,
        rate: 5000,
        seconds: 20,
        extra: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> anyhow::Result<u64> {
            args.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a} takes a number"))
        };
        match a.as_str() {
            "--rows" => o.rows = value()?,
            "--rate" => o.rate = value()?.max(1),
            "--seconds" => o.seconds = value()?.max(1),
            "--" => {
                o.extra = args.by_ref().collect();
                break;
            }
            other => bail!("unknown option {other}; see the file's header"),
        }
    }
    Ok(o)
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU seconds of every process of the cluster (the postmaster's children included).
fn cluster_cpu(pg: &PgCluster) -> f64 {
    let Ok(pid) = std::fs::read_to_string(pg.dir().join("data/postmaster.pid")) else {
        return 0.0;
    };
    let Some(main) = pid
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return 0.0;
    };
    let mut total = cpu_seconds_of(main).unwrap_or(0.0);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                });
            if ppid == Some(main) {
                total += cpu_seconds_of(p).unwrap_or(0.0);
            }
        }
    }
    total
}

async fn applied(target: &tokio_postgres::Client, group: &str) -> i64 {
    target
        .query_one(
            "SELECT coalesce(sum(events_applied), 0)::bigint FROM walrelay.applied WHERE consumer_group = $1",
            &[&group],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

fn records_in(brokers: &str, topic: &str) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut n = 0;
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            n += high - low;
        }
    }
    Ok(n)
}

/// A counter's value from the replicator's /metrics (-1 when it cannot be read).
async fn metric(port: u16, name: &str) -> i64 {
    let Ok(resp) = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map(|c| c.get(format!("http://127.0.0.1:{port}/metrics")))
    else {
        return -1;
    };
    let Ok(text) = async { resp.send().await?.text().await }.await else {
        return -1;
    };
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(-1, |v| v.round() as i64)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let consumer = walrelay_tests::sibling_bin("walrelay-consumer").map_err(anyhow::Error::msg)?;
    let producer = walrelay_tests::sibling_bin("walrelay-producer").map_err(anyhow::Error::msg)?;
    let logs = tempfile::tempdir()?;
    let kafka =
        tokio::task::spawn_blocking(|| walrelay_tests::kafka::KafkaCluster::start(1)).await?;
    let source = PgCluster::start();
    let target = PgCluster::start();
    let sdb = source.create_database("bsrc").await;
    let tdb = target.create_database("btgt").await;
    source
        .exec(
            &sdb,
            "CREATE TABLE items (id bigint PRIMARY KEY, t text, n int, ts timestamptz, j jsonb);
             CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());",
        )
        .await;
    let topic = walrelay_tests::unique("benchr").replace('_', ".");
    let slot = walrelay_tests::unique("slot");
    let mut pargs = kafka.producer_args(&source.url(&sdb), &topic, &slot);
    pargs.extend(["--topic-partitions", "2", "--partition-key", "primary-key"].map(String::from));
    let mut init = pargs.clone();
    init.push("init".into());
    let out = std::process::Command::new(&producer).args(&init).output()?;
    if !out.status.success() {
        bail!("producer init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut run = pargs.clone();
    run.push("run".into());
    let _producer = Proc::spawn(&producer, &run, &[], &logs.path().join("producer.log"));
    // The rows, streamed into the topic before the replicator starts.
    let src = source.client(&sdb).await;
    let filled = Instant::now();
    let batches = o.rows.div_ceil(1000);
    for b in 0..batches {
        let from = b * 1000 + 1;
        let to = ((b + 1) * 1000).min(o.rows);
        src.batch_execute(&format!(
            "INSERT INTO items SELECT g, repeat('x', 40) || g, g % 1000, now(), jsonb_build_object('k', g, 'tags', jsonb_build_array('a', 'b'))
             FROM generate_series({from}, {to}) g"
        ))
        .await?;
    }
    // Wait until the producer wrote them all (records: rows, schema events, markers).
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = -1;
    loop {
        let n = records_in(&kafka.brokers(), &topic).unwrap_or(0);
        if n >= o.rows as i64 && n == last {
            break;
        }
        last = n;
        if Instant::now() > deadline {
            bail!("the producer wrote {n} of {} rows in 10 minutes", o.rows);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let records = last;
    eprintln!(
        "filled: {} rows in the source and {records} records in Kafka in {:.1}s",
        o.rows,
        filled.elapsed().as_secs_f64()
    );
    // Throughput.
    let group = "bench-replicator";
    let metrics_port = walrelay_tests::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut rargs: Vec<String> = [
        "replicate",
        "--metrics-addr",
        &metrics_addr,
        "--kafka-brokers",
        &kafka.brokers(),
        "--topic",
        &topic,
        "--group",
        group,
        "--target-url",
        &target.url(&tdb),
        "--initial",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for p in kafka.client_properties() {
        rargs.push("--kafka-property".into());
        rargs.push(p);
    }
    rargs.extend(o.extra.iter().cloned());
    let tgt = target.client(&tdb).await;
    let target_cpu_before = cluster_cpu(&target);
    let started = Instant::now();
    let mut replicator = Proc::spawn(&consumer, &rargs, &[], &logs.path().join("replicate.log"));
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let n = applied(&tgt, group).await;
        if n > 0 && first.is_none() {
            first = Some((Instant::now(), n));
        }
        if n >= records {
            break;
        }
        if let Some(code) = replicator.try_exit() {
            bail!("the replicator exited ({code:?}):\n{}", replicator.log());
        }
        if Instant::now() > deadline {
            bail!("not caught up in 15 minutes:\n{}", replicator.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (steady_from, steady_base) = first.unwrap_or((started, 0));
    let steady = (records - steady_base) as f64 / steady_from.elapsed().as_secs_f64();
    let cpu = cpu_seconds_of(replicator.pid()).unwrap_or(0.0);
    let hwm = status_kib(replicator.pid(), "VmHWM:").unwrap_or(0);
    let target_cpu = cluster_cpu(&target) - target_cpu_before;
    let rows_in_target: i64 = tgt
        .query_one("SELECT count(*) FROM public.items", &[])
        .await?
        .get(0);
    let commits = metric(
        metrics_port,
        "walrelay_consumer_replicate_transactions_total",
    )
    .await;
    let batches = metric(metrics_port, "walrelay_consumer_batch_events_count").await;
    let busy_ms = metric(metrics_port, "walrelay_consumer_batch_duration_seconds_sum").await;
    println!(
        "throughput: {records} records ({rows_in_target} rows in the target) applied in {seconds:.1}s from the replicator's start = {:.0} rows/s ({steady:.0} records/s from its first commit, after the group join) in {commits} target transactions, {batches} batches ({busy_ms} s in the writer's batches); replicator CPU {cpu:.1}s, peak RSS {:.0} MiB; target Postgres CPU {target_cpu:.1}s",
        o.rows as f64 / seconds,
        hwm as f64 / 1024.0,
    );
    // Latency at a steady rate.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tgt
        .query_one("SELECT to_regclass('public.ticks') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0)
    {
        if Instant::now() > deadline {
            bail!("the replicator did not create ticks:\n{}", replicator.log());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tgt.batch_execute(
        "ALTER TABLE public.ticks ADD COLUMN applied_at timestamptz DEFAULT clock_timestamp()",
    )
    .await?;
    let per_txn = 50u64;
    let interval = Duration::from_secs_f64(per_txn as f64 / o.rate as f64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let writing = Instant::now();
    let mut written = 0u64;
    while writing.elapsed() < Duration::from_secs(o.seconds) {
        tick.tick().await;
        src.batch_execute(&format!(
            "INSERT INTO ticks SELECT FROM generate_series(1, {per_txn})"
        ))
        .await?;
        written += per_txn;
    }
    let achieved = written as f64 / writing.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n: i64 = tgt
            .query_one("SELECT count(*) FROM public.ticks", &[])
            .await?
            .get(0);
        if n as u64 >= written {
            break;
        }
        if Instant::now() > deadline {
            bail!("{n} of {written} ticks applied after 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Source insert times, joined with the target's apply times, per row.
    let at: Vec<(i64, f64)> = src
        .query("SELECT id, extract(epoch FROM at)::float8 FROM ticks", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let applied_at: std::collections::HashMap<i64, f64> = tgt
        .query(
            "SELECT id, extract(epoch FROM applied_at)::float8 FROM public.ticks",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut lat: Vec<f64> = at
        .iter()
        .filter_map(|(id, a)| applied_at.get(id).map(|b| (b - a) * 1000.0))
        .collect();
    lat.sort_by(f64::total_cmp);
    println!(
        "latency: {written} rows at {achieved:.0} rows/s in {per_txn}-row transactions; source insert to target apply p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} rows measured)",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        lat.len()
    );
    replicator.terminate();
    Ok(())
}
