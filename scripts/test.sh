#!/usr/bin/env bash
# Runs walrelay's whole test suite on a fresh machine: installs what is missing (PostgreSQL 15
# server binaries, curl, a C toolchain, python3 with pip, the tansu broker), checks deploy/
# (scripts/check-deploy.sh), then `cargo test --workspace`. Tests start their own
# Postgres clusters and brokers on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v curl >/dev/null || need_apt+=(curl)
# librdkafka, ring and mimalloc are compiled from C sources by their crates.
{ command -v cc >/dev/null && command -v make >/dev/null; } || need_apt+=(build-essential)
command -v perl >/dev/null || need_apt+=(perl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# A root session runs the servers as the postgres user, which must exist.
id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres

tansu_bin="${TANSU_BIN:-$HOME/.cargo/bin/tansu}"
if ! [ -x "$tansu_bin" ] && ! command -v tansu >/dev/null; then
  echo "installing tansu (a Kafka-compatible broker; about 13 minutes the first time)"
  cargo install tansu --locked --features libsql
fi

# deploy/ and compose.yaml: promtool, Kubernetes schemas, compose structure.
bash scripts/check-deploy.sh

cargo test --workspace "$@"
