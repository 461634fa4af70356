#!/usr/bin/env bash
# Consumer benchmark harness: figures (see tests/src/bin/walrelay-bench-consumer.rs). Options:
# --events N (1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec target/release/walrelay-bench-consumer "$@"
