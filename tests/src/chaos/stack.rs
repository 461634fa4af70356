//! The servers and walrelay processes of a chaos run, each restartable.
//!
//! Servers: the source Postgres 15 (`wal_sender_timeout=5s`, `max_slot_wal_keep_size=1GB` so
//! that a slot's safe WAL is measured, `synchronous_commit=on` so an
//! answered `COMMIT` survives an immediate restart), a target Postgres for `replicate`, three
//! Kafka KRaft nodes (replication factor 3, `min.insync.replicas=2`), one OpenSearch node.
//! Processes: one producer per delivery mode (its own slot, publication and topic) and the four
//! consumers of the first producer's topic, each serving metrics on a port of its own.
//!
//! Every walrelay process reaches its servers through TCP fault proxies, one [`Link`] each:
//!
//! ```text
//!   producers ──[source]──▶ Postgres          indexer ──[search]──▶ OpenSearch
//!   every process ──[kafka: a proxy per broker]──▶ Kafka   replicator ──[target]──▶ target Postgres
//! ```
//!
//! The harness itself (workload, topic tails, polls, lag queries) goes direct, so that a
//! network fault never hides what happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::faults::{Consumer, Link};
use crate::faultproxy::FaultProxy;
use crate::kafka::KafkaCluster;
use crate::opensearch::{Indexes, OpenSearch};
use crate::postgres::PgCluster;
use crate::process::Proc;

/// The API token of the notifier and the gateway.
pub const TOKEN: &str = "chaos-token-0123456789abcdef";
/// The stream client's group (under the gateway's prefix).
pub const STREAM_GROUP: &str = "client";
/// The tables the stream client asks for.
pub const STREAM_TABLES: &str = "public.items,public.accounts,public.scratch";

/// The source's `max_slot_wal_keep_size`: 1 GiB, five times the largest retained WAL seen in
/// a run, so that `safe_wal_size` is defined (the WAL alerts watch it).
pub const MAX_SLOT_WAL_KEEP: &str = "1GB";

/// A process the fault runner stops and starts.
pub struct Managed {
    /// For logs and reports.
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    proc: Option<Proc>,
    /// Starts so far.
    pub starts: u32,
    /// When it was last started.
    pub started_at: Option<std::time::Instant>,
}

impl Managed {
    fn new(name: &str, bin: &Path, args: Vec<String>, dir: &Path) -> Self {
        Self {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args,
            log: dir.join(format!("{name}.log")),
            proc: None,
            starts: 0,
            started_at: None,
        }
    }

    /// Starts it (its log is appended to).
    pub fn start(&mut self) {
        if self.proc.is_none() {
            let env = [("RUST_LOG", "info".to_string())];
            self.proc = Some(Proc::spawn(&self.bin, &self.args, &env, &self.log));
            self.starts += 1;
            self.started_at = Some(std::time::Instant::now());
        }
    }

    /// Whether it runs (an exited process is reaped and counts as down).
    pub fn running(&mut self) -> bool {
        if let Some(p) = self.proc.as_mut()
            && p.try_exit().is_some()
        {
            self.proc = None;
        }
        self.proc.is_some()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit (SIGKILL after): the exit code.
    pub async fn term(&mut self, timeout: Duration) -> Option<i32> {
        let mut p = self.proc.take()?;
        signal(p.pid(), "-TERM");
        match p.exit_within(timeout).await {
            Some(code) => code,
            None => {
                p.kill9();
                None
            }
        }
    }

    /// Waits up to `timeout` for it to exit by itself: `Some(exit code)` (`Some(None)`: ended
    /// by a signal, or not running), `None` when it still runs.
    pub async fn exit_within(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let Some(p) = self.proc.as_mut() else {
            return Some(None);
        };
        let code = p.exit_within(timeout).await;
        if code.is_some() {
            self.proc = None;
        }
        code
    }

    /// The log's last lines.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Sends `sig` (`-STOP`, `-CONT`, `-TERM`) to `pid`, a process this run started.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// One producer: its delivery mode, slot and topic.
pub struct Producer {
    /// `at-least-once` or `exactly-once`.
    pub mode: String,
    /// Slot and publication.
    pub slot: String,
    /// Topic.
    pub topic: String,
    /// The process.
    pub proc: Managed,
}

/// Everything of a run.
pub struct Stack {
    /// Source cluster.
    pub pg: PgCluster,
    /// Source database.
    pub db: String,
    /// The notifier's subscriptions database (on the source cluster).
    pub notifier_db: String,
    /// Target cluster and database of `replicate`.
    pub target: PgCluster,
    /// Target database.
    pub target_db: String,
    /// Three Kafka nodes.
    pub kafka: Arc<KafkaCluster>,
    /// OpenSearch.
    pub search: OpenSearch,
    /// This run's indexes.
    pub indexes: Indexes,
    /// Producers, the first one feeding the consumers.
    pub producers: Vec<Producer>,
    /// Consumers.
    pub consumers: BTreeMap<Consumer, Managed>,
    /// The notifier's API port.
    pub notify_api: u16,
    /// The gateway's port.
    pub stream_port: u16,
    /// Consumer groups (index, notify, replicate) and the stream client's Kafka group.
    pub groups: Vec<String>,
    /// The fault proxies of each link.
    pub links: BTreeMap<Link, Vec<FaultProxy>>,
    /// Metrics addresses: `(scrape-config host, component, address)`; the host is the
    /// repository's scrape config's name for it (`producer`, `indexer`, `notifier`) or `None`
    /// for a consumer that config has no target for.
    pub metrics: Vec<(Option<&'static str>, String, std::net::SocketAddr)>,
    /// Logs of the processes.
    pub logs: PathBuf,
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A loopback address with a free port, for a process's metrics.
fn metrics_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], crate::free_port()))
}

/// `url` with its `127.0.0.1:PORT` replaced by the proxy's.
fn via(url: &str, upstream_port: u16, proxy: &FaultProxy) -> String {
    url.replacen(
        &format!("127.0.0.1:{upstream_port}"),
        &proxy.addr().to_string(),
        1,
    )
}

fn proxy_to(port: u16) -> anyhow::Result<FaultProxy> {
    FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

impl Stack {
    /// Starts the servers, creates the schema and runs each producer's `init`; nothing of
    /// walrelay runs yet. `producer_bin` may be another build (the `--broken` one).
    pub async fn start(
        dir: &Path,
        producer_bin: &Path,
        consumer_bin: &Path,
        modes: &[&str],
        schema: &str,
    ) -> anyhow::Result<Self> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        eprintln!("chaos: starting Postgres (source and target), 3 Kafka nodes, OpenSearch");
        let pg = PgCluster::start_with(&[
            ("wal_sender_timeout", "5s"),
            ("synchronous_commit", "on"),
            ("max_wal_size", "2GB"),
            ("max_slot_wal_keep_size", MAX_SLOT_WAL_KEEP),
        ]);
        let db = pg.create_database("chaos").await;
        let notifier_db = pg.create_database("notifier").await;
        pg.exec(&db, schema).await;
        let target = PgCluster::start();
        let target_db = target.create_database("target").await;
        let kafka = Arc::new(tokio::task::spawn_blocking(|| KafkaCluster::start_proxied(3)).await?);
        let search = tokio::task::spawn_blocking(OpenSearch::start).await?;
        let indexes = Indexes::new(&search.url());
        let search_port = search
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .context("OpenSearch's port")?;
        let (source_proxy, search_proxy, target_proxy) = (
            proxy_to(pg.port())?,
            proxy_to(search_port)?,
            proxy_to(target.port())?,
        );
        let links = BTreeMap::from([
            (
                Link::Kafka,
                kafka.proxies().into_iter().map(|(_, p)| p).collect(),
            ),
            (Link::Source, vec![source_proxy.clone()]),
            (Link::Search, vec![search_proxy.clone()]),
            (Link::Target, vec![target_proxy.clone()]),
        ]);
        let mut metrics = Vec::new();
        let mut producers = Vec::new();
        for mode in modes {
            let slot = crate::unique(&format!("chaos_{}", mode.replace('-', "_")));
            let topic = format!("chaos.{}", slot.replace('_', "."));
            let source = via(&pg.url(&db), pg.port(), &source_proxy);
            let mut common = kafka.producer_args(&source, &topic, &slot);
            common.extend(strings(&[
                "--tables",
                "public.*",
                "--topic-partitions",
                &super::PARTITIONS.to_string(),
                "--partition-key",
                "primary-key",
                "--delivery",
                mode,
            ]));
            let mut init = common.clone();
            init.push("init".into());
            let out = Command::new(producer_bin)
                .args(&init)
                .env("RUST_LOG", "warn")
                .output()
                .with_context(|| format!("run {}", producer_bin.display()))?;
            if !out.status.success() {
                bail!(
                    "walrelay-producer init ({mode}) failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let mut run = common;
            let addr = metrics_addr();
            metrics.push((Some("producer"), format!("producer-{mode}"), addr));
            run.extend(["--metrics-addr".to_string(), addr.to_string()]);
            run.push("run".into());
            producers.push(Producer {
                mode: mode.to_string(),
                slot,
                topic,
                proc: Managed::new(&format!("producer-{mode}"), producer_bin, run, &logs),
            });
        }
        let topic = producers
            .first()
            .map(|p| p.topic.clone())
            .context("no producer")?;
        let notify_api = crate::free_port();
        let stream_port = crate::free_port();
        let prefix = crate::unique("chaos");
        let groups = vec![
            format!("{prefix}.index"),
            format!("{prefix}.notify"),
            format!("{prefix}.replicate"),
            format!("{prefix}.stream.{STREAM_GROUP}"),
        ];
        let kafka_common = |command: &str, group: Option<&str>| {
            let mut a = strings(&[
                command,
                "--kafka-brokers",
                &kafka.brokers(),
                "--topic",
                &topic,
            ]);
            if let Some(g) = group {
                a.extend(strings(&["--group", g]));
            }
            a.extend(strings(&[
                "--kafka-property",
                "session.timeout.ms=6000",
                "--kafka-property",
                "heartbeat.interval.ms=500",
            ]));
            a.extend(kafka.property_args());
            a
        };
        let mut with_metrics = |mut a: Vec<String>, host: Option<&'static str>, c: Consumer| {
            let addr = metrics_addr();
            metrics.push((host, c.name().to_string(), addr));
            a.extend(["--metrics-addr".to_string(), addr.to_string()]);
            a
        };
        let retries = [
            "--retry-initial-backoff",
            "20ms",
            "--retry-max-backoff",
            "1s",
        ];
        let mut consumers = BTreeMap::new();
        let mut index = kafka_common("index", Some(&groups[0]));
        index.extend(strings(&[
            "--search-url",
            &format!("http://{}", search_proxy.addr()),
            "--index-template",
            &indexes.template(),
            "--batch-max-wait",
            "100ms",
        ]));
        index.extend(strings(&retries));
        let index = with_metrics(index, Some("indexer"), Consumer::Index);
        consumers.insert(
            Consumer::Index,
            Managed::new("index", consumer_bin, index, &logs),
        );
        let mut notify = kafka_common("notify", Some(&groups[1]));
        notify.extend(strings(&[
            "--postgres-url",
            &pg.url(&notifier_db),
            "--api-addr",
            &format!("127.0.0.1:{notify_api}"),
            "--api-token",
            TOKEN,
            "--allow-targets",
            "127.0.0.2/32",
            "--delivery-timeout",
            "5s",
            "--max-attempts",
            "30",
            "--retry-initial-backoff",
            "50ms",
            "--retry-max-backoff",
            "2s",
            "--batch-max-wait",
            "100ms",
            // Strict: a parked subscription's events are held, not dead-lettered, so every
            // event must reach the receiver (a dead letter would be a missing event here).
            "--on-delivery-failure",
            "stop",
        ]));
        let notify = with_metrics(notify, Some("notifier"), Consumer::Notify);
        consumers.insert(
            Consumer::Notify,
            Managed::new("notify", consumer_bin, notify, &logs),
        );
        let mut stream = kafka_common("stream", None);
        stream.extend(strings(&[
            "--listen",
            &format!("127.0.0.1:{stream_port}"),
            "--api-token",
            TOKEN,
            "--group-prefix",
            &format!("{prefix}.stream."),
        ]));
        let stream = with_metrics(stream, None, Consumer::Stream);
        consumers.insert(
            Consumer::Stream,
            Managed::new("stream", consumer_bin, stream, &logs),
        );
        let mut replicate = kafka_common("replicate", Some(&groups[2]));
        replicate.extend(strings(&[
            "--target-url",
            &via(&target.url(&target_db), target.port(), &target_proxy),
            "--initial",
            "--batch-max-wait",
            "100ms",
        ]));
        replicate.extend(strings(&retries));
        let replicate = with_metrics(replicate, None, Consumer::Replicate);
        consumers.insert(
            Consumer::Replicate,
            Managed::new("replicate", consumer_bin, replicate, &logs),
        );
        Ok(Self {
            pg,
            db,
            notifier_db,
            target,
            target_db,
            kafka,
            search,
            indexes,
            producers,
            consumers,
            notify_api,
            stream_port,
            groups,
            links,
            metrics,
            logs,
        })
    }

    /// The source database's URL.
    pub fn url(&self) -> String {
        self.pg.url(&self.db)
    }

    /// The target database's URL.
    pub fn target_url(&self) -> String {
        self.target.url(&self.target_db)
    }

    /// `pg_ctl restart -m immediate` of the source (the server's options are kept from its
    /// start, `postmaster.opts`).
    pub fn restart_postgres(&self) -> anyhow::Result<()> {
        self.pg.restart_immediate().map_err(anyhow::Error::msg)
    }

    /// The slot's `confirmed_flush_lsn` as a number.
    pub async fn confirmed(&self, slot: &str) -> Option<u64> {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let row = c
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }

    /// Whether the slot is held by a walsender (its producer streams).
    pub async fn slot_active(&self, slot: &str) -> bool {
        let Ok((c, conn)) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await
        else {
            return false;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        c.query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .ok()
        .and_then(|r| r.get::<_, Option<bool>>(0))
            == Some(true)
    }

    /// Process ids of this run's running Kafka JVMs.
    pub fn kafka_pids(&self) -> Vec<u32> {
        self.kafka.node_pids()
    }

    /// Starts again every producer and consumer that exited (the drain, the phases after the
    /// checks: nothing is left down).
    pub fn restart_exited(&mut self) {
        for p in &mut self.producers {
            if !p.proc.running() {
                p.proc.start();
            }
        }
        for m in self.consumers.values_mut() {
            if !m.running() {
                m.start();
            }
        }
    }

    /// Whether all three brokers are registered and every partition of the topics has three
    /// in-sync replicas (a leader may be killed without losing `min.insync.replicas`).
    pub fn kafka_healthy(&self) -> bool {
        self.producers.iter().all(|p| {
            (0..super::PARTITIONS).all(|part| self.kafka.isr_of(&p.topic, part).len() == 3)
        })
    }
}
