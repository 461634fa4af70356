//! `walrelay-producer`: parses options and hands over to the library.
//!
//! Exit codes: 0 success; 1 runtime failure (or a failed `check`); 2 a bad option or config
//! file; 3 the replication slot cannot be streamed safely (lost, vanished, or foreign).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use walrelay_common::telemetry::{self, Readiness};
use walrelay_producer::commands;
use walrelay_producer::config::{Cli, Command, Options, Settings};
use walrelay_producer::error::RunError;
use walrelay_producer::metrics::Metrics;
use walrelay_producer::pipeline::{self, Context};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `snapshot` takes its tables from the command line only: a configured list (file or
    // WALRELAY_TABLES) names what is captured, not what to read again.
    let tables_given = std::env::args().any(|a| a == "--tables" || a.starts_with("--tables="));
    let file = match cli.config.as_deref().map(Options::from_file).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return usage(&e),
    };
    let settings = match Settings::from_options(cli.options.or(file)) {
        Ok(s) => s,
        Err(e) => return usage(&e),
    };
    telemetry::init_logging(settings.log_format);
    // One thread: see "One thread" in the `pipeline` module's essay.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(try_main(cli.command, settings, tables_given))
}

fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

async fn try_main(command: Command, settings: Settings, tables_given: bool) -> ExitCode {
    match command {
        Command::Check { json } => {
            let report = commands::check(&settings).await;
            let plan = commands::plan(&settings).await;
            let failed = report.iter().any(|i| i.status == "fail") || plan.is_err();
            if json {
                let plan = match &plan {
                    Ok(p) => serde_json::to_value(p).unwrap_or_default(),
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                };
                println!(
                    "{}",
                    serde_json::json!({ "ok": !failed, "checks": report, "plan": plan })
                );
            } else {
                for i in &report {
                    println!("[{:>4}] {}: {}", i.status, i.name, i.detail);
                }
                match &plan {
                    Ok(p) => println!("{}", p.text()),
                    Err(e) => println!("capture plan: unavailable ({e})"),
                }
                println!(
                    "{}",
                    if failed {
                        "check failed"
                    } else {
                        "check passed"
                    }
                );
            }
            ExitCode::from(u8::from(failed))
        }
        Command::Init => match commands::init(&settings).await {
            Ok(report) => {
                println!(
                    "publication {} captures {} table(s): {}",
                    settings.publication,
                    report.tables.len(),
                    report.tables.join(", ")
                );
                match report.triggers_missing {
                    None => println!(
                        "DDL capture: event triggers installed (schema events carry the DDL; new matching tables join the publication)"
                    ),
                    Some(why) => println!("warning: {why}"),
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Status { json } => match commands::status(&settings).await {
            Ok(st) if json => {
                println!("{}", serde_json::to_string_pretty(&st).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Ok(st) => {
                match &st.slot_info {
                    None => println!("slot {}: does not exist", st.slot),
                    Some(i) => println!(
                        "slot {}: {} | confirmed LSN {} | retained WAL {} bytes | lag {} bytes | wal_status {}",
                        st.slot,
                        if i.active { "active" } else { "inactive" },
                        i.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                        i.retained_wal_bytes.unwrap_or(0),
                        i.lag_bytes.unwrap_or(0),
                        i.wal_status.as_deref().unwrap_or("-"),
                    ),
                }
                println!(
                    "snapshot: {}",
                    st.snapshot_status.as_deref().unwrap_or("not started")
                );
                for t in &st.snapshot_tables {
                    println!(
                        "  {}: {} rows, {}/{} chunks ({:.0}%)",
                        t.table, t.rows, t.chunks_done, t.chunks_total, t.percent
                    );
                }
                if !st.incremental.is_empty() {
                    println!("incremental snapshots:");
                }
                for r in &st.incremental {
                    println!(
                        "  {} (request {}, {}): {} | {} rows, {} chunks, {} dropped by window | last key {}{}{}",
                        r.table,
                        r.request,
                        r.origin,
                        r.state,
                        r.rows,
                        r.chunks,
                        r.dropped,
                        r.last_key
                            .as_ref()
                            .map_or_else(|| "-".to_string(), |k| format!("({})", k.join(", "))),
                        r.where_clause
                            .as_ref()
                            .map_or_else(String::new, |w| format!(" | where {w}")),
                        r.error
                            .as_ref()
                            .map_or_else(String::new, |e| format!(" | error: {e}")),
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Snapshot {
            where_clause,
            cancel,
        } => {
            if !tables_given {
                return usage(
                    &"snapshot needs --tables (the tables to snapshot again; `*` patterns allowed)",
                );
            }
            match walrelay_producer::incremental::request(
                &settings,
                where_clause.as_deref(),
                cancel,
            )
            .await
            {
                Ok(report) if cancel && report.tables.is_empty() => {
                    println!("no incremental snapshot under way for these tables");
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    for (table, id) in &report.tables {
                        if cancel {
                            println!("{table}: incremental snapshot cancelled (request {id})");
                        } else {
                            println!(
                                "{table}: incremental snapshot requested (request {id}); `walrelay-producer status` shows its progress"
                            );
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Destroy { force } => match commands::destroy(&settings, force).await {
            Ok(done) => {
                for d in done {
                    println!("{d}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Run => run(settings).await,
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!(error = %e, "Failed.");
    eprintln!("error: {e}");
    ExitCode::from(1)
}

async fn run(settings: Settings) -> ExitCode {
    let metrics = match Metrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => return fail(&e),
    };
    let readiness = Readiness::default();
    for condition in ["postgres", "kafka", "replication"] {
        readiness.set(condition, false);
    }
    if let Some(addr) = settings.metrics_addr {
        let (registry, readiness) = (metrics.registry.clone(), readiness.clone());
        tokio::spawn(async move {
            if let Err(error) = telemetry::serve(addr, registry, readiness).await {
                tracing::error!(%error, %addr, "Cannot serve metrics.");
            }
        });
    }
    let shutdown = walrelay_common::signal::shutdown_token();
    let ctx = Context {
        settings,
        metrics,
        readiness,
        shutdown,
    };
    match pipeline::run(&ctx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ RunError::Slot { .. }) => {
            tracing::error!(error = %e, "Refusing to stream.");
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
        Err(e) => fail(&e),
    }
}
