#!/usr/bin/env bash
# Stream gateway benchmark: figures (see tests/src/bin/walrelay-bench-stream.rs). Options:
# --events N (300000), --connections N (100), --max-unacked N (1000), --ack-every N (250).
# Builds into $CARGO_TARGET_DIR when set (else target/).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p walrelay-consumer -p walrelay-tests --bins
exec "${CARGO_TARGET_DIR:-target}/release/walrelay-bench-stream" "$@"
