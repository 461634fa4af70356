#!/usr/bin/env bash
# opensearch.sh: a real OpenSearch 2.19 node for walrelay's tests and demo, started from the jars
# on Maven Central (the distribution tarball is not there) by a small launcher class, on Java 17.
# See README.md beside this script.
#
#   opensearch.sh install
#       Build the launcher (pom.xml and src/ beside this script) and copy it with every runtime
#       jar into ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/opensearch-<version>/lib, then
#       print that folder (…/opensearch-<version>). Maven runs only when the folder is missing or
#       pom.xml or src/ changed since (the marker .installed holds their checksum); otherwise it is
#       instant and works offline. Concurrent installs wait for each other.
#
#   opensearch.sh run --dir DIR --http-port P [--transport-port T] [--heap 768m] [--set key=value]...
#       One single-node cluster in the foreground: installs if needed, then execs the JVM (the
#       caller's process id is the node's). Listens on 127.0.0.1 only: HTTP on P, transport on T
#       (a free port chosen by the kernel without it). Keeps everything under DIR: home/, data/,
#       logs/, tmp/ and cluster-name (made on the first run: a later run on DIR reuses the data).
#       New indexes get 1 shard and 0 replicas unless their request or a template says otherwise.
#       --set adds or overrides a node setting. Logs (warnings, and the launcher's "started" and
#       "stopped" lines) go to stdout. SIGTERM closes the node cleanly; the JVM then exits 143.
#
#   opensearch.sh start --dir DIR [--http-port P] [--heap SIZE] [--set key=value]...
#       For people and the demo: `run` in the background on a free loopback port (DIR/node.log,
#       DIR/node.pid), waits until the cluster is at least yellow (180 s at most, dots on
#       stderr), then prints http://127.0.0.1:P (also written to DIR/url). On failure it prints
#       the tail of the log and exits 1.
#
#   opensearch.sh stop --dir DIR
#       SIGTERM to the node started in DIR, SIGKILL after 30 s.
#
# Only the results of `install` and `start` go to stdout; progress goes to stderr.
# Environment: WALRELAY_SERVICES_HOME (cache root), JAVA (default: java),
# WALRELAY_OPENSEARCH_JAVA_OPTS (extra JVM flags for `run`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
POM="$HERE/pom.xml"
OPENSEARCH_VERSION="$(sed -n 's:.*<opensearch.version>\(.*\)</opensearch.version>.*:\1:p' "$POM")"
SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
INSTALL_DIR="$SERVICES_HOME/opensearch-$OPENSEARCH_VERSION"
LIB_DIR="$INSTALL_DIR/lib"
MAIN_CLASS="dev.walrelay.services.OpenSearchNode"
JAVA="${JAVA:-java}"

START_TIMEOUT_S=180
STOP_TIMEOUT_S=30

log() { echo "opensearch.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- install ---

# Checksum of everything the build reads: pom.xml and src/ (names and contents).
source_sum() {
  (cd "$HERE" && find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) \
    | sha256sum | cut -d' ' -f1
}

installed() {
  [[ -f "$INSTALL_DIR/.installed" && -f "$LIB_DIR/opensearch-launcher-$OPENSEARCH_VERSION.jar" ]] \
    && [[ "$(cat "$INSTALL_DIR/.installed")" == "$(source_sum)" ]]
}

cmd_install() {
  (($# == 0)) || die "install takes no arguments"
  [[ -n "$OPENSEARCH_VERSION" ]] || die "no <opensearch.version> in $POM"
  if ! installed; then
    command -v mvn >/dev/null || die "mvn (Maven) is needed to install OpenSearch's jars"
    mkdir -p "$SERVICES_HOME"
    # Serialise concurrent installs (parallel test binaries); the loser finds it done.
    exec 9>"$SERVICES_HOME/.opensearch-$OPENSEARCH_VERSION.lock"
    flock 9
    if ! installed; then
      local sum stage started=$SECONDS
      sum="$(source_sum)"
      stage="$(mktemp -d "$SERVICES_HOME/.opensearch-$OPENSEARCH_VERSION.stage.XXXXXX")"
      # shellcheck disable=SC2064 # expand $stage now
      trap "rm -rf '$stage'" EXIT
      log "building the launcher and resolving OpenSearch $OPENSEARCH_VERSION from Maven into $INSTALL_DIR ..."
      # Maven's output is progress: to stderr, without the colour codes Debian's Maven 3.8
      # prints even in batch mode. The build directory is in the stage, not beside the sources.
      mvn -B -q -f "$POM" package \
        "-Dwalrelay.build.dir=$stage/build" "-Dwalrelay.lib.dir=$stage/lib" 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' >&2 \
        || die "mvn failed to build the launcher or resolve the OpenSearch jars"
      [[ -f "$stage/lib/opensearch-launcher-$OPENSEARCH_VERSION.jar" && -f "$stage/lib/opensearch-$OPENSEARCH_VERSION.jar" ]] \
        || die "mvn finished but the launcher or opensearch-$OPENSEARCH_VERSION.jar is missing"
      rm -rf "$stage/build"
      # Written last: an interrupted install leaves no marker and is redone.
      echo "$sum" >"$stage/.installed"
      # Swap in the new folder; a node running from the old one keeps the jars it has open.
      if [[ -e "$INSTALL_DIR" ]]; then
        mv "$INSTALL_DIR" "$stage.old"
      fi
      mv "$stage" "$INSTALL_DIR"
      rm -rf "$stage.old"
      trap - EXIT
      log "installed $(find "$LIB_DIR" -name '*.jar' | wc -l) jars in $((SECONDS - started))s"
    fi
    exec 9>&-
  fi
  echo "$INSTALL_DIR"
}

ensure_installed() { installed || cmd_install >/dev/null; }

# -------------------------------------------------------------------- run ---

cmd_run() {
  local dir="" http_port="" transport_port="0" heap="768m"
  local -a sets=()
  while (($#)); do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --http-port) http_port="$2"; shift 2 ;;
      --transport-port) transport_port="$2"; shift 2 ;;
      --heap) heap="$2"; shift 2 ;;
      --set) sets+=("$2"); shift 2 ;;
      *) die "run: unknown argument: $1" ;;
    esac
  done
  [[ -n "$dir" && -n "$http_port" ]] || die "run needs --dir and --http-port"
  [[ "$http_port" =~ ^[0-9]+$ && "$transport_port" =~ ^[0-9]+$ ]] || die "run: ports are numbers"

  ensure_installed
  mkdir -p "$dir"/{home,data,logs,tmp}
  dir="$(cd "$dir" && pwd)"

  # One cluster name per DIR, made on its first run: unique, so that two test nodes never join
  # each other, and stable across restarts on the same data.
  [[ -s "$dir/cluster-name" ]] || echo "walrelay-test-$$-$RANDOM" >"$dir/cluster-name"

  # shellcheck disable=SC2054 # the commas are inside values (SPI,COMPAT)
  local -a jvm=(
    "-Xms$heap" "-Xmx$heap" -Xss1m
    # OpenSearch's own GC choices (distribution jvm.options).
    -XX:+UseG1GC -XX:G1ReservePercent=25 -XX:InitiatingHeapOccupancyPercent=30
    # A test node that ran out of memory should die loudly, not limp.
    -XX:+ExitOnOutOfMemoryError "-XX:ErrorFile=$dir/logs/hs_err_pid%p.log"
    -XX:-OmitStackTraceInFastThrow -XX:+ShowCodeDetailsInExceptionMessages
    # The system properties OpenSearch's launcher always sets (SystemJvmOptions).
    "-Djava.io.tmpdir=$dir/tmp" -Djava.awt.headless=true -Dfile.encoding=UTF-8 -Djna.nosys=true
    -Djava.locale.providers=SPI,COMPAT
    -Dio.netty.noUnsafe=true -Dio.netty.noKeySetOptimization=true
    -Dio.netty.recycler.maxCapacityPerThread=0 -Dio.netty.allocator.numDirectArenas=0
    # log4j's own shutdown hook is off: the launcher stops logging after the node is closed.
    -Dlog4j.shutdownHookEnabled=false -Dlog4j2.disable.jmx=true
    "-Dopensearch.path.home=$dir/home"
    # Loopback IPv4 only: sockets show as 127.0.0.1:P, not [::ffff:127.0.0.1]:P.
    -Djava.net.preferIPv4Stack=true
    -cp "$LIB_DIR/*"
  )
  local -a settings=(
    "path.home=$dir/home" "path.data=$dir/data" "path.logs=$dir/logs"
    "cluster.name=$(cat "$dir/cluster-name")" "node.name=walrelay-test-$http_port"
    discovery.type=single-node
    network.host=127.0.0.1 "http.port=$http_port" "transport.port=$transport_port"
    # Test folders live on whatever disk there is: never go read-only for lack of space.
    cluster.routing.allocation.disk.threshold_enabled=false
    bootstrap.memory_lock=false
    "${sets[@]}"
  )
  # shellcheck disable=SC2086 # WALRELAY_OPENSEARCH_JAVA_OPTS is a list of flags.
  exec "$JAVA" "${jvm[@]}" ${WALRELAY_OPENSEARCH_JAVA_OPTS:-} "$MAIN_CLASS" "${settings[@]}"
}

# ------------------------------------------------------------ start / stop ---

# Is PID a live node process of DIR? (Guards against a reused process id.)
node_alive() {
  local pid="$1" dir="$2" cmdline
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *"$MAIN_CLASS"* && "$cmdline" == *"path.home=$dir/home"* ]]
}

# A free TCP port on 127.0.0.1 (free now; the node binds it a moment later).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cmd_start() {
  local dir="" http_port=""
  local -a extra=()
  while (($#)); do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --http-port) http_port="$2"; shift 2 ;;
      --heap|--set|--transport-port) extra+=("$1" "$2"); shift 2 ;;
      *) die "start: unknown argument: $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start needs --dir"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  if [[ -f "$dir/node.pid" ]]; then
    node_alive "$(cat "$dir/node.pid")" "$dir" \
      && die "$dir already has a running node (pid $(cat "$dir/node.pid")): opensearch.sh stop --dir $dir"
    rm -f "$dir/node.pid" "$dir/url"
  fi

  # Before the clock starts: a cold install takes a while and says so on stderr.
  ensure_installed
  [[ -n "$http_port" ]] || http_port="$(free_port)"
  local url="http://127.0.0.1:$http_port"

  # setsid: the node outlives this shell and ignores its terminal's ^C. `run` execs java, so $!
  # is the JVM's process id.
  setsid "$SELF" run --dir "$dir" --http-port "$http_port" "${extra[@]+"${extra[@]}"}" \
    >"$dir/node.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/node.pid"
  log "starting OpenSearch $OPENSEARCH_VERSION in $dir (pid $pid, log $dir/node.log)"

  local started=$SECONDS health
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo >&2
      log "the node exited during start; tail of $dir/node.log:"
      tail -n 40 "$dir/node.log" >&2
      rm -f "$dir/node.pid"
      exit 1
    fi
    health="$(curl -s -m 5 "$url/_cluster/health?wait_for_status=yellow&timeout=1s" 2>/dev/null || true)"
    if [[ "$health" == *'"timed_out":false'* ]]; then
      break
    fi
    if ((SECONDS - started >= START_TIMEOUT_S)); then
      echo >&2
      log "not ready after ${START_TIMEOUT_S}s; tail of $dir/node.log:"
      tail -n 40 "$dir/node.log" >&2
      cmd_stop --dir "$dir" >/dev/null 2>&1 || true
      exit 1
    fi
    printf . >&2
    sleep 1
  done
  echo >&2
  log "ready after $((SECONDS - started))s: $(sed -n 's/.*"status":"\([a-z]*\)".*/\1/p' <<<"$health")"
  echo "$url" >"$dir/url"
  echo "$url"
}

cmd_stop() {
  local dir=""
  while (($#)); do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      *) die "stop: unknown argument: $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "stop needs --dir"
  [[ -d "$dir" ]] || return 0
  dir="$(cd "$dir" && pwd)"
  [[ -f "$dir/node.pid" ]] || return 0

  local pid
  pid="$(cat "$dir/node.pid")"
  if node_alive "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while node_alive "$pid" "$dir"; do
      if ((SECONDS >= deadline)); then
        log "still running after ${STOP_TIMEOUT_S}s, SIGKILL: $pid"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
    log "stopped (pid $pid)"
  fi
  rm -f "$dir/node.pid" "$dir/url"
}

# ------------------------------------------------------------------- main ---

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

(($#)) || usage
cmd="$1"; shift
case "$cmd" in
  install) cmd_install "$@" ;;
  run) cmd_run "$@" ;;
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  -h|--help|help) usage ;;
  *) log "unknown command: $cmd"; usage ;;
esac
