#!/usr/bin/env bash
# Benchmark harness: figures and ratios (see tests/src/bin/walrelay-bench.rs). Options:
# --rows N (1000000) --txn-rows N (1000) --big-rows N (5000000) --rate ROWS_PER_S (10000)
# --seconds S (10) --buffer SIZE (64MiB) --only mock|kafka --keying schema|primary-key
# --delivery at-least-once|exactly-once (both) --format json|avro (JSON and Avro under at-least-once) --pk-partitions N (8) --kafka-property KEY=VALUE (repeatable; stream and latency producers)
# --skip-snapshot --skip-latency --skip-memory. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/release/walrelay-bench" "$@"
