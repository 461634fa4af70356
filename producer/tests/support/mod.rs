//! A Postgres cluster, the binary's shared Kafka broker (or a broker of the test's own) and the
//! producer binary, for one test.

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use walrelay_tests::kafka::KafkaCluster;
use walrelay_tests::postgres::PgCluster;
use walrelay_tests::process::Proc;
use walrelay_tests::topic::{self, Record};

pub fn producer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walrelay-producer"))
}

pub struct Env {
    pub pg: PgCluster,
    pub broker: Arc<KafkaCluster>,
    pub db: String,
    pub topic: String,
    pub slot: String,
    pub logs: tempfile::TempDir,
    /// The role the producer connects as.
    pub user: String,
    spawned: u32,
}

impl Env {
    /// A cluster with a fresh database, a broker, and unique topic and slot names.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(settings: &[(&str, &str)]) -> Self {
        Self::start_on(settings, KafkaCluster::shared()).await
    }

    /// A cluster with a fresh database on `broker`: the shared one, or one a test stops or
    /// kills nodes of.
    pub async fn start_on(settings: &[(&str, &str)], broker: Arc<KafkaCluster>) -> Self {
        let pg = PgCluster::start_with(settings);
        let db = pg.create_database("wr").await;
        Self {
            pg,
            broker,
            db,
            topic: walrelay_tests::unique("events").replace('_', "."),
            slot: walrelay_tests::unique("slot"),
            logs: tempfile::tempdir().expect("log dir"),
            user: "postgres".into(),
            spawned: 0,
        }
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.user,
            self.pg.port(),
            self.db
        )
    }

    /// Options every command gets.
    pub fn common_args(&self) -> Vec<String> {
        [
            "--postgres-url",
            &self.url(),
            "--kafka-brokers",
            &self.broker.brokers(),
            "--topic",
            &self.topic,
            "--slot",
            &self.slot,
            "--publication",
            &self.slot,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Runs a command to completion.
    pub fn cmd(&self, command: &[&str]) -> Output {
        let mut args = self.common_args();
        args.extend(command.iter().map(|s| s.to_string()));
        std::process::Command::new(producer_bin())
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run walrelay-producer")
    }

    /// `init`, which must succeed.
    pub fn init(&self) {
        let out = self.cmd(&["init"]);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts `run` with extra options.
    pub fn spawn(&mut self, extra: &[&str]) -> Proc {
        let brokers = self.broker.brokers();
        self.spawn_on_brokers(&brokers, extra)
    }

    /// Starts `run` with extra options, given `brokers` instead of the test's broker.
    pub fn spawn_on_brokers(&mut self, brokers: &str, extra: &[&str]) -> Proc {
        self.spawned += 1;
        let mut args = self.common_args();
        if let Some(at) = args.iter().position(|a| a == "--kafka-brokers") {
            args[at + 1] = brokers.to_string();
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("run".into());
        let log = self
            .logs
            .path()
            .join(format!("producer-{}.log", self.spawned));
        Proc::spawn(&producer_bin(), &args, &[], &log)
    }

    /// Reads the topic until `done` holds.
    pub fn read_until(&self, timeout: Duration, done: impl Fn(&[Record]) -> bool) -> Vec<Record> {
        match topic::try_read_until(&self.broker.brokers(), &self.topic, timeout, done) {
            Ok(r) => r,
            Err(r) => {
                let last: Vec<String> = r
                    .iter()
                    .rev()
                    .take(5)
                    .map(|x| {
                        String::from_utf8_lossy(&x.value)
                            .chars()
                            .take(300)
                            .collect()
                    })
                    .collect();
                panic!(
                    "timed out reading {}: {} records so far; last: {last:#?}\n{}",
                    self.topic,
                    r.len(),
                    self.all_logs()
                )
            }
        }
    }

    /// Every log written so far, for failure messages.
    pub fn all_logs(&self) -> String {
        walrelay_tests::process::logs_tail(self.logs.path(), 40)
    }

    /// Waits up to `timeout` for `p` to exit; its exit code.
    pub async fn exit_code(&self, p: &mut Proc, timeout: Duration) -> Option<i32> {
        p.exit_within(timeout)
            .await
            .unwrap_or_else(|| panic!("the producer did not exit\n{}", self.all_logs()))
    }

    /// How many of walrelay's DDL event triggers exist.
    pub async fn event_triggers(&self) -> i64 {
        self.pg
            .client(&self.db)
            .await
            .query_one(
                "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'walrelay%'",
                &[],
            )
            .await
            .expect("pg_event_trigger")
            .get(0)
    }

    /// Whether the test's slot exists.
    pub async fn slot_exists(&self) -> bool {
        self.pg
            .client(&self.db)
            .await
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&self.slot],
            )
            .await
            .expect("pg_replication_slots")
            .get(0)
    }

    /// WAL the test's slot retains, as Postgres says.
    pub async fn retained_wal(&self) -> i64 {
        self.pg
            .client(&self.db)
            .await
            .query_one(
                "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("pg_replication_slots")
            .get(0)
    }

    /// Polls `sql` (one boolean, `$1` = the slot, then `extra`) until it is true.
    async fn wait_until(&self, what: &str, sql: &str, extra: Option<&str>, timeout: Duration) {
        let c = self.pg.client(&self.db).await;
        let deadline = Instant::now() + timeout;
        loop {
            let row = match extra {
                Some(x) => c.query_one(sql, &[&self.slot, &x]).await,
                None => c.query_one(sql, &[&self.slot]).await,
            };
            if row.ok().and_then(|r| r.get::<_, Option<bool>>(0)) == Some(true) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}\n{}", self.all_logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the producer streams: its snapshot is done and the slot is active.
    pub async fn wait_streaming(&self, timeout: Duration) {
        self.wait_until(
            "producer never streamed",
            "SELECT s.snapshot_status = 'done' AND r.active FROM walrelay.slot_state s \
             JOIN pg_replication_slots r ON r.slot_name = s.slot_name WHERE s.slot_name = $1",
            None,
            timeout,
        )
        .await;
    }

    /// The WAL insert position now. (The insert position, not the write position: the test
    /// cluster commits asynchronously, so the write position can lag a commit that returned.)
    pub async fn insert_lsn(&self) -> String {
        self.pg
            .client(&self.db)
            .await
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .expect("lsn")
            .get(0)
    }

    /// Whether the slot's confirmed position is at or past `lsn`.
    pub async fn confirmed_past(&self, lsn: &str) -> bool {
        self.pg
            .client(&self.db)
            .await
            .query_one(CONFIRMED_PAST, &[&self.slot, &lsn])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<bool>>(0))
            == Some(true)
    }

    /// Waits until the slot's confirmed position reaches the WAL insert position taken now.
    pub async fn wait_confirmed_current(&self, timeout: Duration) {
        let target = self.insert_lsn().await;
        self.wait_until(
            &format!("slot never confirmed {target}"),
            CONFIRMED_PAST,
            Some(&target),
            timeout,
        )
        .await;
    }
}

const CONFIRMED_PAST: &str =
    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1";
