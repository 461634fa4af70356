//! The servers and walrelay processes of a chaos run, each restartable.
//!
//! Servers: the source Postgres 15 (`wal_sender_timeout=5s`, `synchronous_commit=on` so an
//! answered `COMMIT` survives an immediate restart), a target Postgres for `replicate`, three
//! Kafka KRaft nodes (replication factor 3, `min.insync.replicas=2`), one OpenSearch node.
//! Processes: one producer per delivery mode (its own slot, publication and topic) and the four
//! consumers of the first producer's topic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::faults::Consumer;
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
    /// Logs of the processes.
    pub logs: PathBuf,
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
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
        ]);
        let db = pg.create_database("chaos").await;
        let notifier_db = pg.create_database("notifier").await;
        pg.exec(&db, schema).await;
        let target = PgCluster::start();
        let target_db = target.create_database("target").await;
        let kafka = Arc::new(tokio::task::spawn_blocking(|| KafkaCluster::start(3)).await?);
        let search = tokio::task::spawn_blocking(OpenSearch::start).await?;
        let indexes = Indexes::new(&search.url());
        let mut producers = Vec::new();
        for mode in modes {
            let slot = crate::unique(&format!("chaos_{}", mode.replace('-', "_")));
            let topic = format!("chaos.{}", slot.replace('_', "."));
            let mut common = kafka.producer_args(&pg.url(&db), &topic, &slot);
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
            &search.url(),
            "--index-template",
            &indexes.template(),
            "--batch-max-wait",
            "100ms",
        ]));
        index.extend(strings(&retries));
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
        consumers.insert(
            Consumer::Stream,
            Managed::new("stream", consumer_bin, stream, &logs),
        );
        let mut replicate = kafka_common("replicate", Some(&groups[2]));
        replicate.extend(strings(&[
            "--target-url",
            &target.url(&target_db),
            "--initial",
            "--batch-max-wait",
            "100ms",
        ]));
        replicate.extend(strings(&retries));
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

    /// Process ids of this run's Kafka JVMs: processes running `kafka.Kafka` whose
    /// `server.properties` listens on one of this cluster's ports.
    pub fn kafka_pids(&self) -> Vec<u32> {
        let ports: Vec<String> = self
            .kafka
            .brokers()
            .split(',')
            .map(|b| format!("PLAINTEXT://{b}"))
            .collect();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args.iter().any(|a| a == "kafka.Kafka") {
                continue;
            }
            let Some(props) = args.last() else { continue };
            let text = std::fs::read_to_string(props).unwrap_or_default();
            if text.lines().any(|l| {
                l.starts_with("listeners=") && ports.iter().any(|p| l.contains(p.as_str()))
            }) {
                out.push(pid);
            }
        }
        out
    }

    /// Whether all three brokers are registered and every partition of the topics has three
    /// in-sync replicas (a leader may be killed without losing `min.insync.replicas`).
    pub fn kafka_healthy(&self) -> bool {
        self.producers.iter().all(|p| {
            (0..super::PARTITIONS).all(|part| self.kafka.isr_of(&p.topic, part).len() == 3)
        })
    }
}
