//! The write workload and the truth it leaves.
//!
//! Every transaction starts with `INSERT INTO chaos_tx … RETURNING id` and learns from each
//! statement's `RETURNING` the exact row versions it wrote; its events are planned under its
//! ledger id before `COMMIT` is sent. Whether it committed is read from Postgres after the run
//! (`chaos_tx`), so a transaction whose `COMMIT` answer was lost in an immediate restart is
//! judged by what the server kept, not by what the client heard.
//!
//! Workers own disjoint key ranges of `items` (keys are never reused, so a key's versions only
//! grow), share `accounts` (updates only, accounts locked in ascending order: no deadlocks) and
//! `scratch` (inserts; worker 0 also truncates it and adds or drops a column now and then).
//! A heartbeat task updates one row a few times a second; one big transaction inserts into
//! `bulk`.
//!
//! Longer than the ~500 lines asked of non-test files: the writers and the truth they record
//! are one piece (every statement's `RETURNING` becomes a planned event), kept together so
//! that what the checker expects is read in one place.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::{Client, NoTls};

use super::{Ev, Op, PARTITIONS, Table, now_ms};

/// The schema, created before the producers' `init`.
pub const SCHEMA: &str = "
    CREATE TABLE chaos_tx (id bigserial PRIMARY KEY, version int NOT NULL DEFAULT 1,
        worker int NOT NULL, kind text NOT NULL, at_ms bigint NOT NULL);
    CREATE TABLE items (id bigint PRIMARY KEY, version int NOT NULL, tx bigint NOT NULL,
        grp int NOT NULL, payload text);
    CREATE TABLE accounts (id int PRIMARY KEY, version int NOT NULL, tx bigint NOT NULL,
        balance bigint NOT NULL, doc text NOT NULL);
    CREATE TABLE scratch (id bigint PRIMARY KEY, version int NOT NULL, tx bigint NOT NULL, v int);
    CREATE TABLE bulk (id bigint PRIMARY KEY, version int NOT NULL, tx bigint NOT NULL, v int);
    CREATE TABLE heartbeat (id int PRIMARY KEY, version int NOT NULL, tx bigint NOT NULL,
        beat bigint NOT NULL);
    ALTER TABLE chaos_tx REPLICA IDENTITY FULL;
    ALTER TABLE items REPLICA IDENTITY FULL;
    ALTER TABLE scratch REPLICA IDENTITY FULL;
    ALTER TABLE bulk REPLICA IDENTITY FULL;
    ALTER TABLE heartbeat REPLICA IDENTITY FULL;
    CREATE TABLE seed (id bigint PRIMARY KEY, note text NOT NULL);
    INSERT INTO seed SELECT g, 'snapshot row ' || g FROM generate_series(1, 5000) g;";

/// A table filled before the producers start and never written again: the producers'
/// snapshots have rows to read while Prometheus watches (the dashboards' snapshot panels). The
/// checker passes over its events; it is no part of the truth.
pub const SEED_TABLE: &str = "seed";

/// Accounts created by the setup transaction.
pub const ACCOUNTS: i32 = 40;

/// What one transaction planned.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `tx`, `setup`, `truncate`, `ddl`, `heartbeat`, `big`.
    pub kind: &'static str,
    /// Its events, the ledger row's insert first.
    pub events: Vec<Ev>,
    /// A heartbeat's beat (ms since the epoch, written into the row).
    pub beat: Option<i64>,
}

/// Counters of the workload's outcomes as the clients saw them.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadStats {
    /// `COMMIT` answered OK.
    pub committed: u64,
    /// Failed before `COMMIT` (rolled back).
    pub failed: u64,
    /// `COMMIT` sent, no answer: decided by the ledger.
    pub unknown: u64,
    /// Of those, found in the ledger after reconnecting.
    pub unknown_committed: u64,
    /// Connections opened again after a failure.
    pub reconnects: u64,
    /// Rows of the big transaction (0 when it never committed).
    pub big_rows: u64,
}

/// Everything the workload planned, by ledger id.
#[derive(Default)]
pub struct Truth {
    plans: Mutex<BTreeMap<i64, Plan>>,
    stats: Mutex<LoadStats>,
    /// Ledger ids whose `COMMIT` was answered OK: Postgres must keep every one of them.
    acknowledged: Mutex<BTreeSet<i64>>,
}

impl Truth {
    fn plan(&self, tx: i64, plan: Plan) {
        walrelay_common::sync::lock(&self.plans).insert(tx, plan);
    }

    fn stat(&self, f: impl FnOnce(&mut LoadStats)) {
        f(&mut walrelay_common::sync::lock(&self.stats));
    }

    /// The outcome counters so far.
    pub fn stats(&self) -> LoadStats {
        walrelay_common::sync::lock(&self.stats).clone()
    }

    /// Every plan.
    pub fn plans(&self) -> BTreeMap<i64, Plan> {
        walrelay_common::sync::lock(&self.plans).clone()
    }

    /// How many events transaction `tx` planned (for partial-transaction samples).
    pub fn planned_events(&self, tx: i64) -> Option<usize> {
        walrelay_common::sync::lock(&self.plans)
            .get(&tx)
            .map(|p| p.events.len())
    }

    /// Ledger ids whose `COMMIT` the client saw succeed.
    pub fn acknowledged(&self) -> BTreeSet<i64> {
        walrelay_common::sync::lock(&self.acknowledged).clone()
    }
}

/// Stops the workload's tasks.
#[derive(Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    /// Asks every task to finish its transaction and return.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Opens a connection, retrying (Postgres may be restarting) until `stop`.
async fn connect(url: &str, stop: &Stop, truth: &Truth) -> Option<Client> {
    let mut first = true;
    loop {
        if stop.stopped() && !first {
            return None;
        }
        match tokio_postgres::connect(url, NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                if !first {
                    truth.stat(|s| s.reconnects += 1);
                }
                return Some(client);
            }
            Err(_) => {
                first = false;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Random text of `n` hexadecimal characters (does not compress: stored out of line).
fn payload(rng: &mut StdRng, n: usize) -> String {
    const HEX: &[u8] = b"0123456789abcdef";
    (0..n).map(|_| HEX[rng.gen_range(0..16)] as char).collect()
}

/// How a transaction ended, as far as the client knows.
enum Outcome {
    Committed,
    /// Failed before `COMMIT`: not committed.
    Failed,
    /// `COMMIT` without an answer.
    Unknown,
}

/// Runs `body` between `BEGIN` and `COMMIT` after the ledger insert, planning its events.
/// `body` returns the transaction's events (after the ledger's).
async fn transaction<F>(
    client: &Client,
    truth: &Truth,
    worker: i32,
    kind: &'static str,
    beat: Option<i64>,
    body: F,
) -> (Outcome, Option<i64>)
where
    F: AsyncFnOnce(&Client, i64) -> Result<Vec<Ev>, tokio_postgres::Error>,
{
    let run = async {
        client.batch_execute("BEGIN").await?;
        let row = client
            .query_one(
                "INSERT INTO chaos_tx (worker, kind, at_ms) VALUES ($1, $2, $3) RETURNING id",
                &[&worker, &kind, &now_ms()],
            )
            .await?;
        let tx: i64 = row.get(0);
        let mut events = vec![Ev {
            table: Table::ChaosTx,
            key: tx,
            op: Op::Create,
            version: 1,
        }];
        events.extend(body(client, tx).await?);
        Ok::<_, tokio_postgres::Error>((tx, events))
    };
    let Ok((tx, events)) = run.await else {
        let _ = client.batch_execute("ROLLBACK").await;
        truth.stat(|s| s.failed += 1);
        return (Outcome::Failed, None);
    };
    truth.plan(tx, Plan { kind, events, beat });
    match client.batch_execute("COMMIT").await {
        Ok(()) => {
            truth.stat(|s| s.committed += 1);
            walrelay_common::sync::lock(&truth.acknowledged).insert(tx);
            (Outcome::Committed, Some(tx))
        }
        Err(_) => {
            truth.stat(|s| s.unknown += 1);
            (Outcome::Unknown, Some(tx))
        }
    }
}

/// Whether ledger id `tx` is in Postgres (after a `COMMIT` without an answer), asked on a new
/// connection; `None` when the workload was stopped before it could ask.
async fn in_ledger(url: &str, stop: &Stop, truth: &Truth, tx: i64) -> (Option<Client>, bool) {
    loop {
        let Some(c) = connect(url, stop, truth).await else {
            return (None, false);
        };
        match c
            .query_one("SELECT count(*) FROM chaos_tx WHERE id = $1", &[&tx])
            .await
        {
            Ok(row) => {
                let found = row.get::<_, i64>(0) == 1;
                if found {
                    truth.stat(|s| s.unknown_committed += 1);
                }
                return (Some(c), found);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The setup transaction: the accounts (each with a large document never updated) and the
/// heartbeat row. Retried until it commits.
pub async fn setup(url: &str, truth: &Truth, seed: u64) -> anyhow::Result<()> {
    let stop = Stop::default();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5e7);
    let docs: Vec<String> = (0..ACCOUNTS).map(|_| payload(&mut rng, 3000)).collect();
    for _ in 0..20 {
        let client = connect(url, &stop, truth)
            .await
            .ok_or_else(|| anyhow::anyhow!("no connection for the setup"))?;
        let docs = docs.clone();
        let (outcome, tx) = transaction(&client, truth, -1, "setup", None, async |c, tx| {
            let mut events = Vec::new();
            for (i, doc) in docs.iter().enumerate() {
                let id = i as i32 + 1;
                c.execute(
                    "INSERT INTO accounts VALUES ($1, 1, $2, 0, $3)",
                    &[&id, &tx, doc],
                )
                .await?;
                events.push(Ev {
                    table: Table::Accounts,
                    key: id.into(),
                    op: Op::Create,
                    version: 1,
                });
            }
            c.execute(
                "INSERT INTO heartbeat VALUES (1, 1, $1, $2)",
                &[&tx, &now_ms()],
            )
            .await?;
            events.push(Ev {
                table: Table::Heartbeat,
                key: 1,
                op: Op::Create,
                version: 1,
            });
            Ok(events)
        })
        .await;
        let committed = match (outcome, tx) {
            (Outcome::Committed, _) => true,
            (Outcome::Unknown, Some(tx)) => in_ledger(url, &stop, truth, tx).await.1,
            _ => false,
        };
        if committed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("the setup transaction never committed")
}

/// How fast the workload writes.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Writer tasks.
    pub workers: u32,
    /// Pause between a worker's transactions, ms (uniform in this range).
    pub pause_ms: (u64, u64),
    /// Rows of the big transaction.
    pub big_rows: i64,
    /// Heartbeat period, ms.
    pub heartbeat_ms: u64,
}

/// The workload's tasks; [`Workload::finish`] stops and awaits them.
pub struct Workload {
    stop: Stop,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Transactions done so far (every outcome).
    pub done: Arc<AtomicU64>,
}

impl Workload {
    /// Starts the workers and the heartbeat; the big transaction starts after `big_after`.
    pub fn start(
        url: String,
        truth: Arc<Truth>,
        seed: u64,
        pace: Pace,
        big_after: Duration,
    ) -> Self {
        let stop = Stop::default();
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for w in 0..pace.workers {
            let worker = Worker {
                id: w as i32,
                rng: StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(u64::from(w))),
                next_key: i64::from(w + 1) * 1_000_000_000_000,
                live: Vec::new(),
                extra_cols: Vec::new(),
                next_col: 0,
                next_scratch: i64::from(w + 1) * 1_000_000_000_000,
            };
            tasks.push(tokio::spawn(worker.run(
                url.clone(),
                Arc::clone(&truth),
                stop.clone(),
                pace,
                Arc::clone(&done),
            )));
        }
        tasks.push(tokio::spawn(heartbeat(
            url.clone(),
            Arc::clone(&truth),
            stop.clone(),
            pace.heartbeat_ms,
        )));
        tasks.push(tokio::spawn(big(
            url,
            truth,
            stop.clone(),
            pace.big_rows,
            big_after,
        )));
        Self { stop, tasks, done }
    }

    /// Stops every task after its current transaction and waits for them.
    pub async fn finish(self) {
        self.stop.stop();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Worker {
    id: i32,
    rng: StdRng,
    next_key: i64,
    /// Live keys of `items` this worker owns, as far as committed transactions say.
    live: Vec<i64>,
    /// Columns worker 0 added to `scratch` and not dropped yet.
    extra_cols: Vec<String>,
    next_col: u32,
    next_scratch: i64,
}

/// One statement of a regular transaction.
#[derive(Debug, Clone)]
enum Step {
    Insert { key: i64, grp: i32, big: bool },
    Update { key: i64, big: bool },
    Rekey { from: i64, to: i64 },
    Delete { key: i64 },
    Account { ids: Vec<i32> },
    Scratch { key: i64 },
}

impl Worker {
    async fn run(
        mut self,
        url: String,
        truth: Arc<Truth>,
        stop: Stop,
        pace: Pace,
        done: Arc<AtomicU64>,
    ) {
        let Some(mut client) = connect(&url, &stop, &truth).await else {
            return;
        };
        while !stop.stopped() {
            let special = if self.id == 0 {
                match self.rng.gen_range(0..1000) {
                    0..=2 => Some("truncate"),
                    3..=4 => Some("ddl"),
                    _ => None,
                }
            } else {
                None
            };
            let (outcome, tx, steps) = match special {
                Some("truncate") => {
                    let (o, tx) =
                        transaction(&client, &truth, self.id, "truncate", None, async |c, tx| {
                            c.batch_execute("TRUNCATE scratch").await?;
                            Ok((0..PARTITIONS)
                                .map(|p| Ev {
                                    table: Table::Scratch,
                                    key: p.into(),
                                    op: Op::Truncate,
                                    version: tx,
                                })
                                .collect())
                        })
                        .await;
                    (o, tx, Vec::new())
                }
                Some(_) => {
                    let sql = if self.extra_cols.len() < 2 {
                        self.next_col += 1;
                        let col = format!("extra_{}", self.next_col);
                        let sql = format!("ALTER TABLE scratch ADD COLUMN IF NOT EXISTS {col} int");
                        self.extra_cols.push(col);
                        sql
                    } else {
                        let col = self.extra_cols.remove(0);
                        format!("ALTER TABLE scratch DROP COLUMN IF EXISTS {col}")
                    };
                    let (o, tx) =
                        transaction(&client, &truth, self.id, "ddl", None, async |c, _| {
                            c.batch_execute(&sql).await?;
                            Ok(Vec::new())
                        })
                        .await;
                    (o, tx, Vec::new())
                }
                None => {
                    let steps = self.plan_steps();
                    let run_steps = steps.clone();
                    let (o, tx) =
                        transaction(&client, &truth, self.id, "tx", None, async |c, tx| {
                            apply_steps(c, tx, &run_steps).await
                        })
                        .await;
                    (o, tx, steps)
                }
            };
            done.fetch_add(1, Ordering::Relaxed);
            let committed = match (outcome, tx) {
                (Outcome::Committed, _) => true,
                (Outcome::Failed, _) | (Outcome::Unknown, None) => {
                    if client.is_closed() {
                        let Some(c) = connect(&url, &stop, &truth).await else {
                            return;
                        };
                        client = c;
                    }
                    false
                }
                (Outcome::Unknown, Some(tx)) => {
                    let (c, found) = in_ledger(&url, &stop, &truth, tx).await;
                    let Some(c) = c else { return };
                    client = c;
                    found
                }
            };
            if committed {
                self.commit_model(&steps);
            }
            let (lo, hi) = pace.pause_ms;
            tokio::time::sleep(Duration::from_millis(self.rng.gen_range(lo..=hi))).await;
        }
    }

    fn plan_steps(&mut self) -> Vec<Step> {
        let mut live = self.live.clone();
        let mut steps = Vec::new();
        for _ in 0..self.rng.gen_range(1..=5) {
            let roll = self.rng.gen_range(0..100);
            let step = if live.is_empty() || roll < 30 {
                self.next_key += 1;
                live.push(self.next_key);
                Step::Insert {
                    key: self.next_key,
                    grp: self.rng.gen_range(0..10),
                    big: self.rng.gen_bool(0.15),
                }
            } else if roll < 60 {
                let key = live[self.rng.gen_range(0..live.len())];
                Step::Update {
                    key,
                    big: self.rng.gen_bool(0.1),
                }
            } else if roll < 70 {
                let i = self.rng.gen_range(0..live.len());
                self.next_key += 1;
                let from = live[i];
                live[i] = self.next_key;
                Step::Rekey {
                    from,
                    to: self.next_key,
                }
            } else if roll < 80 {
                let i = self.rng.gen_range(0..live.len());
                Step::Delete {
                    key: live.swap_remove(i),
                }
            } else if roll < 93 {
                let mut ids: Vec<i32> = (0..self.rng.gen_range(1..=3))
                    .map(|_| self.rng.gen_range(1..=ACCOUNTS))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                Step::Account { ids }
            } else {
                self.next_scratch += 1;
                Step::Scratch {
                    key: self.next_scratch,
                }
            };
            steps.push(step);
        }
        // Accounts are locked in ascending order across the whole transaction.
        let mut accounts: Vec<i32> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Account { ids } => Some(ids.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        accounts.sort_unstable();
        accounts.dedup();
        steps.retain(|s| !matches!(s, Step::Account { .. }));
        if !accounts.is_empty() {
            steps.push(Step::Account { ids: accounts });
        }
        // Large payloads are written with the transaction's own generator.
        steps
    }

    fn commit_model(&mut self, steps: &[Step]) {
        for s in steps {
            match s {
                Step::Insert { key, .. } => self.live.push(*key),
                Step::Rekey { from, to } => {
                    if let Some(k) = self.live.iter_mut().find(|k| **k == *from) {
                        *k = *to;
                    }
                }
                Step::Delete { key } => self.live.retain(|k| k != key),
                Step::Update { .. } | Step::Account { .. } | Step::Scratch { .. } => {}
            }
        }
    }
}

/// Runs a regular transaction's steps; the events `RETURNING` reported.
async fn apply_steps(
    c: &Client,
    tx: i64,
    steps: &[Step],
) -> Result<Vec<Ev>, tokio_postgres::Error> {
    let mut rng = StdRng::seed_from_u64(tx as u64);
    let mut events = Vec::new();
    for s in steps {
        match s {
            Step::Insert { key, grp, big } => {
                let text = if *big {
                    payload(&mut rng, 4000)
                } else {
                    payload(&mut rng, 24)
                };
                let n = c
                    .execute(
                        "INSERT INTO items VALUES ($1, 1, $2, $3, $4)",
                        &[key, &tx, grp, &text],
                    )
                    .await?;
                if n == 1 {
                    events.push(Ev {
                        table: Table::Items,
                        key: *key,
                        op: Op::Create,
                        version: 1,
                    });
                }
            }
            Step::Update { key, big } => {
                let rows = if *big {
                    let text = payload(&mut rng, 4000);
                    c.query(
                        "UPDATE items SET version = version + 1, tx = $2, payload = $3 WHERE id = $1 RETURNING version",
                        &[key, &tx, &text],
                    )
                    .await?
                } else {
                    c.query(
                        "UPDATE items SET version = version + 1, tx = $2, grp = grp + 1 WHERE id = $1 RETURNING version",
                        &[key, &tx],
                    )
                    .await?
                };
                for r in rows {
                    events.push(Ev {
                        table: Table::Items,
                        key: *key,
                        op: Op::Update,
                        version: r.get::<_, i32>(0).into(),
                    });
                }
            }
            Step::Rekey { from, to } => {
                let rows = c
                    .query(
                        "UPDATE items SET id = $2, version = version + 1, tx = $3 WHERE id = $1 RETURNING version",
                        &[from, to, &tx],
                    )
                    .await?;
                for r in rows {
                    let v: i64 = r.get::<_, i32>(0).into();
                    events.push(Ev {
                        table: Table::Items,
                        key: *from,
                        op: Op::Delete,
                        version: v - 1,
                    });
                    events.push(Ev {
                        table: Table::Items,
                        key: *to,
                        op: Op::Update,
                        version: v,
                    });
                }
            }
            Step::Delete { key } => {
                let rows = c
                    .query("DELETE FROM items WHERE id = $1 RETURNING version", &[key])
                    .await?;
                for r in rows {
                    events.push(Ev {
                        table: Table::Items,
                        key: *key,
                        op: Op::Delete,
                        version: r.get::<_, i32>(0).into(),
                    });
                }
            }
            Step::Account { ids } => {
                for id in ids {
                    let rows = c
                        .query(
                            "UPDATE accounts SET version = version + 1, tx = $2, balance = balance + 1 WHERE id = $1 RETURNING version",
                            &[id, &tx],
                        )
                        .await?;
                    for r in rows {
                        events.push(Ev {
                            table: Table::Accounts,
                            key: (*id).into(),
                            op: Op::Update,
                            version: r.get::<_, i32>(0).into(),
                        });
                    }
                }
            }
            Step::Scratch { key } => {
                c.execute(
                    "INSERT INTO scratch (id, version, tx, v) VALUES ($1, 1, $2, $3)",
                    &[key, &tx, &((tx % 1000) as i32)],
                )
                .await?;
                events.push(Ev {
                    table: Table::Scratch,
                    key: *key,
                    op: Op::Create,
                    version: 1,
                });
            }
        }
    }
    Ok(events)
}

/// Updates the heartbeat row every `period_ms`, writing the time into it.
async fn heartbeat(url: String, truth: Arc<Truth>, stop: Stop, period_ms: u64) {
    let Some(mut client) = connect(&url, &stop, &truth).await else {
        return;
    };
    while !stop.stopped() {
        let beat = now_ms();
        let (outcome, tx) = transaction(&client, &truth, -2, "heartbeat", Some(beat), async |c, tx| {
            let rows = c
                .query(
                    "UPDATE heartbeat SET version = version + 1, tx = $1, beat = $2 WHERE id = 1 RETURNING version",
                    &[&tx, &beat],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ev {
                    table: Table::Heartbeat,
                    key: 1,
                    op: Op::Update,
                    version: r.get::<_, i32>(0).into(),
                })
                .collect())
        })
        .await;
        match (outcome, tx) {
            (Outcome::Committed, _) => {}
            (Outcome::Unknown, Some(tx)) => {
                let (c, _) = in_ledger(&url, &stop, &truth, tx).await;
                let Some(c) = c else { return };
                client = c;
            }
            _ => {
                if client.is_closed() {
                    let Some(c) = connect(&url, &stop, &truth).await else {
                        return;
                    };
                    client = c;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(period_ms)).await;
    }
}

/// One transaction of `rows` inserts into `bulk`, tried until it commits (each attempt on keys
/// of its own).
async fn big(url: String, truth: Arc<Truth>, stop: Stop, rows: i64, after: Duration) {
    let deadline = tokio::time::Instant::now() + after;
    while tokio::time::Instant::now() < deadline {
        if stop.stopped() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut attempt: i64 = 0;
    while !stop.stopped() {
        let Some(client) = connect(&url, &stop, &truth).await else {
            return;
        };
        let lo = attempt * 10_000_000 + 1;
        let hi = lo + rows - 1;
        let (outcome, tx) = transaction(&client, &truth, -3, "big", None, async |c, tx| {
            let n = c
                .execute(
                    "INSERT INTO bulk SELECT g, 1, $1, (g % 1000)::int FROM generate_series($2::bigint, $3::bigint) g",
                    &[&tx, &lo, &hi],
                )
                .await?;
            Ok((lo..lo + n as i64)
                .map(|key| Ev {
                    table: Table::Bulk,
                    key,
                    op: Op::Create,
                    version: 1,
                })
                .collect())
        })
        .await;
        let committed = match (outcome, tx) {
            (Outcome::Committed, _) => true,
            (Outcome::Unknown, Some(tx)) => in_ledger(&url, &stop, &truth, tx).await.1,
            _ => false,
        };
        if committed {
            truth.stat(|s| s.big_rows = rows as u64);
            return;
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
