#!/usr/bin/env bash
# selfcheck.sh: end-to-end check of decode.py against a real Kafka broker
# (tests/services/kafka) and a real Apicurio registry (tests/services/registry):
# starts both in a temporary folder, runs selfcheck.py (produce with
# confluent-kafka's AvroSerializer, decode with decode.py, compare with the
# canonical JSON written by hand), stops both and removes the folder.
# Exit 0 when every check passed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES="$(dirname "$HERE")"
KAFKA="$SERVICES/kafka/kafka.sh"
REGISTRY="$SERVICES/registry/registry.sh"
PY="$HERE/python.sh"

log() { echo "selfcheck.sh: $*" >&2; }

bash "$PY" install >/dev/null
bash "$REGISTRY" install >/dev/null
bash "$KAFKA" install >/dev/null

WORK="$(mktemp -d /tmp/walrelay-pyavro.XXXXXX)"
cleanup() {
  bash "$KAFKA" stop --dir "$WORK/kafka" >/dev/null 2>&1 || true
  bash "$REGISTRY" stop --dir "$WORK/reg" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BOOTSTRAP="$(bash "$KAFKA" start --dir "$WORK/kafka")"
URL="$(bash "$REGISTRY" start --dir "$WORK/reg")"
log "kafka $BOOTSTRAP, registry $URL"
bash "$PY" python "$HERE/selfcheck.py" --bootstrap "$BOOTSTRAP" --registry-url "$URL"
