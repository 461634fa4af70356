#!/usr/bin/env bash
# flink.sh: a small Apache Flink test harness for walrelay: reads one Kafka
# topic of Debezium-shaped change events with Flink SQL's 'debezium-json' or
# 'debezium-avro-confluent' format (a local mini-cluster inside one JVM) and
# prints the table that the changelog materializes. Built from artifacts on
# Maven Central.
#
#   flink.sh install
#       Compile the harness (src/ beside this script) and collect the Flink
#       jars named in pom.xml into
#       ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/flink-<version>/lib
#       and print that folder. Runs Maven only once: later calls are instant
#       and work offline.
#
#   flink.sh run --bootstrap HOST:PORT --topic T
#                --format debezium-json|debezium-avro-confluent
#                [--registry-url URL] --columns 'id BIGINT, name STRING, ...'
#                --primary-key COL[,COL...] [--timeout-seconds N (120)]
#                [--parallelism N (1)] [--option key=value]...
#       The harness in the foreground (execs the JVM): reads the topic from
#       the earliest to the latest offset (read_committed), applies the
#       changelog rows (+I -U +U -D) by primary key, prints the final rows as
#       JSON objects sorted by key, one a line, then {"rows":N}. Exit 0 on
#       success, 1 on any Flink error (on stderr; a record Flink cannot read
#       is one), 2 on bad arguments, 3 on timeout. --option adds or
#       overrides a table option (e.g. debezium-json.timestamp-format.standard=ISO-8601).
#
# Only the `install` and `run` results go to stdout; progress and logs go to
# stderr (the harness logs only errors).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
POM="$HERE/pom.xml"
LOG4J_CONFIG="$HERE/log4j2.properties"
FLINK_VERSION="$(sed -n 's:.*<flink.version>\(.*\)</flink.version>.*:\1:p' "$POM")"
SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
INSTALL_DIR="$SERVICES_HOME/flink-$FLINK_VERSION"
LIB_DIR="$INSTALL_DIR/lib"
HARNESS_JAR="flink-harness-1.jar"
MAIN_CLASS="dev.walrelay.flinkharness.ChangelogHarness"
JAVA="${JAVA:-java}"

log() { echo "flink.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- install ---

# The marker holds a checksum of pom.xml and of the harness's sources:
# editing either rebuilds.
build_sum() {
  (cd "$HERE" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
    | sha256sum | cut -d' ' -f1
}

installed() {
  [[ -f "$INSTALL_DIR/.installed" && "$(cat "$INSTALL_DIR/.installed")" == "$(build_sum)" ]]
}

cmd_install() {
  [[ -n "$FLINK_VERSION" ]] || die "no <flink.version> in $POM"
  if ! installed; then
    mkdir -p "$INSTALL_DIR"
    # Serialise concurrent installs (parallel test processes).
    exec 9>"$INSTALL_DIR/.lock"
    flock 9
    if ! installed; then
      log "building the Flink $FLINK_VERSION harness from Maven artifacts into $LIB_DIR ..."
      # Maven writes target/ beside the pom: build in the cache, not in the
      # repository.
      local build="$INSTALL_DIR/build"
      rm -rf "$build"
      mkdir -p "$build"
      cp -r "$POM" "$HERE/src" "$build/"
      # Maven's own output is progress: to stderr, without the colour codes
      # that Debian's Maven 3.8 prints even in batch mode.
      (cd "$build" && mvn -B -q package dependency:copy-dependencies \
          -DoutputDirectory=target/lib -DincludeScope=runtime) 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' >&2 \
        || die "mvn failed to build the harness (build folder kept: $build)"
      [[ -f "$build/target/$HARNESS_JAR" && -f "$build/target/lib/flink-runtime-$FLINK_VERSION.jar" ]] \
        || die "mvn finished but $HARNESS_JAR or flink-runtime-$FLINK_VERSION.jar is missing"
      mv "$build/target/$HARNESS_JAR" "$build/target/lib/"
      rm -rf "$LIB_DIR"
      mv "$build/target/lib" "$LIB_DIR"
      rm -rf "$build"
      # Written last: an interrupted run leaves no marker and is redone.
      build_sum >"$INSTALL_DIR/.installed"
      log "installed $(ls "$LIB_DIR" | wc -l) jars, $(du -sh "$LIB_DIR" | cut -f1)"
    fi
    exec 9>&-
  fi
  echo "$LIB_DIR"
}

ensure_installed() { installed || cmd_install >/dev/null; }

# -------------------------------------------------------------------- run ---

cmd_run() {
  ensure_installed
  local -a jvm=(
    -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$LOG4J_CONFIG"
    # Flink 2 runs on Java 17 with these opened (as its own launcher does).
    --add-opens=java.base/java.lang=ALL-UNNAMED
    --add-opens=java.base/java.lang.reflect=ALL-UNNAMED
    --add-opens=java.base/java.util=ALL-UNNAMED
    --add-opens=java.base/java.util.concurrent=ALL-UNNAMED
    --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED
    --add-opens=java.base/java.math=ALL-UNNAMED
    --add-opens=java.base/java.io=ALL-UNNAMED
    --add-opens=java.base/java.nio=ALL-UNNAMED
    --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
    --add-opens=java.base/java.net=ALL-UNNAMED
    --add-opens=java.base/java.text=ALL-UNNAMED
    --add-opens=java.base/java.time=ALL-UNNAMED
    --add-opens=java.sql/java.sql=ALL-UNNAMED
    -cp "$LIB_DIR/*"
  )
  # shellcheck disable=SC2086 # WALRELAY_FLINK_JAVA_OPTS is a list of flags.
  exec "$JAVA" "${jvm[@]}" ${WALRELAY_FLINK_JAVA_OPTS:-} "$MAIN_CLASS" "$@"
}

# ------------------------------------------------------------------- main ---

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

(($#)) || usage
cmd="$1"; shift
case "$cmd" in
  install) cmd_install "$@" ;;
  run) cmd_run "$@" ;;
  -h|--help|help) usage ;;
  *) log "unknown command: $cmd"; usage ;;
esac
