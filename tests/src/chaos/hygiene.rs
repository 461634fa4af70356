//! Slot hygiene after the run: a long outage that outlives `max_slot_wal_keep_size` must be
//! detected and reported with the way out, never resumed over a silent gap.
//!
//! ```text
//!   producer SIGKILLed (the outage) ─▶ max_slot_wal_keep_size = 64MB, 96 MiB of WAL, CHECKPOINT
//!        ─▶ the slot's wal_status is `lost` ─▶ producer started again ─▶ it must exit non-zero,
//!           naming the cause and the way out (`destroy`, then a new snapshot)
//! ```
//!
//! It runs after every check of the run (the slot it invalidates is done with): the WAL is
//! written into a table outside the captured schema, so no event is added to any topic.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::stack::Stack;

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
