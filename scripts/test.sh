#!/usr/bin/env bash
# Runs walrelay's whole test suite on a fresh machine: installs what is missing (PostgreSQL 15
# server binaries, curl, a C toolchain, OpenSSL headers, python3 with pip, a Java 17 JDK and
# Maven), resolves the real servers the tests run against from Maven Central (Apache Kafka,
# OpenSearch: see tests/services/), checks deploy/ (scripts/check-deploy.sh), runs the gates
# (rustfmt, no import cycles, clippy with warnings denied, rustdoc links), then `cargo test --workspace`.
# Tests start their own Postgres clusters, and one Kafka broker and one OpenSearch node per test
# binary, on free loopback ports. Debian's Prometheus is unpacked (not installed) for the tests
# that scrape the binaries with deploy/prometheus's config.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v curl >/dev/null || need_apt+=(curl)
# librdkafka and ring are compiled from C sources by their crates.
{ command -v cc >/dev/null && command -v make >/dev/null; } || need_apt+=(build-essential)
command -v perl >/dev/null || need_apt+=(perl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# Kafka 4 and OpenSearch 2.19 run on Java 17; Maven resolves them.
{ command -v java >/dev/null && java -version 2>&1 | grep -q 'version "17'; } || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || need_apt+=(maven)
# librdkafka is built with OpenSSL (SSL and SASL_SSL listeners, SCRAM).
{ [ -f /usr/include/openssl/ssl.h ] && command -v pkg-config >/dev/null; } || need_apt+=(libssl-dev pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
# The gates need rustfmt and clippy (a minimal Rust toolchain has neither).
if ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
# A root session runs the servers as the postgres user, which must exist.
id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql postgres

# The real servers, resolved once per machine (cached under ~/.cache/walrelay and ~/.m2).
echo "resolving Apache Kafka, OpenSearch, Apicurio Registry and Flink from Maven Central, and a Python venv (cached after the first run)"
bash tests/services/kafka/kafka.sh install >/dev/null
bash tests/services/opensearch/opensearch.sh install >/dev/null
# Avro (issue 15): a real schema registry (Apicurio, built from Maven Central), Python's
# confluent-kafka and fastavro (a venv from PyPI), and Apache Flink's Debezium formats.
bash tests/services/registry/registry.sh install >/dev/null
bash tests/services/python/python.sh install >/dev/null
bash tests/services/flink/flink.sh install >/dev/null
# The live view's browser test (issue 16): Debian's chromium and a small venv.
bash tests/services/browser/browser.sh install >/dev/null
# A real Prometheus running deploy/prometheus's config and rules (Debian's package, unpacked;
# check-deploy.sh's promtool comes from the same copy).
bash tests/services/prometheus/prometheus.sh install >/dev/null

# deploy/ and compose.yaml: promtool, Kubernetes schemas, compose structure.
bash scripts/check-deploy.sh

# Gates: formatting, lints (the workspace's [lints] plus clippy's defaults, warnings denied),
# and the crate docs with their intra-doc links.
cargo fmt --all -- --check
# No module imports another that imports it back (CONTRIBUTING.md).
python3 scripts/check-cycles.py producer/src consumer/src common/src tests/src
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D rustdoc::broken_intra_doc_links" cargo doc --workspace --no-deps --quiet
# The fuzz targets (their own workspace) still compile; scripts/fuzz.sh runs them.
cargo check --quiet --manifest-path fuzz/Cargo.toml

cargo test --workspace "$@"

# The chaos suite's short profile (issue 19; README "Chaos suite"): five minutes of faults
# against the debug build just tested, with a fixed seed so that a failure can be replayed.
bash scripts/chaos.sh --minutes 5 --seed 19 --debug
