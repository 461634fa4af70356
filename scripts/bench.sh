#!/usr/bin/env bash
# Benchmark harness: figures and ratios (see tests/src/bin/walrelay-bench.rs). Options:
# --rows N (1000000) --big-rows N (5000000) --rate ROWS_PER_S (10000) --seconds S (10) --buffer SIZE (64MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/walrelay-bench "$@"
