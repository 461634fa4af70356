//! `walrelay-bench-incremental`: an incremental snapshot of a large table under a steady write
//! load, against a real Postgres 15 and a real Kafka broker. Prints how long the re-snapshot
//! took, its rows per second and the rows dropped by windows, and the stream's commit → ack
//! latency (`walrelay_producer_commit_to_ack_seconds`: p50 and p99 as bucket bounds, and the
//! share above 100 ms) beside Kafka's own share of it (send → ack,
//! `walrelay_producer_kafka_delivery_duration_seconds`), over a baseline without the
//! re-snapshot and during it. Postgres runs with `synchronous_commit=on`, its default.
//!
//! ```text
//! walrelay-bench-incremental [--rows N] [--rate TRANSACTIONS_PER_SECOND] [--chunk-rows N]
//!                            [--baseline-seconds S]
//! ```
//!
//! Defaults: 1 000 000 rows, 200 one-row update transactions a second, 4096 rows per chunk,
//! 10 s of baseline. Build the producer next to it first (`cargo build --release -p
//! walrelay-producer -p walrelay-tests --bins`); debug-build figures are not comparable.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rand::Rng;
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::Proc;

struct Args {
    rows: u64,
    rate: u64,
    chunk_rows: u64,
    baseline: Duration,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 1_000_000,
        rate: 200,
        chunk_rows: 4096,
        baseline: Duration::from_secs(10),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .parse()
            .with_context(|| format!("{flag}: {value:?} is not a number"))?;
        match flag.as_str() {
            "--rows" => a.rows = n,
            "--rate" => a.rate = n.max(1),
            "--chunk-rows" => a.chunk_rows = n,
            "--baseline-seconds" => a.baseline = Duration::from_secs(n),
            other => bail!(
                "unknown option {other}: use --rows, --rate, --chunk-rows, --baseline-seconds"
            ),
        }
    }
    Ok(a)
}

/// Cumulative bucket counts of histogram `name`: `(le, count)`.
async fn histogram(
    http: &reqwest::Client,
    addr: &str,
    name: &str,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix("_bucket{le=\""))
        else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        out.push((le, count.trim().parse()?));
    }
    Ok(out)
}

/// The observations between two scrapes, per bucket bound (cumulative).
fn between(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect()
}

/// The share of the observations between two scrapes above `bound` seconds (a bucket bound).
fn share_above(before: &[(f64, f64)], after: &[(f64, f64)], bound: f64) -> Option<f64> {
    let diff = between(before, after);
    let total = diff.last()?.1;
    let under = diff.iter().find(|(le, _)| *le >= bound)?.1;
    (total > 0.0).then(|| (total - under) / total)
}

/// The bucket bound under which `q` of the observations between two scrapes fell.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let diff = between(before, after);
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    diff.iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2} %", v * 100.0))
}

/// The histograms read: a transaction's commit in Postgres to Kafka's acknowledgement of its
/// last event, and one record's hand-over to librdkafka to its acknowledgement.
const COMMIT_TO_ACK: &str = "walrelay_producer_commit_to_ack_seconds";
const DELIVERY: &str = "walrelay_producer_kafka_delivery_duration_seconds";

fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s.is_finite() => format!("≤{:.0} ms", s * 1000.0),
        Some(_) => "above the largest bucket".into(),
        None => "-".into(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let producer = walrelay_tests::sibling_bin("walrelay-producer").map_err(anyhow::Error::msg)?;
    // `synchronous_commit=on`, Postgres' default: the test clusters turn it off, and a
    // walsender decodes only flushed WAL, so asynchronous commits reach the slot only when the
    // WAL writer flushes them (every `wal_writer_delay`, 200 ms): that, not walrelay, would be
    // the latency measured. (`fsync` stays off, so a flush costs little here.)
    let pg = PgCluster::start_with(&[
        ("max_wal_size", "8GB"),
        ("shared_buffers", "256MB"),
        ("synchronous_commit", "on"),
    ]);
    let db = pg.create_database("inc").await;
    pg.exec(
        &db,
        &format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, t text);
             INSERT INTO items SELECT g, 0, md5(g::text) FROM generate_series(1, {}) g;",
            args.rows
        ),
    )
    .await;
    pg.exec(&db, "VACUUM ANALYZE items").await;
    let kafka = tokio::task::block_in_place(|| KafkaCluster::start(1));
    let logs = tempfile::tempdir()?;
    let metrics = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let common: Vec<String> = [
        "--postgres-url",
        &pg.url(&db),
        "--kafka-brokers",
        &kafka.brokers(),
        "--topic",
        "bench.incremental",
        "--slot",
        "bench",
        "--publication",
        "bench",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = |extra: &[&str]| -> anyhow::Result<()> {
        let mut a = common.clone();
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = std::process::Command::new(&producer).args(&a).output()?;
        if !out.status.success() {
            bail!(
                "walrelay-producer {extra:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(&["init"])?;
    let mut args_run = common.clone();
    args_run.extend(
        [
            "--snapshot",
            "never",
            "--metrics-addr",
            &metrics,
            "--incremental-chunk-rows",
            &args.chunk_rows.to_string(),
            "run",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let mut p = Proc::spawn(&producer, &args_run, &[], &logs.path().join("producer.log"));
    let c = pg.client(&db).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let active: Option<bool> = c
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench'",
                &[],
            )
            .await?
            .map(|r| r.get(0));
        if active == Some(true) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the producer never streamed:\n{}", p.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A steady writer: `rate` one-row update transactions a second.
    let url = pg.url(&db);
    let (rows, rate) = (args.rows as i64, args.rate);
    let stop = stop_flag();
    let writer_stop = std::sync::Arc::clone(&stop);
    let writer = tokio::spawn(async move {
        let (w, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut n = 0u64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let id = rng.gen_range(1..=rows);
            w.execute("UPDATE items SET v = v + 1 WHERE id = $1", &[&id])
                .await?;
            n += 1;
        }
        Ok::<u64, anyhow::Error>(n)
    });

    let http = reqwest::Client::new();
    let scrape = || async {
        Ok::<_, anyhow::Error>((
            histogram(&http, &metrics, COMMIT_TO_ACK).await?,
            histogram(&http, &metrics, DELIVERY).await?,
        ))
    };
    let h0 = scrape().await?;
    tokio::time::sleep(args.baseline).await;
    let h1 = scrape().await?;
    let t0 = Instant::now();
    run(&["--tables", "public.items", "snapshot"])?;
    let (done_rows, chunks, dropped) = loop {
        let r = c
            .query_one(
                "SELECT state, rows_done, chunks_done, rows_dropped FROM walrelay.incremental_snapshot \
                 ORDER BY request_id DESC LIMIT 1",
                &[],
            )
            .await?;
        let state: String = r.get(0);
        if state == "done" {
            break (r.get::<_, i64>(1), r.get::<_, i64>(2), r.get::<_, i64>(3));
        }
        if state == "failed" || p.try_exit().is_some() {
            bail!(
                "the incremental snapshot did not complete ({state}):\n{}",
                p.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let secs = t0.elapsed().as_secs_f64();
    let h2 = scrape().await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await??;
    p.terminate();
    println!(
        "incremental snapshot of {} rows under {} update transactions/s",
        args.rows, args.rate
    );
    println!(
        "  {done_rows} rows, {chunks} chunks of {} rows, {dropped} dropped by windows, {secs:.1} s, {:.0} rows/s",
        args.chunk_rows,
        done_rows as f64 / secs.max(1e-9)
    );
    for (phase, a, b) in [
        (
            format!("baseline ({} s)", args.baseline.as_secs()),
            &h0,
            &h1,
        ),
        ("during the re-snapshot".to_string(), &h1, &h2),
    ] {
        println!(
            "  {phase}: commit → ack p50 {}, p99 {}, above 100 ms {}; Kafka delivery (send → ack) p50 {}, p99 {}",
            ms(quantile(&a.0, &b.0, 0.5)),
            ms(quantile(&a.0, &b.0, 0.99)),
            pct(share_above(&a.0, &b.0, 0.1)),
            ms(quantile(&a.1, &b.1, 0.5)),
            ms(quantile(&a.1, &b.1, 0.99)),
        );
    }
    println!("  writes during the run: {writes}");
    Ok(())
}

/// A stop flag shared with the writer task.
fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}
