#!/usr/bin/env bash
# Postgres target benchmark: figures (see tests/src/bin/walrelay-bench-replicate.rs). Options:
# --rows N (1000000), --rate N rows/s (5000), --seconds N (20).
# Builds into $CARGO_TARGET_DIR when set (else target/).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p walrelay-consumer -p walrelay-producer -p walrelay-tests --bins
exec "${CARGO_TARGET_DIR:-target}/release/walrelay-bench-replicate" "$@"
