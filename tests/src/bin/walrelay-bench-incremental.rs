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
//! Defaults: 1 000 000 rows, 200 one-row transactions a second (pgbench: updates, deletes and
//! upserts), 4096 rows per chunk, 10 s of baseline. After the latency phase, a second
//! re-snapshot is interrupted by SIGKILL half-way and resumed, and the topic, read to its end,
//! must rebuild the table exactly with no row event older than one before it for its key. Build the producer next to it first (`cargo build --release -p
//! walrelay-producer -p walrelay-tests --bins`); debug-build figures are not comparable.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
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
    wait_slot(&c, "active", Duration::from_secs(120), &p)
        .await
        .context("the producer never streamed")?;

    // The writer: pgbench at `rate` one-row transactions a second, Poisson-paced: 80 %
    // updates (v + 1), 10 % deletes, 10 % upserts (a deleted key comes back, others get v + 1).
    let scripts = tempfile::tempdir()?;
    let rows = args.rows;
    for (name, sql) in [
        (
            "update.sql",
            format!("\\set id random(1, {rows})\nUPDATE items SET v = v + 1 WHERE id = :id;\n"),
        ),
        (
            "delete.sql",
            format!("\\set id random(1, {rows})\nDELETE FROM items WHERE id = :id;\n"),
        ),
        (
            "upsert.sql",
            format!(
                "\\set id random(1, {rows})\nINSERT INTO items VALUES (:id, 0, 'again') \
                 ON CONFLICT (id) DO UPDATE SET v = items.v + 1;\n"
            ),
        ),
    ] {
        std::fs::write(scripts.path().join(name), sql)?;
    }
    let script = |n: &str, w: u32| format!("{}@{w}", scripts.path().join(n).display());
    let pgbench = walrelay_tests::postgres::bin_dir().join("pgbench");
    let writes_before = table_writes(&c).await?;
    let mut writer = std::process::Command::new(&pgbench)
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-c",
            "4",
            "-j",
            "2",
        ])
        .args([
            "-p",
            &pg.port().to_string(),
            "-R",
            &args.rate.to_string(),
            "-T",
            "36000",
        ])
        .args([
            "-f",
            &script("update.sql", 80),
            "-f",
            &script("delete.sql", 10),
        ])
        .args(["-f", &script("upsert.sql", 10), &db])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", pgbench.display()))?;

    // 1. Latency: a baseline, then a re-snapshot.
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
        let (state, rows_done, chunks_done, rows_dropped) = newest(&c).await?;
        if state == "done" {
            break (rows_done, chunks_done, rows_dropped);
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
    println!(
        "incremental snapshot of {} rows under {} one-row transactions/s (pgbench: 80 % updates, 10 % deletes, 10 % upserts)",
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

    // 2. Resume: a second re-snapshot, the producer SIGKILLed once half of its chunks are
    // done, then started again; it must go on from the last completed chunk.
    run(&["--tables", "public.items", "snapshot"])?;
    let at_kill = loop {
        let (state, rows_done, chunks_done, _) = newest(&c).await?;
        if state == "done" {
            bail!(
                "the second re-snapshot finished before it could be interrupted: lower --chunk-rows"
            );
        }
        if chunks_done as u64 * args.chunk_rows * 2 >= args.rows {
            break (rows_done, chunks_done);
        }
        if p.try_exit().is_some() {
            bail!("the producer exited:\n{}", p.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    p.kill9();
    let resumed = newest(&c).await?.2;
    let mut p = Proc::spawn(
        &producer,
        &args_run,
        &[],
        &logs.path().join("producer-2.log"),
    );
    let (rows2, chunks2) = loop {
        let (state, rows_done, chunks_done, _) = newest(&c).await?;
        if state == "done" {
            break (rows_done, chunks_done);
        }
        if state == "failed" || p.try_exit().is_some() {
            bail!(
                "the resumed re-snapshot did not complete ({state}):\n{}",
                p.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "  resume: SIGKILL after {} chunks ({} rows); progress at restart {resumed} chunks; done with {chunks2} chunks, {rows2} rows",
        at_kill.1, at_kill.0
    );

    // 3. The check: writes stop, the slot is confirmed past them, and the topic read to its
    // end rebuilds the table exactly, with no row event older than one before it.
    if let Some(status) = writer.try_wait()? {
        let out = writer.wait_with_output()?;
        bail!(
            "pgbench stopped early ({status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    writer.kill()?;
    writer.wait()?;
    let writes = table_writes(&c).await? - writes_before;
    println!("  writes: {writes} rows inserted, updated or deleted");
    let target: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    wait_slot(
        &c,
        &format!("confirmed_flush_lsn >= '{target}'::pg_lsn"),
        Duration::from_secs(300),
        &p,
    )
    .await
    .context("the slot was not confirmed past the writes")?;
    p.terminate();
    let records = tokio::task::block_in_place(|| {
        walrelay_tests::topic::read_to_end(
            &kafka.brokers(),
            "bench.incremental",
            Duration::from_secs(600),
        )
    });
    let got = walrelay_tests::topic::table_state(&records, "public", "items", "id");
    let table: std::collections::BTreeMap<String, serde_json::Map<String, serde_json::Value>> = c
        .query("SELECT id, v, t FROM items", &[])
        .await?
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let mut m = serde_json::Map::new();
            m.insert("id".into(), id.into());
            m.insert("v".into(), r.get::<_, i32>(1).into());
            m.insert("t".into(), r.get::<_, Option<String>>(2).into());
            (id.to_string(), m)
        })
        .collect();
    let differing = table
        .keys()
        .chain(got.keys())
        .filter(|k| table.get(*k) != got.get(*k))
        .count();
    let order = walrelay_tests::topic::versions_never_go_back(&records, "items", "id", "v");
    println!(
        "  check: {} records read; topic-rebuilt table {} rows vs Postgres {} rows, {differing} keys differ; order per key: {}",
        records.len(),
        got.len(),
        table.len(),
        match &order {
            Ok(n) => format!("ok ({n} incremental rows checked)"),
            Err((id, why)) => format!("VIOLATED at id {id}: {why}"),
        }
    );
    if differing > 0 || order.is_err() {
        bail!("the topic does not rebuild the table in order");
    }
    Ok(())
}

/// Waits until `condition` (over `pg_replication_slots`) holds for the bench's slot; on timeout
/// the error carries the producer's log.
async fn wait_slot(
    c: &tokio_postgres::Client,
    condition: &str,
    timeout: Duration,
    p: &Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let sql = format!("SELECT ({condition}) FROM pg_replication_slots WHERE slot_name = 'bench'");
    loop {
        let holds: Option<bool> = c.query_opt(&sql, &[]).await?.and_then(|r| r.get(0));
        if holds == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("after {timeout:?}:\n{}", p.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows of `items` inserted, updated or deleted so far, by the statistics (which trail by up
/// to a second).
async fn table_writes(c: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let r = c
        .query_one(
            "SELECT (n_tup_ins + n_tup_upd + n_tup_del)::int8 FROM pg_stat_user_tables WHERE relname = 'items'",
            &[],
        )
        .await?;
    Ok(r.get(0))
}

/// `(state, rows_done, chunks_done, rows_dropped)` of the newest incremental snapshot request.
async fn newest(c: &tokio_postgres::Client) -> anyhow::Result<(String, i64, i64, i64)> {
    let r = c
        .query_one(
            "SELECT state, rows_done, chunks_done, rows_dropped FROM walrelay.incremental_snapshot \
             ORDER BY request_id DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2), r.get(3)))
}
