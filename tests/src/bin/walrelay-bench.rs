//! walrelay's benchmark harness: prints figures and ratios, asserts nothing.
//!
//! Phases, all against a throwaway PostgreSQL 15 cluster and the in-process librdkafka mock
//! cluster (a broker that is not the bottleneck; its own ceiling is measured and printed):
//!
//! 1. broker ceiling: a bare rdkafka producer with walrelay's settings, events of the same size;
//! 2. snapshot: the producer's initial snapshot of N rows vs `COPY … TO '/dev/null'`;
//! 3. stream: N rows in 1k-row transactions, `pg_recvlogical` reading that WAL range to
//!    /dev/null vs the producer delivering it until the slot is confirmed past it;
//! 4. latency: p50/p99 commit→ack at a paced rate (default 10k rows/s);
//! 5. memory: peak RSS of the producer on one big transaction (default 5M rows) vs
//!    `--max-buffer-bytes` + 64 MiB.
//!
//! Usage: `scripts/bench.sh [--rows N] [--big-rows N] [--rate ROWS_PER_S] [--seconds S]
//! [--buffer SIZE]`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use walrelay_tests::broker::MockBroker;
use walrelay_tests::postgres::{PgCluster, bin_dir};
use walrelay_tests::process::Proc;

struct Args {
    rows: u64,
    txn_rows: u64,
    big_rows: u64,
    rate: u64,
    seconds: u64,
    buffer: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 1_000_000,
        txn_rows: 1000,
        big_rows: 5_000_000,
        rate: 10_000,
        seconds: 10,
        buffer: "64MiB".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rows" => a.rows = v.parse()?,
            "--txn-rows" => a.txn_rows = v.parse()?,
            "--big-rows" => a.big_rows = v.parse()?,
            "--rate" => a.rate = v.parse()?,
            "--seconds" => a.seconds = v.parse()?,
            "--buffer" => a.buffer = v,
            _ => bail!("unknown option {flag}"),
        }
    }
    Ok(a)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    walrelay_tests::sibling_bin(name).map_err(anyhow::Error::msg)
}

fn parse_size(s: &str) -> u64 {
    let lower = s.to_ascii_lowercase();
    let (n, mult) = if let Some(n) = lower.strip_suffix("mib") {
        (n, 1 << 20)
    } else if let Some(n) = lower.strip_suffix("gib") {
        (n, 1 << 30)
    } else {
        (lower.as_str(), 1)
    };
    n.trim().parse::<u64>().unwrap_or(64) * mult
}

struct Bench {
    pg: PgCluster,
    broker: MockBroker,
    producer_bin: PathBuf,
    logs: tempfile::TempDir,
    runs: u32,
}

const DB: &str = "bench";
const TOPIC: &str = "walrelay.bench";

impl Bench {
    /// A Postgres client tool connected to the benchmark cluster.
    fn pg_tool(&self, name: &str) -> Command {
        let mut c = Command::new(bin_dir().join(name));
        c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.pg.port().to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    fn url(&self) -> String {
        self.pg.url(DB)
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--postgres-url",
            &self.url(),
            "--kafka-brokers",
            self.broker.brokers(),
            "--topic",
            TOPIC,
            "--slot",
            "bench",
            "--publication",
            "bench",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn spawn(&mut self, extra: &[&str]) -> Proc {
        self.runs += 1;
        let mut args = self.args(extra);
        args.push("run".into());
        Proc::spawn(
            &self.producer_bin,
            &args,
            &[("RUST_LOG", "warn".into())],
            &self.logs.path().join(format!("p{}.log", self.runs)),
        )
    }

    async fn scalar(&self, sql: &str) -> String {
        let c = self.pg.client(DB).await;
        let rows = c.simple_query(sql).await.unwrap_or_default();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default()
    }

    async fn wait_confirmed(&self, lsn: &str, timeout: Duration) -> anyhow::Result<()> {
        let c = self.pg.client(DB).await;
        let deadline = Instant::now() + timeout;
        loop {
            let ok: Option<bool> = c
                .query_one("SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'bench'", &[&lsn])
                .await
                .ok()
                .and_then(|r| r.get(0));
            if ok == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("slot not confirmed to {lsn} in time");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn load(&self, rows: u64, txn_rows: u64, from: u64) {
        let c = self.pg.client(DB).await;
        let mut start = from;
        let end = from + rows;
        while start < end {
            let hi = (start + txn_rows).min(end);
            c.batch_execute(&format!(
                "INSERT INTO items SELECT g, md5(g::text), (g % 1000)::int, now(), jsonb_build_object('g', g, 'tag', 'x') \
                 FROM generate_series({start}, {hi} - 1) g"
            ))
            .await
            .expect("load");
            start = hi;
        }
    }
}

fn broker_ceiling(brokers: &str, messages: u64, size: usize) -> anyhow::Result<f64> {
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?;
    let payload = vec![b'x'; size];
    let start = Instant::now();
    for i in 0..messages {
        let key = (i % 64).to_string();
        loop {
            match producer.send(
                BaseRecord::<String, [u8]>::to(TOPIC)
                    .key(&key)
                    .payload(&payload),
            ) {
                Ok(()) => break,
                Err((_, _)) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(messages as f64 / start.elapsed().as_secs_f64())
}

fn percentile(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")))
    {
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, count));
    }
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= total * q)
        .map(|(le, _)| *le)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let pg = PgCluster::start_with(&[
        ("max_wal_size", "8GB"),
        ("logical_decoding_work_mem", "64MB"),
        ("shared_buffers", "512MB"),
        ("synchronous_commit", "on"),
    ]);
    pg.exec("postgres", &format!("CREATE DATABASE {DB}")).await;
    pg.exec(
        DB,
        "CREATE TABLE items (id bigint PRIMARY KEY, t text, n int, ts timestamptz, j jsonb)",
    )
    .await;
    let broker = MockBroker::start(&sibling("walrelay-mock-broker")?, &[&format!("{TOPIC}:4")]);
    let mut b = Bench {
        pg,
        broker,
        producer_bin: sibling("walrelay-producer")?,
        logs: tempfile::tempdir()?,
        runs: 0,
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    println!(
        "machine: {} cores, {model}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "rows: {} ({}-row transactions), big transaction: {} rows, buffer: {}",
        args.rows, args.txn_rows, args.big_rows, args.buffer
    );

    // 1. Broker ceiling with events of the producer's size (measured below; ~300 bytes).
    let ceiling = tokio::task::block_in_place(|| {
        broker_ceiling(b.broker.brokers(), args.rows.min(1_000_000), 300)
    })?;
    println!("broker ceiling (bare rdkafka → mock cluster, 300-byte events): {ceiling:.0} msg/s");

    // 2. Snapshot vs COPY TO /dev/null.
    b.load(args.rows, 100_000, 0).await;
    b.pg.exec(DB, "VACUUM ANALYZE items").await;
    let t = Instant::now();
    b.pg.exec(DB, "COPY items TO '/dev/null'").await;
    let copy_rate = args.rows as f64 / t.elapsed().as_secs_f64();
    let out = Command::new(&b.producer_bin)
        .args(b.args(&["init"]))
        .output()?;
    if !out.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&out.stderr));
    }
    let t = Instant::now();
    let mut p = b.spawn(&[
        "--max-buffer-bytes",
        &args.buffer,
        "--snapshot-chunk-pages",
        "2048",
    ]);
    loop {
        if b.scalar("SELECT snapshot_status FROM walrelay.slot_state WHERE slot_name = 'bench'")
            .await
            == "done"
        {
            break;
        }
        if let Some(code) = p.try_exit() {
            bail!("producer exited ({code:?}): {}", p.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snap_rate = args.rows as f64 / t.elapsed().as_secs_f64();
    println!(
        "snapshot: producer {snap_rate:.0} rows/s, COPY TO /dev/null {copy_rate:.0} rows/s, ratio {:.2}",
        snap_rate / copy_rate
    );
    p.terminate();

    // 3. Stream vs pg_recvlogical over the same WAL range.
    b.pg.exec(
        DB,
        "SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')",
    )
    .await;
    b.load(args.rows, args.txn_rows, args.rows).await;
    let end = b.scalar("SELECT pg_current_wal_lsn()::text").await;
    let t = Instant::now();
    let st = b
        .pg_tool("pg_recvlogical")
        .args(["-d", DB, "--slot", "bench_recv", "--start", "--no-loop"])
        .args([
            "--endpos",
            &end,
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=bench",
            "-f",
            "/dev/null",
        ])
        .status()?;
    let recv_secs = t.elapsed().as_secs_f64();
    if !st.success() {
        bail!("pg_recvlogical failed");
    }
    let t = Instant::now();
    let mut p = b.spawn(&["--max-buffer-bytes", &args.buffer]);
    b.wait_confirmed(&end, Duration::from_secs(1800)).await?;
    let prod_secs = t.elapsed().as_secs_f64();
    let (recv_rate, prod_rate) = (args.rows as f64 / recv_secs, args.rows as f64 / prod_secs);
    println!(
        "stream: producer {prod_rate:.0} rows/s ({prod_secs:.1} s), pg_recvlogical {recv_rate:.0} rows/s ({recv_secs:.1} s), ratio {:.2}",
        prod_rate / recv_rate
    );
    p.terminate();

    // 4. Commit→ack latency at a paced rate.
    let metrics_addr = format!("127.0.0.1:{}", walrelay_tests::free_port());
    let mut p = b.spawn(&[
        "--max-buffer-bytes",
        &args.buffer,
        "--metrics-addr",
        &metrics_addr,
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // pgbench paces the writes from outside this process: `rate / 100` transactions of 100
    // rows a second.
    let per_txn = 100u64;
    let script = b.logs.path().join("pace.sql");
    std::fs::write(
        &script,
        format!(
            "\\set base random(1, 100000000)\n\
             INSERT INTO items SELECT g, md5(g::text), 1, now(), '{{}}' \
             FROM generate_series({off} + :base::bigint * {per_txn}, {off} + :base::bigint * {per_txn} + {last}) g \
             ON CONFLICT DO NOTHING;\n",
            off = 100 * args.rows,
            last = per_txn - 1
        ),
    )?;
    let st = b
        .pg_tool("pgbench")
        .args(["-n", "-c", "1"])
        .args([
            "-R",
            &(args.rate / per_txn).to_string(),
            "-T",
            &args.seconds.to_string(),
            "-f",
        ])
        .arg(&script)
        .arg(DB)
        .stdout(std::process::Stdio::null())
        .status()?;
    if !st.success() {
        bail!("pgbench failed");
    }
    // Beyond every id the paced phase can write (100 * rows + 100 * random(1, 1e8)).
    let id = 100 * args.rows + 100 * 100_000_000 + 1_000_000;
    let end = b.scalar("SELECT pg_current_wal_lsn()::text").await;
    b.wait_confirmed(&end, Duration::from_secs(60)).await?;
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{metrics_addr}/metrics")])
        .output()?;
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let p50 =
        percentile(&metrics, "walrelay_producer_commit_to_ack_seconds", 0.5).unwrap_or(f64::NAN);
    let p99 =
        percentile(&metrics, "walrelay_producer_commit_to_ack_seconds", 0.99).unwrap_or(f64::NAN);
    println!(
        "latency at {} rows/s ({}-row transactions): commit→ack p50 ≤ {:.1} ms, p99 ≤ {:.1} ms (histogram bucket bounds)",
        args.rate,
        per_txn,
        p50 * 1e3,
        p99 * 1e3
    );
    p.terminate();

    // 5. Peak RSS on one big transaction.
    let big_start = id;
    b.pg.exec(DB, &format!("INSERT INTO items SELECT g, md5(g::text), 2, now(), '{{}}' FROM generate_series({big_start}, {} - 1) g", big_start + args.big_rows)).await;
    let end = b.scalar("SELECT pg_current_wal_lsn()::text").await;
    let t = Instant::now();
    let mut p = b.spawn(&["--max-buffer-bytes", &args.buffer]);
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        peak = peak.max(p.peak_rss_bytes().unwrap_or(0));
        if b.wait_confirmed(&end, Duration::from_millis(200))
            .await
            .is_ok()
            || Instant::now() > deadline
        {
            break;
        }
    }
    peak = peak.max(p.peak_rss_bytes().unwrap_or(0));
    let budget = parse_size(&args.buffer);
    println!(
        "memory: {} rows in one transaction delivered in {:.1} s; peak RSS {:.1} MiB vs buffer + 64 MiB = {:.1} MiB (ratio {:.2})",
        args.big_rows,
        t.elapsed().as_secs_f64(),
        peak as f64 / 1048576.0,
        (budget + (64 << 20)) as f64 / 1048576.0,
        peak as f64 / (budget + (64 << 20)) as f64
    );
    p.terminate();
    Ok(())
}
