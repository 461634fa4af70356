#!/usr/bin/env bash
# smoke.sh: end-to-end check of registry.sh with curl. Starts a registry in a
# fresh folder, registers an Avro record schema under subject t-value, fetches
# it by id, registers a compatible new version, tries an incompatible one
# (BACKWARD), prints every exchange (status and body), stops the registry.
# Exits 1 if an answer is not the one recorded in README.md.
#
#   smoke.sh [DIR]      (default: a new temporary folder, removed at the end)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REG="$HERE/registry.sh"
if (($#)); then DIR="$1"; KEEP=1; else DIR="$(mktemp -d)"; KEEP=0; fi

cleanup() {
  bash "$REG" stop --dir "$DIR" || true
  ((KEEP)) || rm -rf "$DIR"
}
trap cleanup EXIT

bash "$REG" install >/dev/null
t0=$(date +%s.%N)
URL="$(bash "$REG" start --dir "$DIR")"
t1=$(date +%s.%N)
PID="$(cat "$DIR/registry.pid")"
echo "started in $(python3 -c "print(round($t1 - $t0, 1))") s: $URL (pid $PID)"

CT='Content-Type: application/vnd.schemaregistry.v1+json'
FAILED=0
# call EXPECTED_STATUS EXPECTED_BODY_PART METHOD PATH [JSON]
call() {
  local want="$1" part="$2" method="$3" path="$4" data="${5:-}" out status body
  if [[ -n "$data" ]]; then
    out="$(curl -s -w '\n%{http_code}' -X "$method" -H "$CT" --data "$data" "$URL$path")"
  else
    out="$(curl -s -w '\n%{http_code}' -X "$method" "$URL$path")"
  fi
  status="${out##*$'\n'}"
  body="${out%$'\n'*}"
  echo "$method $path -> $status $body"
  if [[ "$status" != "$want" || "$body" != *"$part"* ]]; then
    echo "  ^ expected $want and a body containing: $part"
    FAILED=1
  fi
}

# One Avro record, as a Confluent client sends it: {"schema": "<json text>"}.
avro() {
  python3 -c 'import json, sys; c = (",", ":"); print(json.dumps({"schema": json.dumps(json.loads(sys.argv[1]), separators=c)}, separators=c))' "$1"
}
V1="$(avro '{"type":"record","name":"Row","namespace":"walrelay","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"}]}')"
# Compatible under BACKWARD: a new optional field with a default.
V2="$(avro '{"type":"record","name":"Row","namespace":"walrelay","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"},{"name":"note","type":["null","string"],"default":null}]}')"
# Incompatible under BACKWARD: a new field without a default.
V3="$(avro '{"type":"record","name":"Row","namespace":"walrelay","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"},{"name":"note","type":["null","string"],"default":null},{"name":"qty","type":"int"}]}')"

call 200 '[]' GET /subjects
call 200 '"id":1' POST /subjects/t-value/versions "$V1"
call 200 '"name\":\"Row\"' GET /schemas/ids/1
call 200 '"version":1' POST /subjects/t-value "$V1"
call 200 '"is_compatible":true' POST /compatibility/subjects/t-value/versions/latest "$V2"
call 200 '"id":2' POST /subjects/t-value/versions "$V2"
call 200 '"is_compatible":false' POST /compatibility/subjects/t-value/versions/latest "$V3"
call 409 'Incompatible artifact' POST /subjects/t-value/versions "$V3"
call 200 '[1,2]' GET /subjects/t-value/versions
call 200 '"version":2' GET /subjects/t-value/versions/latest
call 200 '["t-value"]' GET /subjects
# The same schema under another subject keeps its id (Confluent does too).
call 200 '"id":1' POST /subjects/other-value/versions "$V1"
call 404 '"error_code":40403' GET /schemas/ids/99
call 404 '"error_code":40401' GET /subjects/nope/versions
call 200 '"compatibilityLevel":"NONE"' GET /config
call 200 '"compatibility":"BACKWARD"' PUT /config '{"compatibility":"BACKWARD"}'
call 200 '"compatibilityLevel":"BACKWARD"' GET /config

echo "rss: $(($(ps -o rss= -p "$PID") / 1024)) MiB"
if ((FAILED)); then echo "smoke: FAILED"; exit 1; fi
echo "smoke: all answers as recorded"
