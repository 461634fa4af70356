//! `walrelay-consumer`: parses options and hands over to the library.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 a bad option or config file; 3 `reindex`
//! refused because the topic's history was deleted.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use walrelay_common::telemetry::{self, Readiness};
use walrelay_consumer::config::{Cli, Command, Options, Settings};
use walrelay_consumer::metrics::Metrics;
use walrelay_consumer::notify;
use walrelay_consumer::reindex::{self, ReindexError};
use walrelay_consumer::runtime::Runtime;
use walrelay_consumer::sinks::search::{Mode, SearchSink};

// The global allocator is the system's (glibc's). mimalloc, used before, cost about 10 % less
// CPU per event once batches reused their buffers, but it marks its arenas for transparent huge
// pages: with THP in `madvise` (or `always`) mode each 2 MiB region it touched became resident
// whole, and the benchmark's peak RSS was 92-119 MiB instead of 61-66 MiB with the same settings
// (README, "Consumer benchmark").

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match cli.config.as_deref().map(Options::from_file).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return usage(&e),
    };
    let settings = match Settings::from_options(cli.options.or(file), cli.command) {
        Ok(s) => s,
        Err(e) => return usage(&e),
    };
    telemetry::init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(try_main(cli.command, settings))
}

fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(2)
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    tracing::error!(error = %e, "Failed.");
    eprintln!("error: {e}");
    ExitCode::from(1)
}

async fn try_main(command: Command, settings: Settings) -> ExitCode {
    let metrics = match Metrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => return fail(&e),
    };
    let readiness = Readiness::default();
    let conditions: &[&str] = match command {
        Command::Index | Command::Reindex => &["kafka", "search"],
        Command::Notify | Command::ReplayDeadLetters => &["kafka"],
    };
    for condition in conditions {
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
    match command {
        Command::Notify => match notify::run(&settings, metrics, readiness, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::ReplayDeadLetters => match notify::replay(&settings, metrics, shutdown).await {
            Ok(n) => {
                println!("replayed {n} dead letter(s)");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Index => {
            let Some(search) = settings.search.as_ref() else {
                return usage(&"missing --search-url");
            };
            let mut sink = match SearchSink::new(
                search,
                Mode::Live,
                Arc::clone(&metrics),
                readiness.clone(),
            ) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            match sink.client().version().await {
                Ok(v) => {
                    readiness.set("search", true);
                    tracing::info!(url = %walrelay_common::options::without_userinfo(search.url.as_str()), server = %v, "Search service reachable.");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Search service not reachable yet; writes retry.")
                }
            }
            let runtime = match Runtime::new(
                &settings.runtime,
                &settings.runtime.group,
                metrics,
                readiness,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match runtime.run(&mut sink, &shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Reindex => match reindex::run(&settings, metrics, readiness, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e @ ReindexError::HistoryDeleted { .. }) => {
                tracing::error!(error = %e, "Refusing to re-index.");
                eprintln!("error: {e}");
                ExitCode::from(3)
            }
            Err(e) => fail(&e),
        },
    }
}
