#!/usr/bin/env bash
# The whole pipeline on one machine, from a fresh checkout:
#
#   Postgres ──▶ walrelay-producer ──▶ Apache Kafka ──▶ walrelay-consumer index  ──▶ OpenSearch
#                                                  └──▶ walrelay-consumer notify ──▶ a local receiver
#
# Installs what is missing (PostgreSQL 15, a Java 17 JDK, Maven, curl, python3), builds the
# binaries, starts a throwaway Postgres, a real Kafka broker (KRaft) and a real OpenSearch node
# (both from Maven Central, see tests/services/) on free loopback ports, the producer, the
# indexer and the notifier with a receiver that verifies every signature, makes sample writes
# (including a schema change), and shows: search hits for the changed rows, a webhook with its
# verified signature, the producer's status and the consumer groups' lag. Exits 0 when every
# step worked, 1 naming the step that failed; everything is torn down on exit.
#
#   scripts/demo.sh           run the demo and tear it down
#   scripts/demo.sh --keep    leave everything running and print URLs and commands to poke at it
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

keep=false
for a in "$@"; do
  case "$a" in
    --keep) keep=true ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown option $a (use --keep or --help)" >&2; exit 2 ;;
  esac
done

step_name="starting"
step() { step_name="$1"; printf '\n\033[1m== %s\033[0m\n' "$1"; }
fail() { echo "demo FAILED at step \"$step_name\": $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -ne 0 ] && echo "demo FAILED at step \"$step_name\" (exit $rc)" >&2' ERR

step "install what is missing"
PG=/usr/lib/postgresql/15/bin
need=()
[ -x $PG/initdb ] || need+=(postgresql-15)
command -v psql >/dev/null || need+=(postgresql-client-15)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
{ command -v java >/dev/null && java -version 2>&1 | grep -q 'version "17'; } || need+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need+=(maven)
{ command -v cc >/dev/null && command -v make >/dev/null; } || need+=(build-essential)
{ [ -f /usr/include/openssl/ssl.h ] && command -v pkg-config >/dev/null; } || need+=(libssl-dev pkg-config)
if [ ${#need[@]} -gt 0 ]; then
  echo "apt-get install ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres

step "build walrelay (release)"
cargo build --release -p walrelay-producer -p walrelay-consumer 2>&1 | grep -E '^(error|warning: unused)|Finished' || true
BIN=$root/target/release
[ -x $BIN/walrelay-producer ] && [ -x $BIN/walrelay-consumer ] || fail "the build did not produce the binaries"

work=$(mktemp -d /tmp/walrelay-demo-XXXX)
chmod 755 "$work"
pids=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash tests/services/opensearch/opensearch.sh stop --dir "$work/opensearch" >/dev/null 2>&1 || true
  bash tests/services/kafka/kafka.sh stop --dir "$work/kafka" >/dev/null 2>&1 || true
  as_pg $PG/pg_ctl -D "$work/pgrun/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
$keep || trap cleanup EXIT

step "start Postgres, Kafka and OpenSearch"
pg_port=$(free_port)
# The server runs as postgres (initdb refuses root): its data and log live in a folder it owns.
mkdir -p "$work/pgrun"
[ "$(id -u)" = 0 ] && chown postgres "$work/pgrun"
as_pg $PG/initdb -D "$work/pgrun/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg $PG/pg_ctl -D "$work/pgrun/data" -l "$work/pgrun/pg.log" -w \
  -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp -c wal_level=logical" start >/dev/null \
  || fail "Postgres did not start: $(tail -5 "$work/pgrun/pg.log")"
echo "Postgres   127.0.0.1:$pg_port"
# Kafka and OpenSearch start side by side; each prints progress dots on stderr.
bash tests/services/kafka/kafka.sh start --dir "$work/kafka" >"$work/kafka.out" &
kafka_start=$!
bash tests/services/opensearch/opensearch.sh start --dir "$work/opensearch" >"$work/opensearch.out" &
os_start=$!
wait $kafka_start || fail "Kafka did not start (log: $work/kafka)"
wait $os_start || fail "OpenSearch did not start (log: $work/opensearch)"
brokers=$(cat "$work/kafka.out")
search=$(cat "$work/opensearch.out")
echo
echo "Kafka      $brokers"
echo "OpenSearch $search"

export WALRELAY_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export WALRELAY_KAFKA_BROKERS="$brokers"
export WALRELAY_TOPIC=walrelay.events
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "$1"; }
psql_ "CREATE TABLE customers (id bigint PRIMARY KEY, name text, tags text[], profile jsonb, joined timestamptz DEFAULT now());
       CREATE TABLE orders (id bigint PRIMARY KEY, customer bigint REFERENCES customers, total numeric(10,2), state text);
       INSERT INTO customers (id, name, tags, profile) VALUES
         (1, 'Ada', '{vip}', '{\"tier\": 3}'), (2, 'Linus', '{}', null), (3, 'Barbara', '{}', null);
       INSERT INTO orders VALUES (100, 1, 42.50, 'new');"

step "walrelay-producer check, init, run"
$BIN/walrelay-producer check || fail "preflight check failed"
$BIN/walrelay-producer init
producer_metrics=$(free_port)
$BIN/walrelay-producer --topic-partitions 3 --partition-key primary-key \
  --metrics-addr 127.0.0.1:$producer_metrics run >"$work/producer.log" 2>&1 &
pids+=($!)

step "walrelay-consumer index (OpenSearch) and notify (webhooks)"
indexer_metrics=$(free_port)
$BIN/walrelay-consumer --search-url "$search" --group walrelay-demo-indexer \
  --metrics-addr 127.0.0.1:$indexer_metrics index >"$work/indexer.log" 2>&1 &
pids+=($!)
token="demo-token-$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
secret="whsec_$(python3 -c 'import base64, os; print(base64.b64encode(os.urandom(24)).decode())')"
api_port=$(free_port)
receiver_port=$(free_port)
# The receiver verifies each Standard Webhooks signature with its own HMAC code.
cat >"$work/receiver.py" <<'PY'
import base64, hashlib, hmac, http.server, json, sys
port, secret, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
key = base64.b64decode(secret.removeprefix("whsec_"))
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        wid, ts = self.headers.get("webhook-id", ""), self.headers.get("webhook-timestamp", "")
        mac = hmac.new(key, f"{wid}.{ts}.".encode() + body, hashlib.sha256).digest()
        expected = "v1," + base64.b64encode(mac).decode()
        ok = any(hmac.compare_digest(s, expected) for s in self.headers.get("webhook-signature", "").split(" "))
        with open(out, "a") as f:
            f.write(json.dumps({"webhook-id": wid, "signature_verified": ok, "event": json.loads(body)}) + "\n")
        self.send_response(200 if ok else 401); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
PY
python3 "$work/receiver.py" "$receiver_port" "$secret" "$work/webhooks.jsonl" &
pids+=($!)
$BIN/walrelay-consumer --postgres-url "$WALRELAY_POSTGRES_URL" --group walrelay-demo-notifier \
  --api-addr 127.0.0.1:$api_port --api-token "$token" --allow-targets 127.0.0.1 notify >"$work/notifier.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$api_port/v1/subscriptions"
for _ in $(seq 100); do curl -sf -H "Authorization: Bearer $token" "$api" >/dev/null && break; sleep 0.2; done
curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' \
  -d "{\"url\":\"http://127.0.0.1:$receiver_port/hook\",\"schema\":\"public\",\"table\":\"orders\",\"ops\":[\"c\",\"u\"],\"secret\":\"$secret\"}" \
  "$api" >/dev/null || fail "the subscriptions API refused the subscription (log: $work/notifier.log)"
echo "subscribed a receiver on 127.0.0.1:$receiver_port to new and updated orders"

step "wait for the snapshot to reach the index"
for _ in $(seq 300); do
  n=$(curl -s "$search/public.customers/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count",0))' 2>/dev/null || echo 0)
  [ "$n" = 3 ] && break; sleep 0.2
done
[ "$n" = 3 ] || fail "public.customers holds $n documents, expected 3 (logs: $work/*.log)"
echo "public.customers: 3 documents"

step "sample writes, including a schema change"
psql_ "UPDATE customers SET name = 'Ada Lovelace', tags = '{vip,pioneer}' WHERE id = 1;
       DELETE FROM customers WHERE id = 2;
       ALTER TABLE customers ADD COLUMN city text;
       INSERT INTO customers (id, name, city) VALUES (4, 'Grace Hopper', 'Arlington');
       UPDATE customers SET city = 'London' WHERE id = 1;
       INSERT INTO orders VALUES (101, 4, 1843.00, 'new');
       UPDATE orders SET state = 'paid' WHERE id = 100;"
psql -X -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "TABLE customers ORDER BY id"

step "search OpenSearch for the changed rows"
query='{"query":{"query_string":{"query":"name:(lovelace OR hopper) OR city:*"}},"_source":{"excludes":["walrelay_version","walrelay_seq","walrelay_partition"]}}'
hits=0
for _ in $(seq 150); do
  curl -s -X POST "$search/public.customers/_refresh" >/dev/null
  res=$(curl -s -H 'content-type: application/json' "$search/public.customers/_search" -d "$query")
  hits=$(printf '%s' "$res" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(1 for h in d["hits"]["hits"] if h["_source"].get("city")))' 2>/dev/null || echo 0)
  count=$(curl -s "$search/public.customers/_count" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("count",0))' 2>/dev/null || echo 0)
  [ "$hits" = 2 ] && [ "$count" = 3 ] && break; sleep 0.2
done
echo "GET $search/public.customers/_search  $query"
printf '%s' "$res" | python3 -c "$(cat <<'PY'
import json, sys
d = json.load(sys.stdin)
for h in d["hits"]["hits"]:
    src = json.dumps(h["_source"], sort_keys=True)
    print(f"  hit _id={h['_id']}  {src}")
PY
)"
[ "$hits" = 2 ] && [ "$count" = 3 ] || fail "expected the 2 changed customers with a city among 3 documents, got $hits of $count (log: $work/indexer.log)"
echo "mapping of the new column: $(curl -s "$search/public.customers/_mapping/field/city" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps(next(iter(d.values()))["mappings"]["city"]["mapping"]))')"

step "the webhooks the receiver got"
for _ in $(seq 150); do
  [ -f "$work/webhooks.jsonl" ] && [ "$(wc -l <"$work/webhooks.jsonl")" -ge 3 ] && break; sleep 0.2
done
[ -f "$work/webhooks.jsonl" ] || fail "the receiver got no webhook (log: $work/notifier.log)"
python3 - "$work/webhooks.jsonl" <<'PY' || fail "a webhook is missing or its signature did not verify"
import json, sys
seen = [json.loads(l) for l in open(sys.argv[1])]
for d in seen:
    e = d["event"]
    print(f'  {d["webhook-id"]}  signature verified: {d["signature_verified"]}  op={e["op"]} {e["source"]["table"]} after={json.dumps(e.get("after"), sort_keys=True)}')
ops = sorted((d["event"]["op"], (d["event"].get("after") or {}).get("id")) for d in seen)
assert all(d["signature_verified"] for d in seen), "a signature did not verify"
for want in [("c", 101), ("u", 100)]:
    assert want in ops, f"no webhook for {want}: {ops}"
PY

step "walrelay-producer status"
$BIN/walrelay-producer status || fail "status failed"

step "consumer group lag"
for g in walrelay-demo-indexer walrelay-demo-notifier; do
  bash tests/services/kafka/kafka.sh tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    --bootstrap-server "$brokers" --describe --group "$g" 2>/dev/null | sed '/^$/d' || fail "could not describe group $g"
done

printf '\n\033[1mdemo passed\033[0m: Postgres → walrelay-producer → Kafka → OpenSearch and webhooks.\n'
if $keep; then
  cat <<EOF

Everything is still running (work folder $work):
  Postgres    psql -h 127.0.0.1 -p $pg_port -U postgres postgres
  Kafka       $brokers
  OpenSearch  $search   e.g. curl '$search/public.customers/_search?q=name:ada&pretty'
  metrics     http://127.0.0.1:$producer_metrics/metrics (producer), http://127.0.0.1:$indexer_metrics/metrics (indexer)
  webhooks    tail -f $work/webhooks.jsonl ; API $api (token $token)
  logs        $work/*.log
  status      WALRELAY_POSTGRES_URL=$WALRELAY_POSTGRES_URL $BIN/walrelay-producer status
  lag         bash tests/services/kafka/kafka.sh tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server $brokers --describe --all-groups
Stop it all:  kill ${pids[*]}; bash tests/services/opensearch/opensearch.sh stop --dir $work/opensearch; bash tests/services/kafka/kafka.sh stop --dir $work/kafka; runuser -u postgres -- $PG/pg_ctl -D $work/pgrun/data stop
EOF
fi
