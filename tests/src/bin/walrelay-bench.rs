//! walrelay's benchmark harness: prints figures and ratios, asserts nothing.
//!
//! Everything runs against a throwaway PostgreSQL 15 cluster. Brokers: the librdkafka mock
//! cluster (`walrelay-mock-broker`, a broker that costs little; its own ceiling is measured and
//! printed) and a real single-node Apache Kafka ([`KafkaCluster`], started only for its
//! configurations, after the mock ones, so its JVM does not share the cores with them).
//!
//! Phases:
//!
//! 1. broker ceiling: a bare rdkafka producer with walrelay's settings, events of the
//!    producer's size, to each broker in use;
//! 2. snapshot (mock): the producer's initial snapshot of N rows vs `COPY … TO '/dev/null'`;
//! 3. stream, once per configuration (backend × keying): a new producer slot (a short
//!    `run --snapshot never`) and a `pg_recvlogical` slot, then N fresh rows in 1k-row
//!    transactions; `pg_recvlogical` reads that WAL range to /dev/null, then the producer
//!    delivers it until its slot is confirmed past it. The line gives both rates, their ratio,
//!    the producer's peak RSS, how full its buffer got (`walrelay_producer_buffer_bytes`
//!    sampled every 50 ms from `--metrics-addr`) and when Kafka had acknowledged every event
//!    (the rest, until the slot is confirmed, is the producer's confirmation cadence);
//! 4. latency, once per configuration: at a paced rate (default 10k rows/s), p50/p99 of
//!    commit→visible to a `read_committed` consumer (per transaction: its commit time to when
//!    its last event could be read; ms resolution) and of commit→ack from the producer's
//!    histogram;
//! 5. memory (mock): peak RSS of the producer on one big transaction (default 5M rows) vs
//!    `--max-buffer-bytes` + 64 MiB.
//!
//! Configurations: `mock schema` (4 partitions, the default keying: every event of the
//! `public` schema on one partition), `mock primary-key` (8 partitions), `kafka schema`,
//! `kafka primary-key`, each under `--delivery at-least-once` in JSON and in Avro (a real
//! Apicurio registry, `--format avro`), then `exactly-once` (Kafka transactions) in JSON, side by
//! side. The latency phase runs for the JSON configurations (its probe reads JSON).
//!
//! Usage: `scripts/bench.sh [--rows N] [--txn-rows N] [--big-rows N] [--rate ROWS_PER_S]
//! [--seconds S] [--buffer SIZE] [--only mock|kafka] [--keying schema|primary-key]
//! [--delivery at-least-once|exactly-once] [--format json|avro]
//! [--pk-partitions N] [--kafka-property KEY=VALUE]... [--skip-snapshot] [--skip-latency]
//! [--skip-memory]`. `--kafka-property` is passed to the producer of the stream and latency
//! phases (for experiments, e.g. `statistics.interval.ms`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use walrelay_tests::broker::MockBroker;
use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::postgres::{PgCluster, bin_dir};
use walrelay_tests::process::Proc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Mock,
    Kafka,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Mock => "mock",
            Backend::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    AtLeastOnce,
    ExactlyOnce,
}

impl Delivery {
    fn name(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "alo",
            Delivery::ExactlyOnce => "eos",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Avro,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keying {
    Schema,
    PrimaryKey,
}

impl Keying {
    fn name(self) -> &'static str {
        match self {
            Keying::Schema => "schema",
            Keying::PrimaryKey => "primary-key",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Keying::Schema => "schema",
            Keying::PrimaryKey => "pk",
        }
    }
}

struct Args {
    rows: u64,
    txn_rows: u64,
    big_rows: u64,
    rate: u64,
    seconds: u64,
    buffer: String,
    only: Option<Backend>,
    keying: Option<Keying>,
    delivery: Option<Delivery>,
    format: Option<Format>,
    pk_partitions: i32,
    kafka_properties: Vec<String>,
    skip_snapshot: bool,
    skip_latency: bool,
    skip_memory: bool,
    skip_stream: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 1_000_000,
        txn_rows: 1000,
        big_rows: 5_000_000,
        rate: 10_000,
        seconds: 10,
        buffer: "64MiB".into(),
        only: None,
        keying: None,
        delivery: None,
        format: None,
        pk_partitions: 8,
        kafka_properties: Vec::new(),
        skip_snapshot: false,
        skip_latency: false,
        skip_memory: false,
        skip_stream: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--skip-snapshot" => {
                a.skip_snapshot = true;
                continue;
            }
            "--skip-latency" => {
                a.skip_latency = true;
                continue;
            }
            "--skip-memory" => {
                a.skip_memory = true;
                continue;
            }
            "--skip-stream" => {
                a.skip_stream = true;
                continue;
            }
            _ => {}
        }
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rows" => a.rows = v.parse()?,
            "--txn-rows" => a.txn_rows = v.parse()?,
            "--big-rows" => a.big_rows = v.parse()?,
            "--rate" => a.rate = v.parse()?,
            "--seconds" => a.seconds = v.parse()?,
            "--buffer" => a.buffer = v,
            "--pk-partitions" => a.pk_partitions = v.parse()?,
            "--kafka-property" => a.kafka_properties.push(v),
            "--only" => {
                a.only = Some(match v.as_str() {
                    "mock" => Backend::Mock,
                    "kafka" => Backend::Kafka,
                    _ => bail!("--only takes mock or kafka"),
                })
            }
            "--delivery" => {
                a.delivery = Some(match v.as_str() {
                    "at-least-once" => Delivery::AtLeastOnce,
                    "exactly-once" => Delivery::ExactlyOnce,
                    _ => bail!("--delivery takes at-least-once or exactly-once"),
                })
            }
            "--format" => {
                a.format = Some(match v.as_str() {
                    "json" => Format::Json,
                    "avro" => Format::Avro,
                    _ => bail!("--format takes json or avro"),
                })
            }
            "--keying" => {
                a.keying = Some(match v.as_str() {
                    "schema" => Keying::Schema,
                    "primary-key" | "pk" => Keying::PrimaryKey,
                    _ => bail!("--keying takes schema or primary-key"),
                })
            }
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

const MIB: f64 = 1048576.0;
const DB: &str = "bench";
/// The topic of the ceiling, snapshot and memory phases (mock, 4 partitions).
const TOPIC: &str = "walrelay.bench";
/// Latency phases write ids from here on (`LATENCY_BASE + i * LATENCY_SPAN` for the i-th
/// configuration), the big transaction from `LATENCY_BASE + 10 * LATENCY_SPAN`.
const LATENCY_BASE: u64 = 1_000_000_000_000;
const LATENCY_SPAN: u64 = 100_000_000_000;

/// Where one configuration's events go.
struct Target {
    backend: Backend,
    keying: Keying,
    delivery: Delivery,
    format: Format,
    partitions: i32,
    brokers: String,
    topic: String,
    slot: String,
}

impl Target {
    fn label(&self) -> String {
        format!(
            "{} {} ×{} {} {}",
            self.backend.name(),
            self.keying.name(),
            self.partitions,
            self.delivery.name(),
            self.format.name()
        )
    }
}

struct Bench {
    pg: PgCluster,
    producer_bin: PathBuf,
    logs: tempfile::TempDir,
    runs: u32,
    /// `--kafka-property` flags for the stream and latency producers.
    extra: Vec<String>,
    http: reqwest::Client,
    /// The schema registry of the Avro configurations.
    registry: Option<walrelay_tests::registry::SchemaRegistry>,
}

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

    fn args(&self, t: &Target, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--postgres-url",
            &self.pg.url(DB),
            "--kafka-brokers",
            &t.brokers,
            "--topic",
            &t.topic,
            "--slot",
            &t.slot,
            "--publication",
            "bench",
            "--partition-key",
            t.keying.name(),
            "--topic-partitions",
            &t.partitions.to_string(),
            "--delivery",
            t.delivery.name(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let (Format::Avro, Some(r)) = (t.format, &self.registry) {
            v.extend([
                "--format".into(),
                "avro".into(),
                "--schema-registry-url".into(),
                r.url(),
            ]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn spawn(&mut self, t: &Target, extra: &[&str]) -> Proc {
        self.runs += 1;
        let mut args = self.args(t, extra);
        args.push("run".into());
        // WALRELAY_BENCH_LOG: the producers' RUST_LOG, and their logs are kept.
        let level = std::env::var("WALRELAY_BENCH_LOG").unwrap_or_else(|_| "warn".into());
        Proc::spawn(
            &self.producer_bin,
            &args,
            &[("RUST_LOG", level)],
            &self.logs.path().join(format!("p{}.log", self.runs)),
        )
    }

    /// `spawn` with the `--kafka-property` flags of the command line.
    fn spawn_measured(&mut self, t: &Target, extra: &[&str]) -> Proc {
        let mut all: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for p in &self.extra {
            all.push("--kafka-property".into());
            all.push(p.clone());
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.spawn(t, &refs)
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

    /// Waits until `slot` is confirmed at or past `lsn`, or `p` exits.
    async fn wait_confirmed(
        &self,
        slot: &str,
        lsn: &str,
        timeout: Duration,
        p: &mut Proc,
    ) -> anyhow::Result<()> {
        let c = self.pg.client(DB).await;
        let deadline = Instant::now() + timeout;
        loop {
            let ok: Option<bool> = c
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                    &[&lsn, &slot],
                )
                .await
                .ok()
                .and_then(|r| r.get(0));
            if ok == Some(true) {
                return Ok(());
            }
            if let Some(code) = p.try_exit() {
                bail!("producer exited ({code:?}): {}", p.log());
            }
            if Instant::now() > deadline {
                bail!("slot {slot} not confirmed to {lsn} in time");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Creates the producer's slot for `t` (and its topic on Kafka) with a short
    /// `run --snapshot never`, stopped once the slot streams. (The slot is active while it is
    /// being created too: a producer stopped then leaves its state `pending`, and the next run
    /// would drop the slot and create it anew at the current position, past the rows written in
    /// between. So this waits for the state `done` as well.)
    async fn create_slot(&mut self, t: &Target) -> anyhow::Result<()> {
        let mut p = self.spawn(t, &["--snapshot", "never"]);
        let c = self.pg.client(DB).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready: Option<bool> = c
                .query_opt(
                    "SELECT s.active AND st.snapshot_status = 'done' FROM pg_replication_slots s \
                     JOIN walrelay.slot_state st ON st.slot_name = s.slot_name WHERE s.slot_name = $1",
                    &[&t.slot],
                )
                .await?
                .and_then(|r| r.get(0));
            if ready == Some(true) {
                break;
            }
            if let Some(code) = p.try_exit() {
                bail!("producer exited ({code:?}): {}", p.log());
            }
            if Instant::now() > deadline {
                bail!("slot {} not created in time: {}", t.slot, p.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if p.terminate() != Some(0) {
            bail!("slot creation run did not stop cleanly: {}", p.log());
        }
        Ok(())
    }

    /// The producer's initial snapshot of `items` (loaded to `--rows` first when it holds
    /// fewer) against `COPY items TO '/dev/null'`, measured back to back: from the start of
    /// `run` to the slot's snapshot being `done` (every row acknowledged).
    async fn snapshot_ratio(&mut self, t: &Target, args: &Args, label: &str) -> anyhow::Result<()> {
        let have: i64 = self
            .scalar("SELECT count(*)::text FROM items")
            .await
            .parse()?;
        if (have as u64) < args.rows {
            self.load(args.rows - have as u64, 100_000, have as u64)
                .await;
        }
        let rows: f64 = self
            .scalar("SELECT count(*)::text FROM items")
            .await
            .parse()?;
        self.pg.exec(DB, "VACUUM ANALYZE items").await;
        let started = Instant::now();
        self.pg.exec(DB, "COPY items TO '/dev/null'").await;
        let copy_rate = rows / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut p = self.spawn(
            t,
            &[
                "--max-buffer-bytes",
                &args.buffer,
                "--snapshot-chunk-pages",
                "2048",
            ],
        );
        loop {
            if self
                .scalar(&format!(
                    "SELECT snapshot_status FROM walrelay.slot_state WHERE slot_name = '{}'",
                    t.slot
                ))
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
        let snap_rate = rows / started.elapsed().as_secs_f64();
        // CPU of the producer (start-up included): a figure other load on the machine does
        // not move much, unlike the rates.
        let cpu = p.cpu_seconds().unwrap_or(0.0);
        println!(
            "snapshot [{label} schema ×4, {rows:.0} rows]: producer {snap_rate:.0} rows/s, COPY TO /dev/null {copy_rate:.0} rows/s, ratio {:.2}; producer CPU {cpu:.2} s ({:.2} µs/row)",
            snap_rate / copy_rate,
            cpu * 1e6 / rows
        );
        p.terminate();
        // Its slot would otherwise hold (and later decode) every phase's WAL.
        self.drop_slot(&t.slot).await;
        Ok(())
    }

    async fn drop_slot(&self, slot: &str) {
        let c = self.pg.client(DB).await;
        for _ in 0..100 {
            if c.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .is_ok()
            {
                return;
            }
            // Still active for a moment after its holder exited.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("warning: slot {slot} could not be dropped");
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

    async fn scrape(&self, addr: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("http://{addr}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        r.text().await.ok()
    }

    /// Stream phase of one configuration: fresh rows `from..from + rows`.
    async fn stream(
        &mut self,
        t: &Target,
        args: &Args,
        from: u64,
        broker_cpu: &dyn Fn() -> f64,
    ) -> anyhow::Result<()> {
        self.create_slot(t).await?;
        let recv_slot = format!("{}_recv", t.slot);
        self.pg
            .exec(
                DB,
                &format!("SELECT pg_create_logical_replication_slot('{recv_slot}', 'pgoutput')"),
            )
            .await;
        self.load(args.rows, args.txn_rows, from).await;
        let end = self.scalar("SELECT pg_current_wal_lsn()::text").await;
        let t0 = Instant::now();
        let st = self
            .pg_tool("pg_recvlogical")
            .args(["-d", DB, "--slot", &recv_slot, "--start", "--no-loop"])
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
        let recv_secs = t0.elapsed().as_secs_f64();
        if !st.success() {
            bail!("pg_recvlogical failed");
        }
        self.drop_slot(&recv_slot).await;

        let metrics_addr = format!("127.0.0.1:{}", walrelay_tests::free_port());
        let broker_cpu0 = broker_cpu();
        let t0 = Instant::now();
        let mut p = self.spawn_measured(
            t,
            &[
                "--max-buffer-bytes",
                &args.buffer,
                "--metrics-addr",
                &metrics_addr,
            ],
        );
        let sampler = Sampler::start(self.http.clone(), metrics_addr, args.rows, t0);
        let waited = self
            .wait_confirmed(&t.slot, &end, Duration::from_secs(1800), &mut p)
            .await;
        let prod_secs = t0.elapsed().as_secs_f64();
        let peak = p.peak_rss_bytes().unwrap_or(0);
        let prod_cpu = p.cpu_seconds().unwrap_or(0.0);
        let broker_cpu = broker_cpu() - broker_cpu0;
        let s = sampler.stop().await;
        p.terminate();
        waited?;
        if p.log().contains("dropping the slot") {
            bail!(
                "the producer recreated its slot: the measurement is void:\n{}",
                p.log()
            );
        }
        let (recv_rate, prod_rate) = (args.rows as f64 / recv_secs, args.rows as f64 / prod_secs);
        let cap = s.capacity.max(1) as f64;
        let acked = s.acked_at.map_or("?".into(), |a| {
            format!(
                "{a:.2} s, ratio at last ack {:.2}",
                (args.rows as f64 / a) / recv_rate
            )
        });
        println!(
            "stream [{}]: producer {prod_rate:.0} rows/s ({prod_secs:.2} s to slot confirmed; all acked at {acked}), \
             pg_recvlogical {recv_rate:.0} rows/s ({recv_secs:.2} s), ratio {:.2}, peak RSS {:.1} MiB, \
             buffer max {:.0}% of {:.0} MiB, ≥ 90% in {}/{} samples{}; CPU: producer {prod_cpu:.2} s ({:.1} µs/row){}",
            t.label(),
            prod_rate / recv_rate,
            peak as f64 / MIB,
            100.0 * s.max_bytes as f64 / cap,
            cap / MIB,
            s.full,
            s.samples,
            s.full_at
                .map_or(String::new(), |at| format!(" (FILLED, first at {at:.2} s)")),
            prod_cpu * 1e6 / args.rows as f64,
            if t.backend == Backend::Kafka {
                format!(", broker {broker_cpu:.2} s")
            } else {
                String::new()
            },
        );
        Ok(())
    }

    /// Latency phase of one configuration (`index` picks its id range).
    async fn latency(&mut self, t: &Target, args: &Args, index: u64) -> anyhow::Result<()> {
        let visibility = Visibility::start(&t.brokers, &t.topic, t.partitions)?;
        let metrics_addr = format!("127.0.0.1:{}", walrelay_tests::free_port());
        let mut p = self.spawn_measured(
            t,
            &[
                "--max-buffer-bytes",
                &args.buffer,
                "--metrics-addr",
                &metrics_addr,
            ],
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        // pgbench paces the writes from outside this process: `rate / 100` transactions of 100
        // rows a second.
        let per_txn = 100u64;
        let script = self.logs.path().join(format!("pace{index}.sql"));
        std::fs::write(
            &script,
            format!(
                "\\set base random(1, 100000000)\n\
                 INSERT INTO items SELECT g, md5(g::text), 1, now(), '{{}}' \
                 FROM generate_series({off} + :base::bigint * {per_txn}, {off} + :base::bigint * {per_txn} + {last}) g \
                 ON CONFLICT DO NOTHING;\n",
                off = LATENCY_BASE + index * LATENCY_SPAN,
                last = per_txn - 1
            ),
        )?;
        let st = self
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
        let end = self.scalar("SELECT pg_current_wal_lsn()::text").await;
        self.wait_confirmed(&t.slot, &end, Duration::from_secs(60), &mut p)
            .await?;
        let metrics = self.scrape(&metrics_addr).await.unwrap_or_default();
        let p50 = percentile(&metrics, "walrelay_producer_commit_to_ack_seconds", 0.5)
            .unwrap_or(f64::NAN);
        let p99 = percentile(&metrics, "walrelay_producer_commit_to_ack_seconds", 0.99)
            .unwrap_or(f64::NAN);
        let commit = match (
            percentile(
                &metrics,
                "walrelay_producer_kafka_commit_duration_seconds",
                0.5,
            ),
            percentile(
                &metrics,
                "walrelay_producer_kafka_commit_duration_seconds",
                0.99,
            ),
        ) {
            (Some(a), Some(b)) if t.delivery == Delivery::ExactlyOnce => format!(
                "; Kafka commit p50 ≤ {:.1} ms, p99 ≤ {:.1} ms",
                a * 1e3,
                b * 1e3
            ),
            _ => String::new(),
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut seen = tokio::task::spawn_blocking(move || visibility.stop()).await?;
        seen.sort_unstable();
        let at = |q: f64| {
            seen.get(((seen.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(-1)
        };
        println!(
            "latency [{}] at {} rows/s ({}-row transactions): commit→visible to a read_committed consumer \
             p50 {} ms, p99 {} ms, max {} ms over {} transactions; commit→ack p50 ≤ {:.1} ms, p99 ≤ {:.1} ms (histogram bucket bounds){commit}",
            t.label(),
            args.rate,
            per_txn,
            at(0.5),
            at(0.99),
            seen.last().copied().unwrap_or(-1),
            seen.len(),
            p50 * 1e3,
            p99 * 1e3
        );
        p.terminate();
        Ok(())
    }
}

/// A `read_committed` consumer from the end of a topic, noting for each Postgres transaction
/// when its last event became visible, minus its commit time (`source.ts_ms`, ms).
struct Visibility {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<i64>>,
}

impl Visibility {
    fn start(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset, TopicPartitionList};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", walrelay_tests::unique("bench-visible"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::End)?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut last: std::collections::HashMap<u64, i64> = std::collections::HashMap::new();
            while !flag.load(Ordering::Relaxed) {
                let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let now = walrelay_common::clock::now_ms();
                let Ok(v) =
                    serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default())
                else {
                    continue;
                };
                let (Some(lsn), Some(ts)) = (
                    v["source"]["commit_lsn"].as_u64(),
                    v["source"]["ts_ms"].as_i64(),
                ) else {
                    continue;
                };
                if v["source"]["snapshot"] == true {
                    continue;
                }
                let e = last.entry(lsn).or_insert(i64::MIN);
                *e = (*e).max(now - ts);
            }
            last.into_values().collect()
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What the sampler saw of the producer's metrics.
#[derive(Debug, Default)]
struct Samples {
    samples: u32,
    /// Samples with the buffer at ≥ 90% of its capacity.
    full: u32,
    max_bytes: i64,
    capacity: i64,
    /// Seconds from start until Kafka had acknowledged as many events as rows were written.
    acked_at: Option<f64>,
    /// Seconds from start of the first sample with the buffer at ≥ 90%.
    full_at: Option<f64>,
}

/// Scrapes `/metrics` every 50 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Samples>,
}

fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Sampler {
    fn start(http: reqwest::Client, addr: String, events: u64, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut s = Samples::default();
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Ok(r) = http
                    .get(format!("http://{addr}/metrics"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(text) = r.text().await else { continue };
                let (Some(bytes), Some(cap)) = (
                    gauge(&text, "walrelay_producer_buffer_bytes"),
                    gauge(&text, "walrelay_producer_buffer_capacity_bytes"),
                ) else {
                    continue;
                };
                let (bytes, cap) = (bytes as i64, cap as i64);
                s.samples += 1;
                s.capacity = cap;
                s.max_bytes = s.max_bytes.max(bytes);
                if cap > 0 && bytes * 10 >= cap * 9 {
                    s.full += 1;
                    s.full_at.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                }
                if s.acked_at.is_none()
                    && gauge(
                        &text,
                        "walrelay_producer_kafka_delivery_duration_seconds_count",
                    )
                    .is_some_and(|c| c as u64 >= events)
                {
                    s.acked_at = Some(t0.elapsed().as_secs_f64());
                }
            }
            s
        });
        Self { stop, task }
    }

    async fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

fn broker_ceiling(brokers: &str, topic: &str, messages: u64, size: usize) -> anyhow::Result<f64> {
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
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
                BaseRecord::<String, [u8]>::to(topic)
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

fn keyings(args: &Args) -> Vec<Keying> {
    [Keying::Schema, Keying::PrimaryKey]
        .into_iter()
        .filter(|k| args.keying.is_none_or(|only| only == *k))
        .collect()
}

/// Keying × delivery × format, side by side per keying: JSON and Avro under at-least-once, then
/// JSON under exactly-once (Avro under exactly-once only with `--format avro`).
fn configurations(args: &Args) -> Vec<(Keying, Delivery, Format)> {
    let mut v = Vec::new();
    for k in keyings(args) {
        for d in deliveries(args) {
            for f in [Format::Json, Format::Avro] {
                if args.format.is_some_and(|only| only != f)
                    || (f == Format::Avro && d == Delivery::ExactlyOnce && args.format.is_none())
                {
                    continue;
                }
                v.push((k, d, f));
            }
        }
    }
    v
}

fn deliveries(args: &Args) -> Vec<Delivery> {
    [Delivery::AtLeastOnce, Delivery::ExactlyOnce]
        .into_iter()
        .filter(|d| args.delivery.is_none_or(|only| only == *d))
        .collect()
}

fn target(
    backend: Backend,
    (keying, delivery, format): (Keying, Delivery, Format),
    brokers: &str,
    args: &Args,
) -> Target {
    let slot = format!(
        "bench_{}_{}_{}_{}",
        backend.name(),
        keying.short(),
        delivery.short(),
        format.name()
    );
    Target {
        backend,
        keying,
        delivery,
        format,
        partitions: match keying {
            Keying::Schema => 4,
            Keying::PrimaryKey => args.pk_partitions,
        },
        brokers: brokers.to_string(),
        topic: format!(
            "walrelay.bench.{}.{}.{}.{}",
            backend.name(),
            keying.short(),
            delivery.short(),
            format.name()
        ),
        slot,
    }
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
    let mut b = Bench {
        pg,
        producer_bin: sibling("walrelay-producer")?,
        logs: tempfile::Builder::new()
            .prefix("walrelay-bench-")
            .disable_cleanup(std::env::var_os("WALRELAY_BENCH_LOG").is_some())
            .tempdir()?,
        runs: 0,
        extra: args.kafka_properties.clone(),
        http: reqwest::Client::new(),
        registry: None,
    };
    if configurations(&args).iter().any(|c| c.2 == Format::Avro) {
        let r = tokio::task::block_in_place(walrelay_tests::registry::SchemaRegistry::start);
        println!(
            "schema registry (Avro configurations): Apicurio at {}",
            r.url()
        );
        b.registry = Some(r);
    }
    if std::env::var_os("WALRELAY_BENCH_LOG").is_some() {
        eprintln!("producer logs kept in {}", b.logs.path().display());
    }
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
        "rows: {} ({}-row transactions), big transaction: {} rows, buffer: {}{}",
        args.rows,
        args.txn_rows,
        args.big_rows,
        args.buffer,
        if args.kafka_properties.is_empty() {
            String::new()
        } else {
            format!(", kafka properties: {}", args.kafka_properties.join(" "))
        }
    );
    // The init needs a target only for its connection settings.
    let init_target = |brokers: &str| Target {
        backend: Backend::Mock,
        keying: Keying::Schema,
        delivery: Delivery::AtLeastOnce,
        format: Format::Json,
        partitions: 4,
        brokers: brokers.to_string(),
        topic: TOPIC.into(),
        slot: "bench".into(),
    };
    // Ids: the snapshot's rows are 0..rows, the i-th stream configuration's the next ranges.
    let mut next_rows = args.rows;
    let mut index = 0u64;
    let mut inited = false;

    if args.only != Some(Backend::Kafka) {
        // The mock has no CreateTopics: every topic a configuration uses is made here.
        let mut topics = vec![format!("{TOPIC}:4")];
        for (keying, delivery, format) in configurations(&args) {
            let t = target(Backend::Mock, (keying, delivery, format), "", &args);
            topics.push(format!("{}:{}", t.topic, t.partitions));
            topics.push(format!("{}.progress:1", t.topic));
        }
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let broker = MockBroker::start(&sibling("walrelay-mock-broker")?, &topic_refs);
        let brokers = broker.brokers().to_string();
        let base = init_target(&brokers);
        // 1. Broker ceiling with events of the producer's size (~300 bytes).
        let ceiling = tokio::task::block_in_place(|| {
            broker_ceiling(&brokers, TOPIC, args.rows.min(1_000_000), 300)
        })?;
        println!(
            "broker ceiling [mock] (bare rdkafka, 300-byte events, 64 keys): {ceiling:.0} msg/s"
        );
        let out = Command::new(&b.producer_bin)
            .args(b.args(&base, &["init"]))
            .output()?;
        if !out.status.success() {
            bail!("init: {}", String::from_utf8_lossy(&out.stderr));
        }
        inited = true;

        // 2. Snapshot vs COPY TO /dev/null.
        if !args.skip_snapshot {
            b.snapshot_ratio(&base, &args, "mock").await?;
        }

        // 3. and 4. Stream and latency per keying.
        for config in configurations(&args)
            .into_iter()
            .filter(|_| !args.skip_stream)
        {
            let t = target(Backend::Mock, config, &brokers, &args);
            b.stream(&t, &args, next_rows, &|| 0.0).await?;
            next_rows += args.rows;
            if !args.skip_latency && t.format == Format::Json {
                b.latency(&t, &args, index).await?;
            }
            index += 1;
            b.drop_slot(&t.slot).await;
        }

        // 5. Peak RSS on one big transaction.
        if !args.skip_memory {
            let t = Target {
                slot: "bench_memory".into(),
                ..init_target(&brokers)
            };
            b.create_slot(&t).await?;
            let big_start = LATENCY_BASE + 10 * LATENCY_SPAN;
            b.pg.exec(DB, &format!("INSERT INTO items SELECT g, md5(g::text), 2, now(), '{{}}' FROM generate_series({big_start}, {} - 1) g", big_start + args.big_rows)).await;
            let end = b.scalar("SELECT pg_current_wal_lsn()::text").await;
            let started = Instant::now();
            let mut p = b.spawn(&t, &["--max-buffer-bytes", &args.buffer]);
            let mut peak = 0;
            let deadline = Instant::now() + Duration::from_secs(3600);
            loop {
                peak = peak.max(p.peak_rss_bytes().unwrap_or(0));
                if b.wait_confirmed(&t.slot, &end, Duration::from_millis(200), &mut p)
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
                "memory [mock schema ×4]: {} rows in one transaction delivered in {:.1} s; peak RSS {:.1} MiB vs buffer + 64 MiB = {:.1} MiB (ratio {:.2})",
                args.big_rows,
                started.elapsed().as_secs_f64(),
                peak as f64 / MIB,
                (budget + (64 << 20)) as f64 / MIB,
                peak as f64 / (budget + (64 << 20)) as f64
            );
            p.terminate();
            b.drop_slot(&t.slot).await;
        }
        drop(broker);
    }

    if args.only != Some(Backend::Mock) {
        let kafka = tokio::task::block_in_place(|| KafkaCluster::start(1));
        let brokers = kafka.brokers();
        if !inited {
            let out = Command::new(&b.producer_bin)
                .args(b.args(&init_target(&brokers), &["init"]))
                .output()?;
            if !out.status.success() {
                bail!("init: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let ceiling_topic = "walrelay.bench.kafka.ceiling";
        walrelay_common::kafka::ensure_topic(
            ClientConfig::new().set("bootstrap.servers", &brokers),
            ceiling_topic,
            4,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ceiling = tokio::task::block_in_place(|| {
            broker_ceiling(&brokers, ceiling_topic, args.rows.min(1_000_000), 300)
        })?;
        println!(
            "broker ceiling [kafka] (bare rdkafka, 300-byte events, 64 keys): {ceiling:.0} msg/s"
        );
        if !args.skip_snapshot {
            let mut t = init_target(&brokers);
            t.backend = Backend::Kafka;
            t.topic = "walrelay.bench.kafka.snapshot".into();
            // A slot of its own: the mock phase's slot state still says `done`.
            t.slot = "bench_snapshot_kafka".into();
            walrelay_common::kafka::ensure_topic(
                ClientConfig::new().set("bootstrap.servers", &brokers),
                &t.topic,
                4,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            b.snapshot_ratio(&t, &args, "kafka").await?;
        }
        for config in configurations(&args)
            .into_iter()
            .filter(|_| !args.skip_stream)
        {
            let t = target(Backend::Kafka, config, &brokers, &args);
            b.stream(&t, &args, next_rows, &|| kafka.cpu_seconds())
                .await?;
            next_rows += args.rows;
            if !args.skip_latency && t.format == Format::Json {
                b.latency(&t, &args, index).await?;
            }
            index += 1;
            b.drop_slot(&t.slot).await;
        }
        drop(kafka);
    }
    Ok(())
}
