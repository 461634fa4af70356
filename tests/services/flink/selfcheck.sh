#!/usr/bin/env bash
# selfcheck.sh: end-to-end check of flink.sh against real servers on
# loopback: starts Kafka (kafka.sh) and the registry (registry.sh) in a
# temporary folder, produces walrelay-shaped change events with
# selfcheck.py (in a throwaway venv with confluent-kafka and fastavro from
# PyPI), runs `flink.sh run` on each topic and compares its stdout with the
# table the history leaves. Also checks that a record Flink cannot parse
# fails the run. Stops everything and removes the folder on exit.
#
#   selfcheck.sh [--keep]      (--keep: leave the temporary folder)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SERVICES="$(dirname "$HERE")"
K="$SERVICES/kafka/kafka.sh"
R="$SERVICES/registry/registry.sh"
F="$HERE/flink.sh"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1

WORK="$(mktemp -d /tmp/flink-selfcheck.XXXXXX)"
cleanup() {
  bash "$K" stop --dir "$WORK/kafka" >/dev/null 2>&1 || true
  bash "$R" stop --dir "$WORK/registry" >/dev/null 2>&1 || true
  if ((KEEP)); then echo "selfcheck: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

log() { echo "selfcheck: $*" >&2; }
FAILED=0
PASSED=0

bash "$F" install >/dev/null
log "venv with confluent-kafka and fastavro ..."
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q confluent-kafka fastavro >&2
PY="$WORK/venv/bin/python"

B="$(bash "$K" start --dir "$WORK/kafka")"
U="$(bash "$R" start --dir "$WORK/registry")"
for t in items-json items-avro items-avro-millis items-corrupt; do
  bash "$K" tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$B" \
    --create --topic "$t" --partitions 2 >/dev/null
done

# check NAME TOPIC EXPECTED_FILE FLINK_RUN_ARGS...
check() {
  local name="$1" topic="$2" expected="$3"; shift 3
  local started=$SECONDS rc=0
  bash "$F" run --bootstrap "$B" --topic "$topic" --primary-key id --timeout-seconds 180 "$@" \
    >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
  if ((rc == 0)) && diff -u "$expected" "$WORK/$name.out" >&2; then
    log "ok   $name ($((SECONDS - started)) s)"
    PASSED=$((PASSED + 1))
  else
    log "FAIL $name (exit $rc, $((SECONDS - started)) s); stderr:"
    grep -v '^\s*at \|^\s*\.\.\. [0-9]* more' "$WORK/$name.err" | tail -n 20 >&2
    FAILED=$((FAILED + 1))
  fi
}

"$PY" "$HERE/selfcheck.py" json "$B" items-json >"$WORK/json.expected"
check debezium-json items-json "$WORK/json.expected" --format debezium-json \
  --columns 'id BIGINT, name STRING, price DECIMAL(10,2), updated TIMESTAMP(6)' \
  --option debezium-json.timestamp-format.standard=ISO-8601

"$PY" "$HERE/selfcheck.py" avro "$B" items-avro "$U" >"$WORK/avro.expected"
check debezium-avro-confluent items-avro "$WORK/avro.expected" \
  --format debezium-avro-confluent --registry-url "$U" \
  --columns 'id BIGINT, name STRING, price DECIMAL(10,2), updated BIGINT'

"$PY" "$HERE/selfcheck.py" avro-millis "$B" items-avro-millis "$U" >"$WORK/avro-millis.expected"
check debezium-avro-confluent-millis items-avro-millis "$WORK/avro-millis.expected" \
  --format debezium-avro-confluent --registry-url "$U" \
  --columns 'id BIGINT, name STRING, price DECIMAL(10,2), updated TIMESTAMP(3)'

# A record Flink cannot read must fail the run (exit 1, reason on stderr).
printf '%s\n' '{"op":"c","before":null,"after":{"id":"not a number"}}' \
  | bash "$K" tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$B" --topic items-corrupt
rc=0
bash "$F" run --bootstrap "$B" --topic items-corrupt --format debezium-json --primary-key id \
  --columns 'id BIGINT, name STRING' >"$WORK/corrupt.out" 2>"$WORK/corrupt.err" || rc=$?
if ((rc == 1)) && grep -q 'Corrupt Debezium JSON message' "$WORK/corrupt.err" && [[ ! -s "$WORK/corrupt.out" ]]; then
  log "ok   corrupt record fails the run"
  PASSED=$((PASSED + 1))
else
  log "FAIL corrupt record: exit $rc, stdout: $(head -c 300 "$WORK/corrupt.out")"
  FAILED=$((FAILED + 1))
fi

echo "$PASSED passed, $FAILED failed"
((FAILED == 0))
