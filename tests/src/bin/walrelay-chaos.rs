//! `walrelay-chaos`: one reproducible chaos run (see `walrelay_tests::chaos`). Orchestration
//! only: start the stack, run the workload under the seeded fault schedule, restore
//! everything, wait for the components to drain, check, report. Exit 0 on a pass, 1 on a
//! failure, 2 on bad options.
//!
//! Longer than ~500 lines: the check phase assembles every component's verdict from the
//! library's pieces in one readable sequence (the pieces themselves are in `chaos/`).
//!
//! Usage: `walrelay-chaos [--minutes N] [--seed S] [--out DIR] [--intensity X]
//! [--big-rows N] [--producer-bin PATH]` (normally through `scripts/chaos.sh`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use walrelay_tests::chaos::checker::{
    self, DupPolicy, Obs, Parsed, check_events, compare_state, expected_of,
};
use walrelay_tests::chaos::faults::{self, Profile};
use walrelay_tests::chaos::hygiene;
use walrelay_tests::chaos::observability::Watch;
use walrelay_tests::chaos::observe::{self, Receiver, StreamClient, TopicTail};
use walrelay_tests::chaos::report::{self, Partials, Report};
use walrelay_tests::chaos::runner::Runner;
use walrelay_tests::chaos::stack::{self, Stack};
use walrelay_tests::chaos::workload::{self, Pace, Truth, Workload};
use walrelay_tests::chaos::{Ev, Op, Table, now_ms};

struct Opts {
    minutes: f64,
    seed: u64,
    out: Option<PathBuf>,
    intensity: Option<f64>,
    big_rows: Option<i64>,
    producer_bin: Option<PathBuf>,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        minutes: 5.0,
        seed: (now_ms() as u64) % 1_000_000,
        out: None,
        intensity: None,
        big_rows: None,
        producer_bin: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--minutes" => o.minutes = value()?.parse().context("--minutes takes a number")?,
            "--seed" => o.seed = value()?.parse().context("--seed takes an integer")?,
            "--out" => o.out = Some(value()?.into()),
            "--intensity" => {
                o.intensity = Some(value()?.parse().context("--intensity takes a number")?)
            }
            "--big-rows" => {
                o.big_rows = Some(value()?.parse().context("--big-rows takes an integer")?)
            }
            "--producer-bin" => o.producer_bin = Some(value()?.into()),
            other => bail!("unknown option {other}; see the file's header"),
        }
    }
    if o.minutes.is_nan() || o.minutes <= 0.0 {
        bail!("--minutes must be above 0");
    }
    Ok(o)
}

/// Waits until the producer of `slot` streams (its snapshot done, the slot active).
async fn wait_streaming(stack: &Stack, slot: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let c = stack.pg.client(&stack.db).await;
    loop {
        let ok = c
            .query_one(
                "SELECT s.snapshot_status = 'done' AND r.active FROM walrelay.slot_state s \
                 JOIN pg_replication_slots r ON r.slot_name = s.slot_name WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<bool>>(0));
        if ok == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the producer of {slot} never streamed");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates the webhook subscriptions (items, accounts), retrying while the API comes up.
async fn subscribe(stack: &Stack, receiver: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for table in ["items", "accounts"] {
        let body = serde_json::json!({
            "url": format!("http://127.0.0.2:{receiver}/{table}"),
            "schema": "public",
            "table": table,
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = http
                .post(format!(
                    "http://127.0.0.1:{}/v1/subscriptions",
                    stack.notify_api
                ))
                .bearer_auth(stack::TOKEN)
                .json(&body)
                .send()
                .await;
            match r {
                Ok(r) if r.status().as_u16() == 201 => break,
                Ok(r) => bail!("subscribing {table}: {}", r.status()),
                Err(e) if Instant::now() > deadline => bail!("the notifier's API: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
    Ok(())
}

/// Sum over partitions of (end offset − the group's committed offset) of `topic`.
fn group_lag(stack: &Stack, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = stack
        .kafka
        .direct_client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("log_level", "0")
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..walrelay_tests::chaos::PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Timeout::After(Duration::from_secs(5)))
        .ok()?;
    let mut lag = 0;
    for e in committed.elements() {
        let (_, hi) = consumer
            .fetch_watermarks(topic, e.partition(), Timeout::After(Duration::from_secs(5)))
            .ok()?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        };
        lag += (hi - at).max(0);
    }
    Some(lag)
}

/// Observations of a log of envelopes (the receiver's, the client's).
fn log_obs(lines: &[observe::Line], lsn_tx: &HashMap<u64, i64>) -> (Vec<Obs>, Vec<String>) {
    let mut obs = Vec::new();
    let mut bad = Vec::new();
    for l in lines {
        match checker::parse(&l.body) {
            Parsed::Row {
                ev,
                ts_ms,
                commit_lsn,
                ..
            } => obs.push(Obs {
                ev,
                stream: l.stream,
                arrival_ms: l.t,
                ts_ms,
                commit_lsn,
            }),
            Parsed::Truncate {
                table,
                ts_ms,
                commit_lsn,
            } => obs.push(Obs {
                // A webhook does not say its partition: its truncates are told apart by
                // arrival only (key -1).
                ev: Ev {
                    table,
                    key: l.partition.unwrap_or(-1),
                    op: Op::Truncate,
                    version: -1,
                },
                stream: l.stream,
                arrival_ms: l.t,
                ts_ms,
                commit_lsn,
            }),
            Parsed::Other => {}
            Parsed::Bad(why) => bad.push(why),
        }
    }
    checker::resolve_truncates(&mut obs, lsn_tx);
    (obs, bad)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    match run(o).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("chaos: the run could not complete: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(o: Opts) -> anyhow::Result<bool> {
    let full = o.minutes >= 30.0;
    let intensity = o.intensity.unwrap_or(if full { 1.0 } else { 0.6 });
    let big_rows = o.big_rows.unwrap_or(if full { 1_000_000 } else { 20_000 });
    let out = o
        .out
        .clone()
        .or_else(|| {
            // Beside the target folder's profiles: target/chaos/seed-S-<time>.
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("chaos").join(format!(
                "seed-{}-{}",
                o.seed,
                now_ms() / 1000
            )))
        })
        .context("no --out and no folder beside the binary")?;
    std::fs::create_dir_all(&out)?;
    let producer_bin = match &o.producer_bin {
        Some(p) => p.clone(),
        None => walrelay_tests::sibling_bin("walrelay-producer").map_err(anyhow::Error::msg)?,
    };
    let consumer_bin =
        walrelay_tests::sibling_bin("walrelay-consumer").map_err(anyhow::Error::msg)?;
    let modes = ["at-least-once", "exactly-once"];
    let window = Duration::from_secs_f64(o.minutes * 60.0);
    let planned = faults::schedule(
        o.seed,
        Profile {
            window,
            intensity,
            producers: modes.len(),
        },
    );
    eprintln!(
        "chaos: seed {}, {} min, {} faults planned, report in {}",
        o.seed,
        o.minutes,
        planned.len(),
        out.display()
    );

    let mut stack =
        Stack::start(&out, &producer_bin, &consumer_bin, &modes, workload::SCHEMA).await?;
    // Prometheus first: it sees the producers' snapshots too.
    let watch = Watch::start(&stack, &out).await?;
    eprintln!("chaos: Prometheus at {}", watch.url());
    let truth = Arc::new(Truth::default());
    for i in 0..stack.producers.len() {
        stack.producers[i].proc.start();
        let slot = stack.producers[i].slot.clone();
        wait_streaming(&stack, &slot, Duration::from_secs(180)).await?;
    }
    let tails: Vec<TopicTail> = stack
        .producers
        .iter()
        .map(|p| {
            TopicTail::start(
                stack.kafka.direct_client_config(),
                p.topic.clone(),
                Arc::clone(&truth),
            )
        })
        .collect();
    let receiver = Receiver::start(&out.join("receiver.jsonl")).await?;
    for m in stack.consumers.values_mut() {
        m.start();
    }
    watch
        .wait_up(stack.metrics.len(), Duration::from_secs(60))
        .await?;
    subscribe(&stack, receiver.port).await?;
    let client = StreamClient::start(
        stack.stream_port,
        stack::TOKEN.into(),
        stack::STREAM_GROUP.into(),
        stack::STREAM_TABLES.into(),
        &out.join("stream-client.jsonl"),
    )?;
    let stop_polls = Arc::new(AtomicBool::new(false));
    let (polls, polls_task) = observe::start_polls(
        format!(
            "{}/{}/_doc/1",
            stack.indexes.url(),
            stack.indexes.full("public.heartbeat")
        ),
        stack.target_url(),
        stack.url(),
        Arc::clone(&stop_polls),
    );
    // The notifier reloads subscriptions every 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    workload::setup(&stack.url(), &truth, o.seed).await?;
    let pace = Pace {
        workers: 2,
        pause_ms: (40, 160),
        big_rows,
        heartbeat_ms: 250,
    };
    let load = Workload::start(
        stack.url(),
        Arc::clone(&truth),
        o.seed,
        pace,
        window.mul_f64(0.3),
    );

    // The fault window.
    let mut runner = Runner::new(&mut stack, &tails);
    runner.run(&planned, window, &truth).await?;
    eprintln!("chaos: fault window over; stopping the workload and restoring everything");
    load.finish().await;
    let (done, unexpected_exits, _) = runner.finish().await;

    // Drain: every ledger row in both topics, every group at the end, heartbeats current.
    let c = stack.pg.client(&stack.db).await;
    let committed: BTreeSet<i64> = c
        .query("SELECT id FROM chaos_tx", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plans = truth.plans();
    let last_beat = committed
        .iter()
        .filter_map(|tx| plans.get(tx).and_then(|p| p.beat))
        .max()
        .unwrap_or(0);
    let drain_started = Instant::now();
    let mut drain_notes: Vec<String> = Vec::new();
    let drain_limit = Duration::from_secs(if full { 900 } else { 420 });
    let topic = stack.producers[0].topic.clone();
    loop {
        stack.restart_exited();
        let tails_done = tails.iter().all(|t| {
            let d = walrelay_common::sync::lock(&t.data);
            let seen: HashSet<i64> = d.lsn_tx.values().copied().collect();
            committed.iter().all(|tx| seen.contains(tx))
        });
        let lags: Vec<Option<i64>> = tokio::task::block_in_place(|| {
            stack
                .groups
                .iter()
                .map(|g| group_lag(&stack, g, &topic))
                .collect()
        });
        let (index_beat, target_beat) = {
            let p = walrelay_common::sync::lock(&polls);
            (
                p.index.last().map_or(0, |x| x.1),
                p.target.last().map_or(0, |x| x.1),
            )
        };
        let ready = tails_done
            && lags.iter().all(|l| *l == Some(0))
            && index_beat >= last_beat
            && target_beat >= last_beat;
        if ready || drain_started.elapsed() > drain_limit {
            if !ready {
                let what = format!(
                    "not drained after {drain_limit:?}: tails {tails_done}, group lags {lags:?}, index beat {index_beat}, target beat {target_beat} (want {last_beat})"
                );
                eprintln!("chaos: {what}");
                drain_notes.push(what);
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Let the replicator close its last target transaction and the client its acks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    // A tail reads every copy the topic holds (4.8M for 1.2M events at-least-once in a full
    // run, a debug build parsing each): one still behind the topic's end when its events are
    // copied reports events the topic has as missing (the third full run, 2026-12-03: the
    // index and the target, fed by that topic, held every one of those rows). So each tail
    // first reads to the end of what its topic holds now.
    let tail_limit = Duration::from_secs(if full { 900 } else { 300 });
    let tail_started = Instant::now();
    while !tails.iter().all(TopicTail::caught_up) && tail_started.elapsed() < tail_limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let behind: Vec<&str> = tails
        .iter()
        .zip(&stack.producers)
        .filter(|(t, _)| !t.caught_up())
        .map(|(_, p)| p.mode.as_str())
        .collect();
    drain_notes.push(if behind.is_empty() {
        format!(
            "the topic tails reached their topics' ends {:.0} s after the drain",
            tail_started.elapsed().as_secs_f64()
        )
    } else {
        format!("the topic tails of {behind:?} were still behind their topics' ends after {tail_limit:?}: their missing events may be the tails' lag")
    });

    // Check.
    let acknowledged_lost: Vec<i64> = truth
        .acknowledged()
        .into_iter()
        .filter(|tx| !committed.contains(tx))
        .collect();
    let expected_all: Vec<Ev> = committed
        .iter()
        .filter_map(|tx| plans.get(tx))
        .flat_map(|p| p.events.iter().copied())
        .collect();
    let unplanned: Vec<i64> = committed
        .iter()
        .filter(|tx| !plans.contains_key(tx))
        .copied()
        .collect();
    let mut lsn_tx: HashMap<u64, i64> = HashMap::new();
    for t in &tails {
        lsn_tx.extend(walrelay_common::sync::lock(&t.data).lsn_tx.clone());
    }
    let pg_rows = observe::pg_rows(&c).await?;
    let mut events = Vec::new();
    let mut states = Vec::new();
    let mut recoveries = Vec::new();
    let mut partials = Vec::new();
    let mut partial_samples = Vec::new();
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    let all_tables = Table::ALL;
    for (i, t) in tails.iter().enumerate() {
        let p = &stack.producers[i];
        let name = format!("kafka ({})", p.mode);
        let d = walrelay_common::sync::lock(&t.data);
        let mut obs = d.obs.clone();
        // The tails read on while the state is checked: their ledger rows are taken under
        // the same lock as their events, or a truncate read since the union above finds no
        // transaction (a missing and an extra event that are neither).
        lsn_tx.extend(d.lsn_tx.iter().map(|(lsn, tx)| (*lsn, *tx)));
        checker::resolve_truncates(&mut obs, &lsn_tx);
        let policy = if p.mode == "exactly-once" {
            DupPolicy::None
        } else {
            // Each new session of the slot (a new walsender: after a kill, a stop, a freeze,
            // or a session the producer started again by itself) from the position the slot
            // had just before, and each immediate restart of Postgres from the position the
            // slot came back with (what was confirmed since the last checkpoint is lost).
            let mut b: Vec<u64> = done
                .iter()
                .filter(|f| f.kind == faults::FaultKind::PostgresRestart)
                .flat_map(|f| f.breaks.iter())
                .filter(|(pi, _)| *pi == i)
                .map(|(_, c)| *c)
                .collect();
            b.extend(
                walrelay_common::sync::lock(&polls)
                    .sessions
                    .iter()
                    .filter(|(slot, _)| *slot == p.slot)
                    .map(|(_, c)| *c),
            );
            b.sort_unstable();
            DupPolicy::Window(b)
        };
        let mut check = check_events(
            &name,
            &expected_of(&expected_all, &all_tables),
            &obs,
            &policy,
        );
        for b in d.bad.iter().take(5) {
            check
                .samples
                .push(format!("not an event of the workload: {b}"));
        }
        if !d.bad.is_empty() {
            check.pass = false;
        }
        events.push(check);
        states.push(compare_state(
            &format!("topic ({})", p.mode),
            &pg_rows,
            &d.rows(),
        ));
        let pairs: Vec<(i64, i64)> = obs.iter().map(|o| (o.ts_ms, o.arrival_ms)).collect();
        recoveries.push((name.clone(), checker::recoveries(&pairs, &done)));
        let complete: Vec<_> = d.samples.iter().filter(|s| s.complete).collect();
        partials.push(Partials {
            mode: p.mode.clone(),
            samples: complete.len(),
            with_partial: complete.iter().filter(|s| s.partial > 0).count(),
            allowed: p.mode != "exactly-once",
        });
        partial_samples.extend(d.samples.iter().map(|s| (p.mode.clone(), s.clone())));
    }
    let logs = [
        (
            "webhooks (notify)",
            receiver.log.clone(),
            "body",
            vec![Table::Items, Table::Accounts],
        ),
        (
            "stream client",
            out.join("stream-client.jsonl"),
            "event",
            vec![Table::Items, Table::Accounts, Table::Scratch],
        ),
    ];
    client.finish().await;
    // The client's and the receiver's logs are read after the tails: their ledger rows too.
    for t in &tails {
        lsn_tx.extend(
            walrelay_common::sync::lock(&t.data)
                .lsn_tx
                .iter()
                .map(|(l, x)| (*l, *x)),
        );
    }
    for (name, path, field, tables) in logs {
        let lines = observe::read_log(&path, field)?;
        let (obs, bad) = log_obs(&lines, &lsn_tx);
        // Webhooks carry no partition: a truncate (one per partition) is expected as one
        // event there, its other copies counted as duplicates.
        let mut expected = expected_of(&expected_all, &tables);
        if lines.iter().all(|l| l.partition.is_none()) {
            let truncates: Vec<Ev> = expected
                .iter()
                .filter(|e| e.op == Op::Truncate)
                .copied()
                .collect();
            for e in truncates {
                expected.remove(&e);
                expected.insert(Ev { key: -1, ..e });
            }
        }
        let mut check = check_events(name, &expected, &obs, &DupPolicy::Allowed);
        for b in bad.iter().take(5) {
            check
                .samples
                .push(format!("not an event of the workload: {b}"));
        }
        if !bad.is_empty() {
            check.pass = false;
        }
        events.push(check);
        let pairs: Vec<(i64, i64)> = obs.iter().map(|o| (o.ts_ms, o.arrival_ms)).collect();
        recoveries.push((name.to_string(), checker::recoveries(&pairs, &done)));
    }
    states.push(compare_state(
        "index (OpenSearch)",
        &pg_rows,
        &observe::index_rows(&stack.indexes).await,
    ));
    let tc = stack.target.client(&stack.target_db).await;
    states.push(compare_state(
        "target (replicate)",
        &pg_rows,
        &observe::pg_rows(&tc).await.unwrap_or_default(),
    ));
    stop_polls.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = polls_task.await;
    let beats: Vec<i64> = committed
        .iter()
        .filter_map(|tx| plans.get(tx).and_then(|p| p.beat))
        .collect();
    let mut polled_lag_ms = BTreeMap::new();
    let retained_wal;
    {
        let p = walrelay_common::sync::lock(&polls);
        for (name, v) in [
            ("index (heartbeat)", &p.index),
            ("target (heartbeat)", &p.target),
        ] {
            polled_lag_ms.insert(name.to_string(), checker::heartbeat_lag(v, &beats));
            let pairs: Vec<(i64, i64)> = v.iter().map(|(t, b)| (*b, *t)).collect();
            recoveries.push((name.to_string(), checker::recoveries(&pairs, &done)));
        }
        retained_wal = p
            .retained_wal
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
    }
    let mut summary = Vec::new();
    for (component, rs) in &recoveries {
        let mut by_kind: BTreeMap<String, Vec<Option<i64>>> = BTreeMap::new();
        for (kind, v) in rs {
            by_kind.entry(kind.clone()).or_default().push(*v);
        }
        for (kind, v) in by_kind {
            summary.push(report::summarize(&kind, component, &v));
        }
    }

    for e in events.iter().filter(|e| !e.pass) {
        failures.push(format!(
            "{}: {} missing, {} extra, {} out of order, {} duplicates not allowed",
            e.name, e.missing, e.extra, e.out_of_order, e.duplicates_not_allowed
        ));
    }
    for s in states.iter().filter(|s| !s.pass) {
        failures.push(format!(
            "{}: {} rows missing, {} extra, {} differing",
            s.name, s.missing, s.extra, s.differing
        ));
    }
    for p in partials.iter().filter(|p| !p.allowed && p.with_partial > 0) {
        failures.push(format!(
            "{}: {} samples showed a partial transaction under read_committed",
            p.mode, p.with_partial
        ));
    }
    if !acknowledged_lost.is_empty() {
        failures.push(format!(
            "Postgres lost {} transactions whose COMMIT it acknowledged (first {:?})",
            acknowledged_lost.len(),
            acknowledged_lost.first()
        ));
    }
    if !unplanned.is_empty() {
        failures.push(format!(
            "{} ledger rows of transactions the workload never planned",
            unplanned.len()
        ));
    }
    // A long Kafka outage nearing max_slot_wal_keep_size, after the checks (it adds one
    // captured change); Prometheus judges the alerts by the scheduled faults and by it.
    let mut judged = done.clone();
    let long_outage = match hygiene::long_outage(&mut stack, &watch).await {
        Ok((l, d)) => {
            if l.recovered_seconds.is_none() {
                failures.push(
                    "after the long Kafka outage the slots did not confirm past the captured change within 300 s".into(),
                );
            }
            judged.push(d);
            Some(l)
        }
        Err(e) => {
            failures.push(format!("the long-outage phase could not run: {e:#}"));
            None
        }
    };
    if let Err(e) = watch
        .wait_up(stack.metrics.len(), Duration::from_secs(60))
        .await
    {
        notes.push(format!("after the long outage: {e:#}"));
    }
    // Prometheus' view, while every process still runs.
    let observability = match watch.verdict(&judged).await {
        Ok(o) => Some(o),
        Err(e) => {
            failures.push(format!("Prometheus could not be read: {e:#}"));
            None
        }
    };
    let prometheus_failures = observability
        .as_ref()
        .map(|o| o.failures())
        .unwrap_or_default();
    if full {
        failures.extend(prometheus_failures);
    } else {
        for f in prometheus_failures {
            notes.push(format!(
                "Prometheus (judged in the full profile only, one fault of each kind here): {f}"
            ));
        }
    }
    // Slot hygiene, last: it invalidates the at-least-once producer's slot.
    let hygiene = match hygiene::invalidate(&mut stack, 0).await {
        Ok(h) => {
            if !h.pass {
                failures.push(format!(
                    "slot invalidation not reported as it must be: wal_status {:?}, exit {:?}",
                    h.wal_status, h.exit
                ));
            }
            Some(h)
        }
        Err(e) => {
            failures.push(format!("the slot invalidation phase could not run: {e:#}"));
            None
        }
    };
    let mut kinds_done: BTreeMap<String, usize> = BTreeMap::new();
    for d in &done {
        *kinds_done.entry(d.kind.label()).or_default() += 1;
    }
    for p in &planned {
        if let std::collections::btree_map::Entry::Vacant(e) = kinds_done.entry(p.kind.label()) {
            failures.push(format!("no {} fault could be injected", p.kind.label()));
            e.insert(0);
        }
    }
    if committed.len() < 100 {
        failures.push(format!("only {} transactions committed", committed.len()));
    }
    if !unexpected_exits.is_empty() {
        let mut n: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &unexpected_exits {
            *n.entry(e).or_default() += 1;
        }
        notes.push(format!(
            "processes that exited by themselves (restarted): {n:?}"
        ));
    }
    notes.push(format!(
        "intensity {intensity} of the full profile's rates; big transaction {big_rows} rows{}",
        if big_rows < 1_000_000 {
            " (the full profile: 1M)"
        } else {
            ""
        }
    ));
    notes.extend(drain_notes);
    notes.push("Kafka latency: commit → seen by a read_committed tail in this process; webhooks: → received; stream: → received by the client; index and target: heartbeat lag (polled every 0.5 s)".into());
    notes.push("network faults act between walrelay's processes and their servers (fault proxies); the harness's own observers go direct".into());
    let report = Report {
        seed: o.seed,
        minutes: o.minutes,
        producer_bin: producer_bin.display().to_string(),
        pass: failures.is_empty(),
        failures,
        planned,
        done,
        load: truth.stats(),
        committed: committed.len(),
        events,
        states,
        polled_lag_ms,
        recoveries: summary,
        partials,
        partial_samples,
        retained_wal,
        drain_seconds,
        observability,
        long_outage,
        hygiene,
        notes,
    };
    report.write(&out)?;
    println!("{}", report.markdown());
    eprintln!(
        "chaos: report in {} ({})",
        out.join("report.md").display(),
        if report.pass { "pass" } else { "FAIL" }
    );
    for m in stack.consumers.values_mut() {
        let _ = m.term(Duration::from_secs(20)).await;
    }
    for p in &mut stack.producers {
        let _ = p.proc.term(Duration::from_secs(35)).await;
    }
    drop(tails);
    Ok(report.pass)
}
