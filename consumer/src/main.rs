//! `walrelay-consumer`: builds the command's settings and runs it (see [`walrelay_consumer::cli`]).
//!
//! Exit codes: 0 success; 1 runtime failure; 2 a bad option or config file; 3 `reindex`
//! refused because the topic's history was deleted.

use std::process::ExitCode;

use clap::Parser;
use walrelay_common::telemetry;
use walrelay_consumer::cli::{self, Cli};

// The global allocator is the system's (glibc's). mimalloc, used before, cost about 10 % less
// CPU per event once batches reused their buffers, but it marks its arenas for transparent huge
// pages: with THP in `madvise` (or `always`) mode each 2 MiB region it touched became resident
// whole, and the benchmark's peak RSS was 92-119 MiB instead of 61-66 MiB with the same settings
// (README, "Consumer benchmark").

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::command_first(std::env::args_os().collect()));
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(settings.shared().log_format);
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(cli::run(settings)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}
