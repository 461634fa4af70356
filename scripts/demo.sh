#!/usr/bin/env bash
# A local demo on a fresh machine: a throwaway Postgres cluster and tansu broker on free
# loopback ports, walrelay-producer streaming a sample table, sample writes, and the events
# printed as they arrive. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PG=/usr/lib/postgresql/15/bin
[ -x $PG/initdb ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15; }
tansu_bin="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
[ -x "$tansu_bin" ] || command -v tansu >/dev/null || cargo install tansu --locked --features libsql
command -v tansu >/dev/null && [ ! -x "$tansu_bin" ] && tansu_bin=$(command -v tansu)
cargo build --release -p walrelay-producer -p walrelay-tests --bins
BIN=target/release

work=$(mktemp -d /tmp/walrelay-demo-XXXX)
chmod 777 "$work"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(free_port); kafka_port=$(free_port)
cleanup() {
  kill "${producer_pid:-}" "${tail_pid:-}" "${tansu_pid:-}" 2>/dev/null || true
  as_pg $PG/pg_ctl -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== Postgres on 127.0.0.1:$pg_port (wal_level=logical)"
as_pg $PG/initdb -D "$work/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
as_pg $PG/pg_ctl -D "$work/data" -l "$work/pg.log" -w \
  -o "-p $pg_port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$work -c wal_level=logical" start >/dev/null
echo "== tansu broker on 127.0.0.1:$kafka_port"
"$tansu_bin" broker --listener-url "tcp://127.0.0.1:$kafka_port" --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
  --storage-engine "sqlite:///$work/tansu.db" >"$work/tansu.log" 2>&1 &
tansu_pid=$!
sleep 2

export WALRELAY_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export WALRELAY_KAFKA_BROKERS="127.0.0.1:$kafka_port"
psql_() { psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c "$1"; }
psql_ "CREATE TABLE customers (id bigint PRIMARY KEY, name text, tags text[], profile jsonb, joined timestamptz DEFAULT now());
       INSERT INTO customers (id, name, tags, profile) VALUES (1, 'Ada', '{vip}', '{\"tier\": 3}'), (2, 'Linus', '{}', null);"

echo "== walrelay-producer check / init / run"
$BIN/walrelay-producer check || true
$BIN/walrelay-producer init
$BIN/walrelay-producer run --metrics-addr 127.0.0.1:0 >"$work/producer.log" 2>&1 &
producer_pid=$!
$BIN/walrelay-tail "$WALRELAY_KAFKA_BROKERS" walrelay.events &
tail_pid=$!
sleep 4
echo "== sample writes"
psql_ "INSERT INTO customers (id, name) VALUES (3, 'Grace');
       UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1;
       DELETE FROM customers WHERE id = 2;"
sleep 3
$BIN/walrelay-producer status
echo "== stopping (SIGTERM: flush Kafka, confirm the final LSN)"
kill -TERM $producer_pid; wait $producer_pid || true
$BIN/walrelay-producer status
