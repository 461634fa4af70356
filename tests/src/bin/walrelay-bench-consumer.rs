//! The consumer's benchmark harness: prints figures, asserts nothing.
//!
//! The Kafka side is a real single-node Apache Kafka 4.1 ([`walrelay_tests::kafka`]) for every
//! line (with `--mock-kafka`, the in-process librdkafka mock cluster hosted by
//! `walrelay-mock-broker` instead, to take the broker's CPU off the two cores), so what differs
//! between lines is the search side:
//!
//! - **discard**: the search stand-in in discard mode (it parses every bulk request and answers
//!   at once), so the figures are the consumer's own cost, not a search node's;
//! - **OpenSearch**: a real OpenSearch 2.19 node ([`walrelay_tests::opensearch`]): one small
//!   node (768 MiB heap) on the same machine, so it competes with the consumer for the cores.
//!
//! Per backend and run:
//!
//! 1. fill (once): N synthetic envelopes (six columns, about 500 bytes) into a 16-partition
//!    topic (the mock, when chosen, keeps 100k messages per partition; the harness refuses more
//!    than it can hold);
//! 2. index: `walrelay-consumer index` from offset zero (a fresh group) until its group
//!    committed every event: events/s from process start and in steady state (first commit to
//!    last; target ≥ 100k with the discard stand-in), the consumer's peak RSS (VmHWM) and CPU;
//! 3. reindex: `walrelay-consumer reindex` over the same N events, wall time to its exit
//!    (target ≤ 20 s for 1M with the discard stand-in), peak RSS and CPU (sampled every 100 ms).
//!
//! Usage: `scripts/bench-consumer.sh [--events N] [--repeat N] [--skip-discard] [--skip-real]
//! [--mock-kafka] [--consumer-arg ARG]... [--consumer-env KEY=VALUE]...`
//!
//! `--consumer-arg` and `--consumer-env` go to every consumer run (before the subcommand), for
//! trying settings: `--consumer-arg --batch-max-events --consumer-arg 1000`. Set
//! `WALRELAY_BENCH_RSS_TRACE=1` to print the consumer's RSS every second (stderr), and
//! `WALRELAY_BENCH_SHOW_LOGS=1` to print the index runs' logs.

use std::path::{Path, PathBuf};
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
/// Distinct rows among the synthetic events (ids repeat after this many).
const ROWS: u64 = 500_000;
const MIB: f64 = (1 << 20) as f64;

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
        id = i % ROWS,
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
        let key = format!("{{\"id\":{}}}", i % ROWS);
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
    producer.flush(Duration::from_secs(300))?;
    Ok(bytes)
}

/// Creates the benchmark's topics on a real broker (the mock creates them at start).
async fn create_topics(brokers: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let dlq = format!("{TOPIC}.dlq");
    let topics = [
        NewTopic::new(TOPIC, PARTITIONS, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
        if let Err((topic, e)) = r {
            bail!("creating {topic}: {e}");
        }
    }
    Ok(())
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

/// What every consumer run of one backend shares.
struct Setup<'a> {
    consumer: &'a Path,
    brokers: &'a str,
    search_url: String,
    /// `--index-template`, for a real server (each run under a prefix of its own).
    template: Option<String>,
    events: u64,
    opts: &'a Opts,
    logs: &'a Path,
}

impl Setup<'_> {
    fn args(&self, group: &str, tail: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "--kafka-brokers",
            self.brokers,
            "--topic",
            TOPIC,
            "--group",
            group,
            "--search-url",
            &self.search_url,
            "--log-format",
            "json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(t) = &self.template {
            args.extend(["--index-template".to_string(), t.clone()]);
        }
        args.extend(self.opts.consumer_args.iter().cloned());
        args.extend(tail.iter().map(|s| s.to_string()));
        args
    }

    fn spawn(&self, group: &str, tail: &[&str], log: &str) -> Proc {
        let env: Vec<(&str, String)> = self
            .opts
            .consumer_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        Proc::spawn(
            self.consumer,
            &self.args(group, tail),
            &env,
            &self.logs.join(log),
        )
    }
}

/// Resident memory now (VmRSS) of a process, in bytes.
fn rss_now(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A transient failure to read committed offsets, shown once per kind.
fn note_transient(e: &anyhow::Error) {
    use std::sync::Mutex;
    static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let text = e.to_string();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if !seen.contains(&text) {
        eprintln!("  (reading committed offsets: {text}; asking again)");
        seen.push(text);
    }
}

/// Figures of one `index` run.
struct IndexRun {
    /// Process start to the last commit.
    secs: f64,
    /// First commit to the last, events/s.
    steady: Option<f64>,
    peak_rss: u64,
    cpu: f64,
    harness_cpu: f64,
}

/// Figures of one `reindex` run.
struct ReindexRun {
    secs: f64,
    peak_rss: u64,
    cpu: f64,
}

/// Runs `index` from offset zero until `group` committed every event, then stops it.
async fn index_run(s: &Setup<'_>, group: &str, log: &str) -> anyhow::Result<IndexRun> {
    let brokers = s.brokers.to_string();
    let trace = std::env::var_os("WALRELAY_BENCH_RSS_TRACE").is_some();
    let harness_cpu_before = cpu_seconds_of(std::process::id()).unwrap_or(0.0);
    let t = Instant::now();
    let mut p = s.spawn(group, &["index"], log);
    // The first commit marks the end of start-up (process start, group join, first fetch).
    let mut first: Option<(Instant, i64)> = None;
    let mut last_trace = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (b, g) = (brokers.clone(), group.to_string());
        // A real broker answers "not coordinator" until the offsets topic is ready: asked again.
        let done = match tokio::task::spawn_blocking(move || committed(&b, &g)).await? {
            Ok(n) => n,
            Err(e) if t.elapsed() < Duration::from_secs(120) => {
                note_transient(&e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
        }
        if trace && last_trace.elapsed() >= Duration::from_secs(1) {
            last_trace = Instant::now();
            eprintln!(
                "  t={:5.1}s committed {done:>8} rss {:6.1} MiB peak {:6.1} MiB",
                t.elapsed().as_secs_f64(),
                rss_now(p.pid()).unwrap_or(0) as f64 / MIB,
                p.peak_rss_bytes().unwrap_or(0) as f64 / MIB
            );
        }
        if done >= s.events as i64 {
            break;
        }
        if let Some(code) = p.try_exit() {
            bail!("the indexer exited ({code:?}):\n{}", p.log());
        }
        if t.elapsed() > Duration::from_secs(1200) {
            bail!(
                "the indexer did not finish in 20 minutes ({done} of {})",
                s.events
            );
        }
    }
    let secs = t.elapsed().as_secs_f64();
    // None when the first commit already covered every event (too few events to tell).
    let steady = first
        .filter(|(_, n)| *n < s.events as i64)
        .map(|(at, n)| (s.events as i64 - n) as f64 / at.elapsed().as_secs_f64().max(0.001));
    let peak_rss = p.peak_rss_bytes().unwrap_or(0);
    let cpu = p.cpu_seconds().unwrap_or(0.0);
    let harness_cpu = cpu_seconds_of(std::process::id()).unwrap_or(0.0) - harness_cpu_before;
    p.terminate();
    if std::env::var_os("WALRELAY_BENCH_SHOW_LOGS").is_some() {
        for l in p.log().lines() {
            eprintln!("{l}");
        }
    }
    Ok(IndexRun {
        secs,
        steady,
        peak_rss,
        cpu,
        harness_cpu,
    })
}

/// Runs `reindex` over the whole topic until it exits.
async fn reindex_run(s: &Setup<'_>, group: &str, log: &str) -> anyhow::Result<ReindexRun> {
    let trace = std::env::var_os("WALRELAY_BENCH_RSS_TRACE").is_some();
    let t = Instant::now();
    let mut r = s.spawn(group, &["--grace-period", "0s", "reindex"], log);
    // The figures of a process are gone once it is reaped: sampled until then.
    let (mut peak_rss, mut cpu) = (0, 0.0);
    let mut last_trace = Instant::now();
    let code = loop {
        peak_rss = r.peak_rss_bytes().unwrap_or(peak_rss).max(peak_rss);
        cpu = r.cpu_seconds().unwrap_or(cpu);
        if trace && last_trace.elapsed() >= Duration::from_secs(1) {
            last_trace = Instant::now();
            eprintln!(
                "  reindex t={:5.1}s rss {:6.1} MiB peak {:6.1} MiB",
                t.elapsed().as_secs_f64(),
                rss_now(r.pid()).unwrap_or(0) as f64 / MIB,
                peak_rss as f64 / MIB
            );
        }
        if let Some(code) = r.try_exit() {
            break code;
        }
        if t.elapsed() > Duration::from_secs(1200) {
            bail!("reindex did not finish in 20 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if code != Some(0) {
        bail!("reindex exited {code:?}:\n{}", r.log());
    }
    Ok(ReindexRun {
        secs: t.elapsed().as_secs_f64(),
        peak_rss,
        cpu,
    })
}

/// One line of the summary.
struct Line {
    backend: &'static str,
    run: u32,
    index: IndexRun,
    reindex: Option<ReindexRun>,
}

fn print_run(l: &Line, events: u64) {
    let i = &l.index;
    let steady = i.steady.map_or("-".into(), |r| format!("{r:.0} events/s"));
    println!(
        "[{} #{}] index: {events} events in {:.2} s = {:.0} events/s from process start, steady {steady}, peak RSS {:.1} MiB, CPU {:.1} s ({:.1} µs/event; harness with the stand-in {:.1} s)",
        l.backend,
        l.run,
        i.secs,
        events as f64 / i.secs,
        i.peak_rss as f64 / MIB,
        i.cpu,
        i.cpu * 1e6 / events as f64,
        i.harness_cpu,
    );
    if let Some(r) = &l.reindex {
        println!(
            "[{} #{}] reindex: start to exit {:.2} s, peak RSS {:.1} MiB, CPU {:.1} s ({:.1} µs/event)",
            l.backend,
            l.run,
            r.secs,
            r.peak_rss as f64 / MIB,
            r.cpu,
            r.cpu * 1e6 / events as f64,
        );
    }
}

fn print_summary(lines: &[Line], events: u64) {
    println!();
    println!(
        "summary ({events} events, {} cores; peak RSS = the consumer's VmHWM; CPU = all the consumer's threads):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>3} | {:>12} {:>12} {:>9} {:>8} | {:>9} {:>9} {:>8}",
        "backend",
        "run",
        "steady ev/s",
        "start ev/s",
        "RSS MiB",
        "µs/ev",
        "reindex s",
        "RSS MiB",
        "µs/ev"
    );
    for l in lines {
        let i = &l.index;
        let (rs, rr, rc) = match &l.reindex {
            Some(r) => (
                format!("{:.2}", r.secs),
                format!("{:.1}", r.peak_rss as f64 / MIB),
                format!("{:.1}", r.cpu * 1e6 / events as f64),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<34} {:>3} | {:>12} {:>12.0} {:>9.1} {:>8.1} | {:>9} {:>9} {:>8}",
            l.backend,
            l.run,
            i.steady.map_or("-".into(), |r| format!("{r:.0}")),
            events as f64 / i.secs,
            i.peak_rss as f64 / MIB,
            i.cpu * 1e6 / events as f64,
            rs,
            rr,
            rc
        );
    }
    let targets: Vec<(&str, String)> = lines
        .iter()
        .filter(|l| is_discard(l.backend))
        .map(|l| {
            let steady = match l.index.steady {
                Some(rate) => met(rate >= 100_000.0),
                None => "not measured (the first commit covered every event)",
            };
            let reindex = l
                .reindex
                .as_ref()
                .is_some_and(|r| r.secs <= 20.0 * events as f64 / 1e6);
            let rss = l.index.peak_rss <= 128 << 20;
            (
                l.backend,
                format!(
                    "#{}: steady >= 100000 events/s {}, reindex <= 20 s per 1M {}, index peak RSS <= 128 MiB {}",
                    l.run,
                    steady,
                    met(reindex),
                    met(rss)
                ),
            )
        })
        .collect();
    for (backend, t) in targets {
        println!("targets ({backend} {t})");
    }
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The labels of one Kafka side's lines.
struct Side {
    kafka: &'static str,
    discard: &'static str,
    opensearch: &'static str,
}

const REAL: Side = Side {
    kafka: "real Kafka, one node",
    discard: "Kafka 4.1 + discard stand-in",
    opensearch: "Kafka 4.1 + OpenSearch 2.19 node",
};
const MOCK: Side = Side {
    kafka: "mock cluster",
    discard: "mock Kafka + discard stand-in",
    opensearch: "mock Kafka + OpenSearch 2.19 node",
};

fn is_discard(backend: &str) -> bool {
    backend.ends_with("discard stand-in")
}

#[derive(Default)]
struct Opts {
    events: u64,
    repeat: u32,
    skip_discard: bool,
    skip_real: bool,
    mock_kafka: bool,
    consumer_args: Vec<String>,
    consumer_env: Vec<(String, String)>,
}

fn parse_opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        events: 1_000_000,
        repeat: 1,
        ..Opts::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--events" => o.events = value()?.parse()?,
            "--repeat" => o.repeat = value()?.parse::<u32>()?.max(1),
            "--consumer-arg" => o.consumer_args.push(value()?),
            "--consumer-env" => {
                let v = value()?;
                let (k, v) = v
                    .split_once('=')
                    .context("--consumer-env takes KEY=VALUE")?;
                o.consumer_env.push((k.to_string(), v.to_string()));
            }
            "--skip-discard" => o.skip_discard = true,
            "--skip-real" => o.skip_real = true,
            "--mock-kafka" => o.mock_kafka = true,
            _ => bail!("unknown option {flag}"),
        }
    }
    if o.mock_kafka && o.events > 100_000 * PARTITIONS as u64 {
        bail!(
            "at most {} events: the mock cluster keeps 100k per partition",
            100_000 * PARTITIONS
        );
    }
    Ok(o)
}

async fn fill_timed(brokers: &str, events: u64, what: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    let b = brokers.to_string();
    let bytes = tokio::task::spawn_blocking(move || fill(&b, events)).await??;
    println!(
        "fill ({what}): {events} events ({:.0} bytes each) in {:.1} s",
        bytes as f64 / events as f64,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Index and reindex runs against the discard stand-in.
async fn discard_runs(
    backend: &'static str,
    consumer: &Path,
    brokers: &str,
    opts: &Opts,
    logs: &Path,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    let search = SearchStandIn::start().await;
    search.set_faults(Faults {
        discard: true,
        ..Faults::default()
    });
    let s = Setup {
        consumer,
        brokers,
        search_url: search.url(),
        template: None,
        events: opts.events,
        opts,
        logs,
    };
    let tag = if is_discard(backend) {
        "discard"
    } else {
        "kafka"
    };
    for run in 1..=opts.repeat {
        let group = format!("bench-{tag}-{run}");
        let (before, _) = search.bulk_stats();
        let index = index_run(&s, &group, &format!("{tag}-index-{run}.log")).await?;
        let (after, _) = search.bulk_stats();
        if after - before < opts.events {
            bail!(
                "only {} of {} events reached the stand-in",
                after - before,
                opts.events
            );
        }
        let reindex = reindex_run(&s, &group, &format!("{tag}-reindex-{run}.log")).await?;
        let line = Line {
            backend,
            run,
            index,
            reindex: Some(reindex),
        };
        print_run(&line, opts.events);
        lines.push(line);
    }
    Ok(())
}

/// Index and reindex runs against a real OpenSearch node, each run under its own index prefix.
async fn opensearch_runs(
    backend: &'static str,
    consumer: &Path,
    brokers: &str,
    opts: &Opts,
    logs: &Path,
    lines: &mut Vec<Line>,
) -> anyhow::Result<()> {
    use walrelay_tests::opensearch::{Indexes, OpenSearch};
    let t = Instant::now();
    let node = tokio::task::spawn_blocking(OpenSearch::start).await?;
    println!(
        "OpenSearch 2.19 up in {:.1} s at {}: a single small node (768 MiB heap, 1 shard, 0 replicas) on the same {} cores as the consumer and the Kafka side",
        t.elapsed().as_secs_f64(),
        node.url(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rows = opts.events.min(ROWS);
    for run in 1..=opts.repeat {
        let indexes = Indexes::new(&node.url());
        let s = Setup {
            consumer,
            brokers,
            search_url: node.url(),
            template: Some(indexes.template()),
            events: opts.events,
            opts,
            logs,
        };
        let group = format!("bench-opensearch-{run}");
        let index = index_run(&s, &group, &format!("opensearch-index-{run}.log")).await?;
        let n = indexes.count("public.customers").await;
        if n != rows {
            bail!("after index: {n} documents in public.customers, expected {rows}");
        }
        let reindex = reindex_run(&s, &group, &format!("opensearch-reindex-{run}.log")).await?;
        let n = indexes.count("public.customers").await;
        if n != rows {
            bail!("after reindex: {n} documents in public.customers, expected {rows}");
        }
        let line = Line {
            backend,
            run,
            index,
            reindex: Some(reindex),
        };
        print_run(&line, opts.events);
        lines.push(line);
    }
    drop(node);
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let opts = parse_opts()?;
    let events = opts.events;
    let consumer = sibling("walrelay-consumer")?;
    let logs = tempfile::Builder::new()
        .prefix("walrelay-bench-consumer-")
        .tempdir()?;
    let (load, _) = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_once(' ')
        .map_or((String::new(), ()), |(l, _)| (l.to_string(), ()));
    println!(
        "walrelay consumer benchmark: {events} events, {PARTITIONS} partitions, {} run(s) per backend, load average {load} at start{}",
        opts.repeat,
        if opts.consumer_args.is_empty() && opts.consumer_env.is_empty() {
            ", consumer defaults".to_string()
        } else {
            format!(
                ", consumer args {:?} env {:?}",
                opts.consumer_args, opts.consumer_env
            )
        }
    );
    let mut lines = Vec::new();
    if !(opts.skip_discard && opts.skip_real) {
        // The broker lives until the runs are done.
        let (side, brokers, _mock, _kafka) = if opts.mock_kafka {
            let broker = MockBroker::start(
                &sibling("walrelay-mock-broker")?,
                &[&format!("{TOPIC}:{PARTITIONS}"), &format!("{TOPIC}.dlq:1")],
            );
            let brokers = broker.brokers().to_string();
            (MOCK, brokers, Some(broker), None)
        } else {
            let kafka =
                tokio::task::spawn_blocking(|| walrelay_tests::kafka::KafkaCluster::start(1))
                    .await?;
            let brokers = kafka.brokers();
            create_topics(&brokers).await?;
            (REAL, brokers, None, Some(kafka))
        };
        fill_timed(&brokers, events, side.kafka).await?;
        if !opts.skip_discard {
            discard_runs(
                side.discard,
                &consumer,
                &brokers,
                &opts,
                logs.path(),
                &mut lines,
            )
            .await?;
        }
        if !opts.skip_real {
            opensearch_runs(
                side.opensearch,
                &consumer,
                &brokers,
                &opts,
                logs.path(),
                &mut lines,
            )
            .await?;
        }
    }
    print_summary(&lines, events);
    Ok(())
}
