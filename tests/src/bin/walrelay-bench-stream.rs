//! The stream gateway's benchmark (`walrelay-consumer stream`): prints figures, asserts
//! nothing.
//!
//! 1. A real single-node Apache Kafka ([`walrelay_tests::kafka`]); N synthetic envelopes
//!    (about 500 bytes, as the consumer benchmark's) written to a 4-partition topic.
//! 2. The gateway from the same target folder (`--max-unacked` as given, default 1000).
//! 3. Throughput: one WebSocket client (tokio-tungstenite, in this process) joins a new group
//!    from `earliest` and acknowledges the highest offset of each partition every `--ack-every`
//!    events (default 250), until `caught_up`: events/s from the upgrade to `caught_up`, the
//!    gateway's CPU seconds and peak RSS (VmHWM).
//! 4. Idle connections: `--connections` clients (default 100), each in a group of its own from
//!    `latest`, connected until each had its `caught_up`; then the gateway's RSS (VmRSS) and
//!    its growth per connection, measured after 5 s of quiet (pings answered).
//!
//! The client reads `partition` and `offset` from the frame's head (the gateway writes them
//! before the event), so the client's own cost stays small beside the gateway's.
//!
//! Usage: `scripts/bench-stream.sh [--events N] [--connections N] [--max-unacked N]
//! [--ack-every N]`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use walrelay_tests::process::{Proc, cpu_seconds_of};

const TOKEN: &str = "bench-token-0123456789abcdef";
const PARTITIONS: i32 = 4;
const MIB: f64 = (1 << 20) as f64;

struct Opts {
    events: u64,
    connections: usize,
    max_unacked: usize,
    ack_every: usize,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        events: 300_000,
        connections: 100,
        max_unacked: 1000,
        ack_every: 250,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> anyhow::Result<u64> {
            args.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--events" => o.events = value()?,
            "--connections" => o.connections = value()? as usize,
            "--max-unacked" => o.max_unacked = value()? as usize,
            "--ack-every" => o.ack_every = value()?.max(1) as usize,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

fn envelope(i: u64) -> String {
    let lsn = 100_000_000 + i * 120;
    format!(
        concat!(
            r#"{{"op":"c","before":null,"after":{{"id":{id},"email":"user{id}@example.com","#,
            r#""name":"Customer number {id}","balance":{bal}.25,"tags":["a","b{t}"],"active":true}},"#,
            r#""source":{{"version":"0.1.0","connector":"walrelay","db":"bench","schema":"public","#,
            r#""table":"customers","lsn":{lsn},"commit_lsn":{lsn},"txid":{tx},"ts_ms":1700000000000,"#,
            r#""snapshot":false,"seq":1}},"ts_ms":1700000000000,"key":["id"],"#,
            r#""types":{{"id":"integer","email":"text","name":"text","balance":"numeric","tags":"text[]","active":"boolean"}}}}"#
        ),
        id = i,
        bal = i % 10_000,
        t = i % 7,
        lsn = lsn,
        tx = 1000 + i,
    )
}

fn fill(brokers: &str, topic: &str, events: u64) -> anyhow::Result<()> {
    let producer: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()?;
    for i in 0..events {
        let (key, value) = (format!("{{\"id\":{i}}}"), envelope(i));
        while producer
            .send(
                BaseRecord::<String, String>::to(topic)
                    .key(&key)
                    .payload(&value),
            )
            .is_err()
        {
            producer.poll(Duration::from_millis(10));
        }
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(())
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(port: u16, query: &str) -> anyhow::Result<Socket> {
    let mut req = format!("ws://127.0.0.1:{port}/v1/stream?{query}").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    // Nagle off, as browsers and most WebSocket clients do: an ack is sent at once.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
    Ok(ws)
}

/// `"key":<integer>` in the head of a frame.
fn number(frame: &str, key: &str) -> Option<i64> {
    let at = frame.find(key)? + key.len();
    let rest = &frame[at..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '-'))?;
    rest[..end].parse().ok()
}

/// One client reading everything with acks: (events, seconds from the first event to
/// caught_up, seconds from connecting to the first event: the group join).
async fn throughput(port: u16, o: &Opts) -> anyhow::Result<(u64, f64, f64)> {
    let connected = Instant::now();
    let mut ws = connect(port, "group=bench-throughput&from=earliest").await?;
    let mut started: Option<Instant> = None;
    let mut highest: BTreeMap<i64, i64> = BTreeMap::new();
    let (mut events, mut since_ack) = (0u64, 0usize);
    while let Some(m) = ws.next().await {
        let Message::Text(text) = m? else {
            continue;
        };
        let text = text.as_str();
        if text.starts_with(r#"{"type":"event""#) {
            let (p, off) = (
                number(text, r#""partition":"#).context("partition")?,
                number(text, r#""offset":"#).context("offset")?,
            );
            highest.insert(p, off);
            started.get_or_insert_with(Instant::now);
            events += 1;
            since_ack += 1;
            if since_ack >= o.ack_every {
                since_ack = 0;
                for (p, off) in &highest {
                    ws.feed(Message::text(format!(
                        r#"{{"type":"ack","partition":{p},"offset":{off}}}"#
                    )))
                    .await?;
                }
                ws.flush().await?;
            }
        } else if text.starts_with(r#"{"type":"caught_up""#) {
            break;
        } else {
            bail!("unexpected frame: {text}");
        }
    }
    let first = started.unwrap_or(connected);
    let joined = first.duration_since(connected).as_secs_f64();
    let seconds = first.elapsed().as_secs_f64();
    for (p, off) in &highest {
        ws.send(Message::text(format!(
            r#"{{"type":"ack","partition":{p},"offset":{off}}}"#
        )))
        .await?;
    }
    let _ = ws.close(None).await;
    Ok((events, seconds, joined))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let consumer = walrelay_tests::sibling_bin("walrelay-consumer").map_err(anyhow::Error::msg)?;
    let kafka =
        tokio::task::spawn_blocking(|| walrelay_tests::kafka::KafkaCluster::start(1)).await?;
    let brokers = kafka.brokers();
    let topic = walrelay_tests::unique("benchs").replace('_', ".");
    walrelay_common::kafka::ensure_topic(&kafka.client_config(), &topic, PARTITIONS).await?;
    let filled = Instant::now();
    {
        let (b, t, n) = (brokers.clone(), topic.clone(), o.events);
        tokio::task::spawn_blocking(move || fill(&b, &t, n)).await??;
    }
    eprintln!(
        "filled {} events in {:.1}s",
        o.events,
        filled.elapsed().as_secs_f64()
    );
    let logs = tempfile::tempdir()?;
    let port = walrelay_tests::free_port();
    let mut args: Vec<String> = vec![
        "stream".into(),
        "--kafka-brokers".into(),
        brokers.clone(),
        "--topic".into(),
        topic.clone(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--api-token".into(),
        TOKEN.into(),
        "--max-unacked".into(),
        o.max_unacked.to_string(),
        "--max-connections".into(),
        (o.connections + 10).to_string(),
    ];
    for p in kafka.client_properties() {
        args.extend(["--kafka-property".into(), p]);
    }
    let gw = Proc::spawn(&consumer, &args, &[], &logs.path().join("stream.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the gateway never listened:\n{}", gw.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_start = status_kib(gw.pid(), "VmRSS:").unwrap_or(0);
    let cpu_before = cpu_seconds_of(gw.pid()).unwrap_or(0.0);
    let (events, seconds, joined) = throughput(port, &o).await?;
    let cpu = cpu_seconds_of(gw.pid()).unwrap_or(0.0) - cpu_before;
    let hwm = status_kib(gw.pid(), "VmHWM:").unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let threads_after = status_kib(gw.pid(), "Threads:").unwrap_or(0);
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{}/task", gw.pid()))?.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        *names.entry(name.trim().to_string()).or_default() += 1;
    }
    eprintln!("gateway threads 3 s after the client left: {names:?}");
    println!(
        "throughput: {events} events in {seconds:.2}s from the first event (the group join before it took {joined:.1}s) = {:.0} events/s through one client (acks every {} events, --max-unacked {}); gateway CPU {cpu:.1}s ({:.0}% of one core), peak RSS {:.0} MiB (at start {:.0} MiB); {threads_after} threads 3 s after the client left",
        events as f64 / seconds,
        o.ack_every,
        o.max_unacked,
        cpu / seconds * 100.0,
        hwm as f64 * 1024.0 / MIB,
        rss_start as f64 * 1024.0 / MIB,
    );
    // Idle connections.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = status_kib(gw.pid(), "VmRSS:").unwrap_or(0);
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..o.connections {
        let mut ws = connect(port, &format!("group=bench-idle-{i}&from=latest")).await?;
        // Each member joins its group and reports caught_up; pongs are sent while reading.
        loop {
            match tokio::time::timeout(Duration::from_secs(60), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("caught_up") => break,
                Ok(Some(Ok(_))) => {}
                other => bail!("idle connection {i}: {other:?}\n{}", gw.log()),
            }
        }
        held.push(tokio::spawn(async move {
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    let joined = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = status_kib(gw.pid(), "VmRSS:").unwrap_or(0);
    let threads = status_kib(gw.pid(), "Threads:").unwrap_or(0);
    println!(
        "idle: {} connections (each its own group, caught up) opened in {joined:.1}s; gateway RSS {:.0} MiB (before {:.0} MiB: {:.2} MiB per connection), {threads} threads",
        o.connections,
        after as f64 * 1024.0 / MIB,
        before as f64 * 1024.0 / MIB,
        (after.saturating_sub(before)) as f64 * 1024.0 / MIB / o.connections as f64,
    );
    // SIGTERM with the idle connections open: each closes (1001) and commits, each member
    // leaves its group.
    let stopping = Instant::now();
    let code = tokio::task::spawn_blocking(move || {
        let mut gw = gw;
        gw.terminate()
    })
    .await?;
    println!(
        "stop: SIGTERM with {} connections open: exited ({code:?}) in {:.1}s",
        o.connections,
        stopping.elapsed().as_secs_f64()
    );
    for h in held {
        h.abort();
    }
    let stopped = Instant::now();
    drop(kafka);
    eprintln!("kafka stopped in {:.1}s", stopped.elapsed().as_secs_f64());
    Ok(())
}
