#!/usr/bin/env bash
# The chaos suite (issue 19; README "Chaos suite"): one reproducible run of the whole pipeline
# on real servers (Postgres 15, a 3-node Kafka cluster, OpenSearch, a target Postgres) under a
# seeded fault schedule, checked against Postgres by tests/src/chaos/checker.rs.
#
#   scripts/chaos.sh [--minutes N] [--seed S] [--out DIR] [--intensity X] [--big-rows N]
#                    [--debug] [--broken]
#
# --minutes 5 is the short profile (CI: 0.6 of the full rates, a 20k-row big transaction);
# --minutes 60 the full one (>= 200 producer kills, >= 50 kills of each consumer, >= 10 Kafka
# leader kills, >= 20 immediate Postgres restarts, network faults on every link through TCP
# fault proxies, 60 s Kafka blackouts, OpenSearch answering 429/503, a 1M-row transaction).
# A real Prometheus scrapes every process with the repository's config and rules; the report
# lists which alerts fired during which faults (judged in the full profile) and whether every
# dashboard query returned series; a last phase invalidates a slot (max_slot_wal_keep_size)
# and checks that the producer stops with the way out. The seed fixes the
# fault schedule (default: from the clock; the report names it). The report is printed and
# written as report.md and report.json under --out (default target/chaos/seed-S-<time>/,
# with every process's log under logs/). Exit 0 on a pass, 1 on a failure.
#
# --debug uses the debug build (what `cargo test` already built) instead of release.
# --broken runs the same suite against a producer built from a scratch copy of this tree
#   patched to confirm the LSN to Postgres before Kafka acknowledged the transaction
#   (producer/src/checkpoint.rs: a committed transaction counts as complete without its
#   acks). The run must FAIL (missing events); the script exits with the run's status, so
#   a zero exit under --broken means the suite missed the bug.
#
# Builds into $CARGO_TARGET_DIR when set (else target/).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
broken=0
args=()
while (($#)); do
  case "$1" in
    --debug) profile=debug; shift ;;
    --broken) broken=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
flags=()
[ "$profile" = release ] && flags=(--release)
target="${CARGO_TARGET_DIR:-$PWD/target}"
bin="$target/$profile"

cargo build "${flags[@]}" -p walrelay-producer -p walrelay-consumer -p walrelay-tests --bins

# Three broker JVMs, OpenSearch and two Postgres clusters share the machine: small heaps.
export WALRELAY_KAFKA_JAVA_OPTS="${WALRELAY_KAFKA_JAVA_OPTS:--Xms320m -Xmx320m}"

producer=()
if ((broken)); then
  scratch="$target/chaos-broken/src"
  broken_target="$target/chaos-broken/target"
  echo "chaos.sh --broken: a scratch copy in $scratch, patched to confirm before Kafka's ack" >&2
  rm -rf "$scratch"
  mkdir -p "$scratch"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$scratch"
  ckpt="$scratch/producer/src/checkpoint.rs"
  # The rule is "confirm the newest transaction whose events, and all earlier ones, Kafka
  # acknowledged"; the patch drops "acknowledged": a committed transaction is complete.
  sed -i 's/if front.sent != Some(front.acked) {/if front.sent.is_none() {/' "$ckpt"
  grep -q 'if front.sent.is_none() {' "$ckpt" \
    || { echo "chaos.sh: the patch no longer applies to $ckpt; update it" >&2; exit 2; }
  # Seeded from the good build so that only walrelay's own crates compile again.
  if [ ! -d "$broken_target/$profile" ]; then
    mkdir -p "$broken_target"
    cp -a "$bin" "$broken_target/$profile"
  fi
  (cd "$scratch" && CARGO_TARGET_DIR="$broken_target" cargo build "${flags[@]}" -p walrelay-producer --bin walrelay-producer)
  producer=(--producer-bin "$broken_target/$profile/walrelay-producer")
fi

status=0
"$bin/walrelay-chaos" "${producer[@]}" "${args[@]}" || status=$?
if ((broken)); then
  if ((status == 0)); then
    echo "chaos.sh --broken: the run PASSED against a producer that confirms before Kafka's ack: the suite missed it" >&2
  else
    echo "chaos.sh --broken: the run failed (exit $status), as it must against that producer" >&2
  fi
fi
exit "$status"
