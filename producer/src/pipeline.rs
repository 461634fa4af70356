//! `run`: one streaming session after another until stopped.
//!
//! A session connects, decides what the slot needs (create with a snapshot, redo an
//! interrupted snapshot, or stream), then streams. A transient failure (Postgres or Kafka
//! unreachable, the slot held by another producer, a delivery error) ends the session and a
//! new one starts after a capped, jittered backoff; the new session streams again from the
//! slot's confirmed position, so nothing is lost and duplicates stay within the unconfirmed
//! window. A definite failure (the slot lost, a decode error, an event too large for Kafka,
//! missing set-up) stops the process with a clear error.
//!
//! # One thread
//!
//! The process runs on a single-threaded tokio runtime; librdkafka keeps its own threads
//! (one per broker, plus the delivery-report poller), and blocking librdkafka calls (metadata)
//! go to `spawn_blocking`. A slot is one ordered stream, so there is little to spread over
//! cores, and on a multi-threaded runtime the replication client's reader task and the
//! listener sat on different threads: every event crossed threads, and the wake-ups (about
//! 38 000 context switches a second per worker thread at 180k rows/s) cost more than the
//! work. On one thread the reader fills the channel while the listener is busy and the
//! listener drains it in runs:
//!
//! ```text
//!   runtime thread:  [ read 256 messages ]→[ decode, encode, produce ×256 ]→[ read … ]
//!   librdkafka:      broker threads batch and send; the poller returns acks → checkpointer
//! ```
//!
//! Measured side by side on 2 cores (docs/benchmarks.md, 2026-12-01): the stream ratio
//! against `pg_recvlogical` went from 0.48–0.98 to 0.89–1.44, and the snapshot was as fast or
//! faster (its readers wait on Postgres, and the decoding they do interleaves well).

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient};
use tokio_util::sync::CancellationToken;
use walrelay_common::registry::Registry as SchemaRegistry;
use walrelay_common::retry::Backoff;
use walrelay_common::telemetry::Readiness;

use crate::avro::AvroCodec;
use crate::catalog::{self, Catalog, PgError};
use crate::checkpoint::Checkpointer;
use crate::config::{Compat, SchemaEvents, Settings, SnapshotMode, TopicRouting};
use crate::ddl::Registry;
use crate::emit::{Codec, Emitter};
use crate::encode::EnvelopeWriter;
use crate::error::RunError;
use crate::kafka::{
    WriteError, Writer, ensure_progress_topic, ensure_single_partition_topic, ensure_topic,
};
use crate::metrics::Metrics;
use crate::replication::connection;
use crate::replication::listener::Listener;
use crate::replication::slot::{self, SnapshotStatus, format_lsn, parse_lsn};
use crate::snapshot::{self, SnapshotJob};

/// A session that lasted this long ended a run of failures: the next wait starts small again.
const SESSION_RESETS_BACKOFF: Duration = Duration::from_secs(60);

/// Under exactly-once, how often the snapshot's Kafka transaction commits.
const SNAPSHOT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// A slot's incarnation: its consistent point and creation time. A slot dropped and created
/// again under the same name is another incarnation (see `kafka::transaction`).
fn incarnation(consistent_lsn: u64, created_ms: i64) -> String {
    format!("{}-{created_ms}", format_lsn(consistent_lsn))
}

async fn incarnation_of(ctl: &tokio_postgres::Client, slot_name: &str) -> Result<String, RunError> {
    let state = slot::read_state(ctl, slot_name).await?;
    match state
        .as_ref()
        .and_then(|st| st.consistent_lsn.zip(st.snapshot_started_ms))
    {
        Some((lsn, ms)) => Ok(incarnation(lsn, ms)),
        None => Err(RunError::Setup(format!(
            "walrelay.slot_state has no consistent point for slot {slot_name}: run `walrelay-producer init` and let `run` create the slot"
        ))),
    }
}

/// Everything a session shares with the process.
pub struct Context {
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Readiness conditions.
    pub readiness: Readiness,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
}

/// Runs sessions until stopped (`Ok`) or a definite failure.
///
/// The slot gauges are kept for the whole process, not per session: while Kafka is
/// unreachable no session gets as far as streaming, and that is when the retained WAL they
/// report grows (`WalrelaySlotRetainedWalGrowing` is built on it).
pub async fn run(ctx: &Context) -> Result<(), RunError> {
    let poller = tokio::spawn(poll_slot(
        ctx.settings.postgres.clone(),
        ctx.settings.slot.clone(),
        Arc::clone(&ctx.metrics),
    ));
    let result = run_sessions(ctx).await;
    poller.abort();
    result
}

async fn run_sessions(ctx: &Context) -> Result<(), RunError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let started = std::time::Instant::now();
        let result = session(ctx).await;
        ctx.readiness.set("replication", false);
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                ctx.metrics.errors.with_label_values(&[e.kind()]).inc();
                if ctx.shutdown.is_cancelled() || !e.is_transient() {
                    return Err(e);
                }
                // A session that streamed for a while was a success: start the backoff over.
                if started.elapsed() >= SESSION_RESETS_BACKOFF {
                    backoff.reset();
                }
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Session ended; starting a new one from the slot's confirmed position.");
                tokio::select! {
                    () = ctx.shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The key that authenticates trigger messages, when this role may read it.
async fn read_ddl_key(ctl: &tokio_postgres::Client) -> Option<Vec<u8>> {
    match ctl
        .query_opt("SELECT key FROM walrelay.ddl_key WHERE id = 1", &[])
        .await
    {
        Ok(Some(row)) => Some(row.get(0)),
        Ok(None) => {
            tracing::warn!(
                "walrelay.ddl_key is empty: trigger messages cannot be verified and are skipped; run `walrelay-producer init`"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                error = %crate::catalog::describe(&e),
                "The producer's role cannot read walrelay.ddl_key: trigger messages cannot be verified and are skipped (schema events come from Relation messages); grant SELECT on it to this role or run `init` as it"
            );
            None
        }
    }
}

/// What a session has once the slot is ready to stream.
struct Prepared {
    ctl: tokio_postgres::Client,
    client: ReplicationClient,
    writer: Arc<Writer>,
    checkpointer: Arc<Checkpointer>,
    emitter: Emitter,
    /// Under exactly-once: the end LSN Kafka already holds (0: none).
    skip_through: u64,
}

async fn session(ctx: &Context) -> Result<(), RunError> {
    // Everything up to streaming may be abandoned at a signal: nothing was confirmed yet, and
    // an interrupted snapshot leaves the slot `pending`, so the next run takes it again.
    let prepared = tokio::select! {
        r = prepare(ctx) => r?,
        () = ctx.shutdown.cancelled() => return Ok(()),
    };
    stream(ctx, prepared).await
}

async fn prepare(ctx: &Context) -> Result<Prepared, RunError> {
    let s = &ctx.settings;
    let ctl = catalog::connect(&s.postgres).await?;
    ctx.readiness.set("postgres", true);
    let wal_level: String = ctl
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(PgError::query("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(RunError::Setup(format!(
            "wal_level is {wal_level:?}, logical replication needs wal_level = logical: set it in postgresql.conf \
             (or ALTER SYSTEM SET wal_level = logical) and restart Postgres"
        )));
    }
    if !slot::state_exists(&ctl).await? {
        return Err(RunError::Setup(
            "walrelay's state is missing: run `walrelay-producer init` first".into(),
        ));
    }
    if !crate::commands::schema_functions_exist(&ctl).await? {
        return Err(RunError::Setup(
            "walrelay's schema functions are missing (state from an older version): run `walrelay-producer init` again"
                .into(),
        ));
    }
    let triggers: bool = ctl
        .query_one(crate::ddl::capture::TRIGGERS_ACTIVE, &[])
        .await
        .map_err(PgError::query("reading pg_event_trigger"))?
        .get(0);
    if triggers {
        tracing::info!("DDL capture: event triggers active.");
    } else {
        tracing::warn!(
            "DDL capture: event triggers missing, schema events come from Relation messages; {}",
            crate::ddl::capture::WITHOUT_TRIGGERS
        );
    }
    let pub_exists = catalog::publication_exists(&ctl, &s.publication).await?;
    if !pub_exists {
        return Err(RunError::Setup(format!(
            "publication {:?} does not exist: run `walrelay-producer init` first",
            s.publication
        )));
    }
    crate::policy::verify_row_filters(&ctl, &s.publication, &s.row_filters)
        .await
        .map_err(RunError::Setup)?;
    let published = catalog::publication_tables(&ctl, &s.publication).await?;
    crate::policy::check_keys(&ctl, &s.columns, &published)
        .await
        .map_err(|e| match e {
            PgError::Catalog(m) => RunError::Setup(m),
            e => e.into(),
        })?;
    if !s.columns.is_empty() || !s.row_filters.is_empty() {
        tracing::info!(
            excluded_patterns = s.columns.excluded().len(),
            masked_patterns = s.columns.masked().len(),
            row_filters = s.row_filters.len(),
            "What leaves the database: column policy and row filters in force (`check` prints the plan)."
        );
    }
    let brokers = s
        .require_brokers()
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let writer_opts = s.writer_options(brokers);
    ensure_topic(&writer_opts, s.topic_partitions).await?;
    ensure_progress_topic(&writer_opts).await?;
    let transactions_topic = format!("{}.transactions", s.topic);
    if s.transaction_metadata {
        ensure_single_partition_topic(&writer_opts, &transactions_topic).await?;
    }
    let checkpointer =
        Arc::new(Checkpointer::new(0).with_latency(ctx.metrics.commit_to_ack_seconds.clone()));
    let writer = Arc::new(Writer::new(
        &writer_opts,
        Arc::clone(&checkpointer),
        Arc::clone(&ctx.metrics),
        ctx.readiness.clone(),
    )?);
    let partitions = writer.partitions(Duration::from_secs(10)).await?;
    ctx.readiness.set("kafka", true);
    if s.schema_events == SchemaEvents::Topic {
        ensure_single_partition_topic(&writer_opts, &s.schema_topic()).await?;
    }
    let codec = match &s.registry {
        Some(registry) => Codec::Avro(Arc::new(AvroCodec::new(
            Arc::new(SchemaRegistry::new(registry)?),
            s.subject_strategy,
            s.topic_routing == TopicRouting::PerTable,
            &s.topic,
            &s.database(),
        ))),
        None => {
            let json = EnvelopeWriter::new(&s.database());
            Codec::Json(Arc::new(match s.compat {
                Compat::Debezium => json.debezium(&s.topic),
                Compat::None => json,
            }))
        }
    };
    let mut emitter = Emitter::with(
        Arc::clone(&writer),
        codec,
        s.routing(),
        s.partition_key,
        partitions,
        Arc::clone(&ctx.metrics),
    );
    if s.transaction_metadata {
        emitter.set_transactions_topic(&transactions_topic);
    }
    emitter.set_columns(Arc::clone(&s.columns));

    let info = slot::slot_info(&ctl, &s.slot).await?;
    let state = slot::read_state(&ctl, &s.slot).await?;
    let mut client = ReplicationClient::connect_gated(connection::config(s)?)
        .await
        .map_err(RunError::from_pgwire)?;
    let new_slot = match (&info, state.as_ref().map(|st| st.status)) {
        (Some(i), Some(SnapshotStatus::Done)) => {
            if i.wal_status.as_deref() == Some("lost") {
                return Err(RunError::Slot {
                    slot: s.slot.clone(),
                    message: "its WAL was removed (wal_status = lost; max_slot_wal_keep_size exceeded): changes are \
                              missing. Run `walrelay-producer destroy` and start again with a new snapshot"
                        .into(),
                });
            }
            tracing::info!(slot = %s.slot, confirmed_flush_lsn = ?i.confirmed_flush_lsn, "Resuming from the slot.");
            false
        }
        (None, Some(SnapshotStatus::Done)) => {
            return Err(RunError::Slot {
                slot: s.slot.clone(),
                message: "it vanished after its snapshot completed (dropped or invalidated): changes since the last \
                          confirmed position may be missing, so walrelay will not recreate it silently. Run \
                          `walrelay-producer destroy`, then `init` and `run` for a new snapshot"
                    .into(),
            });
        }
        (Some(i), None) => {
            return Err(RunError::Slot {
                slot: s.slot.clone(),
                message: format!(
                    "it exists (plugin {:?}) but walrelay did not create it. Use another --slot, or drop it \
                     (SELECT pg_drop_replication_slot('{}')) to let walrelay create its own",
                    i.plugin, s.slot
                ),
            });
        }
        (Some(i), Some(SnapshotStatus::Pending)) => {
            if i.active {
                return Err(RunError::Replication(format!(
                    "slot {} is being created by another producer (pid {:?}); waiting",
                    s.slot, i.active_pid
                )));
            }
            tracing::warn!(slot = %s.slot, "A previous snapshot did not complete: dropping the slot and taking a new snapshot.");
            slot::drop_slot(&ctl, &s.slot).await?;
            true
        }
        (None, _) => true,
    };
    if new_slot {
        create_and_snapshot(
            ctx,
            &ctl,
            &mut client,
            &mut emitter,
            Arc::clone(&checkpointer),
        )
        .await?;
    }
    client.start().await.map_err(RunError::from_pgwire)?;
    client.wait_started().await.map_err(RunError::from_pgwire)?;
    // The slot is ours now: under exactly-once, fence any earlier instance and read back what
    // Kafka holds (a new slot did this before its snapshot, and Kafka holds nothing of it).
    let skip_through = if writer.exactly_once() && !new_slot {
        let incarnation = incarnation_of(&ctl, &s.slot).await?;
        let held = writer.start_transactions(&s.slot, &incarnation).await?;
        if held > 0 {
            tracing::info!(kafka_holds_through = %format_lsn(held), "Kafka transactions: transactions at or below this position are not written again.");
        }
        held
    } else {
        0
    };
    ctx.readiness.set("replication", true);
    ctx.metrics.slot_active.set(1);
    tracing::info!(slot = %s.slot, publication = %s.publication, topic = %s.topic, partitions, "Streaming.");
    Ok(Prepared {
        ctl,
        client,
        writer,
        checkpointer,
        emitter,
        skip_through,
    })
}

async fn stream(ctx: &Context, p: Prepared) -> Result<(), RunError> {
    let s = &ctx.settings;
    let Prepared {
        ctl,
        mut client,
        writer,
        checkpointer,
        emitter,
        skip_through,
    } = p;

    let confirmed = slot::slot_info(&ctl, &s.slot)
        .await?
        .and_then(|i| i.confirmed_flush_lsn)
        .as_deref()
        .and_then(parse_lsn)
        .unwrap_or(0);
    let registry = Registry::load(&ctl, &s.slot, confirmed).await?;
    let ddl_key = read_ddl_key(&ctl).await;
    // Incremental snapshots: a worker of their own, on connections of their own; its
    // watermarks are authenticated with the DDL key, so without it there are none.
    let stop_worker = tokio_util::sync::CancellationToken::new();
    let incremental = if ddl_key.is_some() {
        let hub = crate::incremental::Hub::new();
        let worker = crate::incremental::Worker {
            postgres: s.postgres.clone(),
            slot: s.slot.clone(),
            publication: s.publication.clone(),
            chunk_rows: s.incremental_chunk_rows,
            auto_start: s.snapshot == SnapshotMode::Initial,
            hub: Arc::clone(&hub),
            checkpointer: Arc::clone(&checkpointer),
            writer: Arc::clone(&writer),
            metrics: Arc::clone(&ctx.metrics),
        };
        tokio::spawn(worker.run(stop_worker.clone()));
        Some(hub)
    } else {
        tracing::warn!(
            "Incremental snapshots are off: this role cannot read walrelay.ddl_key, which authenticates their watermarks"
        );
        None
    };
    let listener = Listener {
        client: &mut client,
        catalog: Catalog::new(&ctl),
        registry,
        publication: s.publication.clone(),
        emitter,
        checkpointer: &checkpointer,
        metrics: &ctx.metrics,
        ddl_key,
        ddl_statement: s.ddl_statement,
        skip_through,
        writer: Arc::clone(&writer),
        incremental,
    };
    let result = listener.run(&ctx.shutdown).await;
    stop_worker.cancel();
    ctx.metrics.slot_active.set(0);
    // Under exactly-once a session that failed aborts its open Kafka transaction (so
    // read_committed readers need not wait for the next start), which also tells whether this
    // instance was fenced: a fenced writer ends the process even when the session ended first
    // for another reason (a frozen producer wakes to both its dropped replication connection
    // and the fence).
    if result.is_err() && writer.exactly_once() {
        let _ = tokio::time::timeout(Duration::from_secs(10), writer.abort()).await;
    }
    if let (Err(_), Some(fenced @ WriteError::Fenced { .. })) = (&result, writer.failure()) {
        return Err(fenced.into());
    }
    result?;
    shutdown_gracefully(ctx, &ctl, client, &writer, &checkpointer).await
}

/// Creates the slot with an exported snapshot and reads it, or without one under
/// `--snapshot never`; records the slot's state along the way.
async fn create_and_snapshot(
    ctx: &Context,
    ctl: &tokio_postgres::Client,
    client: &mut ReplicationClient,
    emitter: &mut Emitter,
    checkpointer: Arc<Checkpointer>,
) -> Result<(), RunError> {
    let s = &ctx.settings;
    slot::mark_pending(ctl, &s.slot, &s.publication).await?;
    let mode = if s.snapshot == SnapshotMode::Initial {
        "export"
    } else {
        "nothing"
    };
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{mode}')",
            catalog::quote_ident(&s.slot)
        ))
        .await
        .map_err(RunError::from_pgwire)?;
    let row = rows
        .first()
        .ok_or_else(|| RunError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent = text(1).as_deref().and_then(parse_lsn).ok_or_else(|| {
        RunError::Protocol("CREATE_REPLICATION_SLOT returned no consistent point".into())
    })?;
    let started_ms = walrelay_common::clock::now_ms();
    slot::mark_created(ctl, &s.slot, consistent, started_ms).await?;
    tracing::info!(slot = %s.slot, consistent_point = %format_lsn(consistent), "Created the replication slot.");
    let writer = Arc::clone(emitter.writer());
    if writer.exactly_once() {
        writer
            .start_transactions(&s.slot, &incarnation(consistent, started_ms))
            .await?;
    }
    if s.snapshot == SnapshotMode::Initial {
        let snapshot_name = text(2).ok_or_else(|| {
            RunError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into())
        })?;
        let tables = catalog::publication_tables(ctl, &s.publication).await?;
        let job = SnapshotJob {
            postgres: s.postgres.clone(),
            snapshot_name,
            consistent_lsn: consistent,
            started_ms,
            slot: s.slot.clone(),
            parallelism: s.snapshot_parallelism,
            chunk_pages: s.snapshot_chunk_pages,
        };
        let mut snapshot = Box::pin(snapshot::run(
            job,
            ctl,
            &tables,
            emitter,
            checkpointer,
            Arc::clone(&ctx.metrics),
        ));
        if writer.exactly_once() {
            // The snapshot is written in Kafka transactions of a second or so each; the last
            // one commits before the slot is marked done.
            let mut every = tokio::time::interval(SNAPSHOT_COMMIT_INTERVAL);
            every.tick().await;
            loop {
                tokio::select! {
                    r = &mut snapshot => {
                        r?;
                        break;
                    }
                    _ = every.tick() => writer.commit().await?,
                }
            }
            writer.commit().await?;
        } else {
            snapshot.await?;
        }
    }
    slot::mark_done(ctl, &s.slot).await?;
    Ok(())
}

/// Stop reading, let Kafka acknowledge what is in flight, confirm the final LSN.
async fn shutdown_gracefully(
    ctx: &Context,
    ctl: &tokio_postgres::Client,
    mut client: ReplicationClient,
    writer: &Writer,
    checkpointer: &Checkpointer,
) -> Result<(), RunError> {
    tracing::info!(
        in_flight = writer.in_flight(),
        "Stopping: waiting for Kafka to acknowledge what is in flight."
    );
    let flushed = writer.flush(Duration::from_secs(30)).await;
    if !flushed {
        tracing::warn!(
            "Kafka did not acknowledge everything within 30 s; the rest is sent again on the next run."
        );
    }
    let last = writer.confirmable(checkpointer.confirmed());
    client.update_applied_lsn(Lsn::from_u64(last));
    let metrics = client.metrics();
    for _ in 0..40 {
        if metrics.last_applied_lsn().as_u64() >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
    drop(client);
    // The last status update can be lost as the connection closes: make sure the slot has it.
    for _ in 0..50 {
        match slot::advance_slot(ctl, &ctx.settings.slot, last).await {
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(error = %e, "Slot not released yet.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    ctx.metrics.confirmed_lsn.set(last as f64);
    tracing::info!(confirmed_lsn = %format_lsn(last), "Stopped.");
    Ok(())
}

/// How often the slot gauges are read.
const SLOT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the slot gauges current for the life of the process, on a connection of its own:
/// reconnects after Postgres went away or a read took longer than two intervals (a link that
/// hangs rather than breaks), and leaves the gauges as they were while it cannot read them (a
/// slot not created yet reads as nothing retained).
async fn poll_slot(
    pg: walrelay_common::postgres::PgTarget,
    slot_name: String,
    metrics: Arc<Metrics>,
) {
    let mut ctl = None;
    let mut tick = tokio::time::interval(SLOT_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let patience = 2 * SLOT_POLL_INTERVAL;
        if ctl.is_none() {
            match tokio::time::timeout(patience, catalog::connect(&pg)).await {
                Ok(Ok(c)) => ctl = Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "Slot gauges: Postgres not reachable yet.");
                    continue;
                }
                Err(_) => {
                    tracing::debug!("Slot gauges: connecting to Postgres timed out.");
                    continue;
                }
            }
        }
        let Some(c) = ctl.as_ref() else { continue };
        match tokio::time::timeout(patience, slot::slot_info(c, &slot_name))
            .await
            .unwrap_or_else(|_| Err(PgError::Catalog("reading the slot timed out".into())))
        {
            Ok(Some(info)) => {
                metrics
                    .slot_retained_wal_bytes
                    .set(info.retained_wal_bytes.unwrap_or(0));
                metrics
                    .slot_safe_wal_bytes
                    .set(info.safe_wal_bytes.unwrap_or(-1));
                metrics.slot_active.set(i64::from(info.active));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "Slot gauges: reading the slot failed; reconnecting.");
                ctl = None;
            }
        }
    }
}
