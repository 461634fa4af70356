//! Slot hygiene after the run, in two phases on real servers: a long outage nearing
//! `max_slot_wal_keep_size` must raise `WalrelaySlotNearWalLimit` while there is still time to
//! act, and one that outlives it must be detected and reported with the way out, never resumed
//! over a silent gap.
//!
//! ```text
//!   long_outage: every Kafka proxy blacked out, producers alive ─▶ one captured change (the
//!        slots cannot confirm past it) ─▶ 64 MiB of WAL outside the capture, 16 MiB more
//!        every 15 s ─▶ the compressed NearWalLimit fires for every producer (safe_wal_size
//!        under 1 GiB − 32 MiB)
//!        ─▶ Kafka back ─▶ both slots confirm past the change
//!   invalidate:  producer SIGKILLed (the outage) ─▶ max_slot_wal_keep_size = 64MB, 96 MiB of
//!        WAL, CHECKPOINT ─▶ the slot's wal_status is `lost` ─▶ producer started again ─▶ it
//!        must exit non-zero, naming the cause and the way out (`destroy`, then a new snapshot)
//! ```
//!
//! Both run after every event and state check of the run: the WAL is written into a table
//! outside the captured schema, and the one captured change (a heartbeat update) comes after
//! what was checked. The long outage is recorded as a fault of its own kind
//! ([`FaultKind::KafkaLongOutage`]) for Prometheus' verdict only; `invalidate` runs last
//! (the slot it invalidates is done with).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::faults::{Done, FaultKind, Link};
use super::now_ms;
use super::observability::Watch;
use super::stack::Stack;
use crate::faultproxy::FaultProxy;

/// What the phase saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hygiene {
    /// The slot.
    pub slot: String,
    /// `wal_status` after the WAL was written (Postgres' word for the invalidation: `lost`).
    pub wal_status: Option<String>,
    /// The restarted producer's exit code (`None`: still running after the wait, or killed).
    pub exit: Option<i32>,
    /// The last lines of its log.
    pub said: String,
    /// Detected and explained: the slot lost, the producer stopped non-zero naming
    /// `max_slot_wal_keep_size` and the way out.
    pub pass: bool,
}

impl Hygiene {
    /// The report's section.
    pub fn markdown(&self) -> String {
        format!(
            "## Slot invalidation\n\nAfter the run, producer `{}` was killed, the source's \
             `max_slot_wal_keep_size` lowered to 64MB and 96 MiB of WAL written: `wal_status` = \
             {:?}. The producer started again and exited with {:?} ({}):\n\n```text\n{}\n```\n",
            self.slot,
            self.wal_status,
            self.exit,
            if self.pass {
                "detected, with the way out"
            } else {
                "**not reported as it must be**"
            },
            self.said
        )
    }
}

/// Runs the phase on producer `i` of `stack`.
pub async fn invalidate(stack: &mut Stack, i: usize) -> anyhow::Result<Hygiene> {
    let slot = stack.producers[i].slot.clone();
    stack.producers[i].proc.kill9();
    let c = stack.pg.client(&stack.db).await;
    // One statement per call: ALTER SYSTEM and CHECKPOINT refuse the transaction block that
    // a multi-statement query is.
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '64MB'",
        "SELECT pg_reload_conf()",
        "CREATE SCHEMA IF NOT EXISTS hygiene",
        "CREATE TABLE hygiene.junk AS SELECT g, repeat(md5(g::text), 30) AS pad \
         FROM generate_series(1, 96 * 1024) g",
        "SELECT pg_switch_wal()",
        "CHECKPOINT",
    ] {
        c.batch_execute(sql)
            .await
            .with_context(|| format!("slot invalidation phase: {sql}"))?;
    }
    let mut wal_status = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        c.batch_execute("CHECKPOINT").await.context("checkpoint")?;
        wal_status = c
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0));
        if wal_status.as_deref() == Some("lost") {
            break;
        }
        c.batch_execute(
            "INSERT INTO hygiene.junk SELECT g, repeat(md5(g::text), 30) \
             FROM generate_series(1, 16 * 1024) g",
        )
        .await
        .context("write more WAL")?;
        c.batch_execute("SELECT pg_switch_wal()")
            .await
            .context("switch WAL")?;
    }
    let p = &mut stack.producers[i].proc;
    p.start();
    let exit = match p.exit_within(Duration::from_secs(90)).await {
        Some(code) => code,
        None => {
            p.kill9();
            None
        }
    };
    let said = p.log_tail(6);
    let lost = wal_status.as_deref() == Some("lost");
    let pass = lost
        && exit.is_some_and(|c| c != 0)
        && said.contains("max_slot_wal_keep_size")
        && said.contains("destroy");
    c.batch_execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        .await
        .context("reset max_slot_wal_keep_size")?;
    c.batch_execute("SELECT pg_reload_conf()")
        .await
        .context("reload")?;
    Ok(Hygiene {
        slot,
        wal_status,
        exit,
        said,
        pass,
    })
}

/// The alert the long outage exists for.
pub const NEAR_LIMIT_ALERT: &str = "WalrelaySlotNearWalLimit";

/// WAL the long outage writes at most, MiB: far below [`super::stack::MAX_SLOT_WAL_KEEP`]
/// (1 GiB), so that no slot is lost in this phase.
const OUTAGE_WAL_CAP_MIB: i64 = 384;

/// What the long-outage phase saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LongOutage {
    /// How long Kafka was unreachable, s.
    pub seconds: f64,
    /// WAL written while it was (the server's LSN moved by), bytes.
    pub wal_bytes: i64,
    /// The firing series of the compressed [`NEAR_LIMIT_ALERT`] (their labels; one per
    /// producer once every slot crossed); empty: it did not fire within the wait.
    pub fired: Vec<String>,
    /// `walrelay_producer_slot_safe_wal_bytes` per series when it fired (or the wait ended).
    pub safe_wal: Vec<(String, f64)>,
    /// `walrelay_producer_slot_retained_wal_bytes` at the same moment.
    pub retained_wal: Vec<(String, f64)>,
    /// Seconds from Kafka's return until every slot had confirmed past the captured change
    /// (`None`: not within the wait, a failure of the run).
    pub recovered_seconds: Option<f64>,
}

impl LongOutage {
    /// The report's section.
    pub fn markdown(&self) -> String {
        let list = |v: &[(String, f64)]| {
            v.iter()
                .map(|(l, x)| format!("{l}: {x:.0}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        format!(
            "## Long Kafka outage\n\nAfter the checks, every Kafka proxy was blacked out for \
             {:.0} s with the producers running, one captured change pinned the slots and \
             {:.1} MiB of WAL were written outside the capture. Compressed `{NEAR_LIMIT_ALERT}` \
             {}. `walrelay_producer_slot_safe_wal_bytes`: {}; retained: {}. {}\n",
            self.seconds,
            self.wal_bytes as f64 / 1_048_576.0,
            if self.fired.is_empty() {
                "**did not fire**".to_string()
            } else {
                format!("fired for {}", self.fired.join(" and "))
            },
            list(&self.safe_wal),
            list(&self.retained_wal),
            match self.recovered_seconds {
                Some(s) => format!(
                    "Kafka restored: every slot confirmed past the captured change {s:.0} s later."
                ),
                None => "Kafka restored: **the slots did not confirm past the captured change \
                         within the wait**."
                    .to_string(),
            }
        )
    }
}

async fn current_lsn(c: &tokio_postgres::Client) -> anyhow::Result<i64> {
    let r = c
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8", &[])
        .await
        .context("read the current WAL position")?;
    Ok(r.get(0))
}

/// Runs the long-outage phase; what it saw, and the fault to judge the alerts by (its
/// injection and its restoration).
pub async fn long_outage(stack: &mut Stack, watch: &Watch) -> anyhow::Result<(LongOutage, Done)> {
    let proxies: Vec<FaultProxy> = stack.links.get(&Link::Kafka).cloned().unwrap_or_default();
    if proxies.is_empty() {
        bail!("no fault proxy on the kafka link");
    }
    let c = stack.pg.client(&stack.db).await;
    let at_ms = now_ms();
    let started = Instant::now();
    proxies.iter().for_each(FaultProxy::blackout);
    // Kafka comes back whatever happens inside.
    let held = hold(stack, watch, &c).await;
    proxies.iter().for_each(FaultProxy::restore);
    let restored_ms = now_ms();
    let seconds = started.elapsed().as_secs_f64();
    let held = held?;

    // Recovery: each slot confirms past the pinned change (its transaction's end).
    let back = Instant::now();
    let mut recovered_seconds = None;
    while back.elapsed() < Duration::from_secs(300) {
        stack.restart_exited();
        let mut caught_up = true;
        for p in &stack.producers {
            caught_up &= stack
                .confirmed(&p.slot)
                .await
                .is_some_and(|c| c >= held.pinned);
        }
        if caught_up {
            recovered_seconds = Some(back.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let done = Done {
        kind: FaultKind::KafkaLongOutage,
        at_ms,
        restored_ms,
        detail: format!(
            "every Kafka link blacked out for {seconds:.0} s while {:.0} MiB of WAL were written",
            held.wal_bytes as f64 / 1_048_576.0
        ),
        breaks: Vec::new(),
    };
    Ok((
        LongOutage {
            seconds,
            wal_bytes: held.wal_bytes,
            fired: held.fired,
            safe_wal: held.safe_wal,
            retained_wal: held.retained_wal,
            recovered_seconds,
        },
        done,
    ))
}

/// What [`hold`] saw inside the outage.
struct Held {
    /// WAL written, bytes.
    wal_bytes: i64,
    /// The server's position just after the captured change committed.
    pinned: u64,
    /// The alert's firing series.
    fired: Vec<String>,
    /// Safe and retained WAL per series at the end.
    safe_wal: Vec<(String, f64)>,
    retained_wal: Vec<(String, f64)>,
}

/// Inside the outage: pin the slots, write WAL until the alert fires for every producer (or
/// the cap, or 150 s).
async fn hold(
    stack: &mut Stack,
    watch: &Watch,
    c: &tokio_postgres::Client,
) -> anyhow::Result<Held> {
    let start = current_lsn(c).await?;
    // One captured change: with nothing in flight a producer confirms the server's position
    // as it goes by, so without it the slots would follow the WAL written below.
    c.batch_execute("UPDATE heartbeat SET version = version + 1 WHERE id = 1")
        .await
        .context("long outage: the captured change")?;
    let pinned = current_lsn(c).await? as u64;
    c.batch_execute("CREATE SCHEMA IF NOT EXISTS hygiene")
        .await
        .context("long outage: schema")?;
    c.batch_execute(
        "CREATE TABLE hygiene.outage AS SELECT g, repeat(md5(g::text), 30) AS pad \
         FROM generate_series(1, 64 * 1024) g",
    )
    .await
    .context("long outage: write WAL")?;
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut last_write = Instant::now();
    let mut fired = Vec::new();
    while Instant::now() < deadline {
        // A producer that exits in the outage is started again: its gauges are the alert's.
        stack.restart_exited();
        // Every producer's slot, not just the first to cross.
        fired = watch.copy_firing(NEAR_LIMIT_ALERT).await?;
        if fired.len() >= stack.producers.len() {
            break;
        }
        let written = current_lsn(c).await? - start;
        if last_write.elapsed() > Duration::from_secs(15) && written < OUTAGE_WAL_CAP_MIB << 20 {
            c.batch_execute(
                "INSERT INTO hygiene.outage SELECT g, repeat(md5(g::text), 30) \
                 FROM generate_series(1, 16 * 1024) g",
            )
            .await
            .context("long outage: write more WAL")?;
            last_write = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Held {
        wal_bytes: current_lsn(c).await? - start,
        pinned,
        fired,
        safe_wal: watch
            .values("walrelay_producer_slot_safe_wal_bytes")
            .await
            .unwrap_or_default(),
        retained_wal: watch
            .values("walrelay_producer_slot_retained_wal_bytes")
            .await
            .unwrap_or_default(),
    })
}
