#!/usr/bin/env bash
# Consumer benchmark harness: figures (see tests/src/bin/walrelay-bench-consumer.rs). Options:
# --events N (1000000), --repeat N (1), --skip-discard, --skip-real (no OpenSearch node),
# --mock-kafka (librdkafka's mock cluster instead of a real Kafka node), --consumer-arg ARG,
# --consumer-env KEY=VALUE.
# Builds into $CARGO_TARGET_DIR when set (else target/).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/release/walrelay-bench-consumer" "$@"
