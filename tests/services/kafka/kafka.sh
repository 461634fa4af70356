#!/usr/bin/env bash
# kafka.sh: run a real Apache Kafka broker (KRaft mode, no ZooKeeper) for
# walrelay's tests and demo, from jars resolved on Maven Central.
#
#   kafka.sh install
#       Resolve the Kafka jars listed in pom.xml (beside this script) into
#       ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/kafka-<version>/lib
#       and print that folder. Runs Maven only once: later calls are instant
#       and work offline.
#
#   kafka.sh run --node-id N --dir DIR --port P --controller-port C
#                [--voters "1@127.0.0.1:C1,2@127.0.0.1:C2,3@127.0.0.1:C3"]
#                [--cluster-id ID] [--heap 512m] [--set key=value]...
#                [--add-scram 'SCRAM-SHA-512=[name=U,password=P]']...
#       One combined broker+controller node in the foreground: writes
#       DIR/server.properties, formats DIR/data on first use only, then execs
#       the JVM (the caller's process id is the broker's). Listens on
#       127.0.0.1:P (clients) and 127.0.0.1:C (controller quorum) only.
#       Without --voters the node is a single-node cluster.
#
#   kafka.sh start --dir DIR [--nodes 1|3] [--heap SIZE] [--set key=value]...
#       For people and the demo: free loopback ports, node(s) in the
#       background (DIR/node-N.log, .pid, and .args = the node's `run`
#       arguments one per line, to restart it exactly), waits until every
#       broker answers a metadata request (120 s at most), then prints the
#       bootstrap servers (also written to DIR/bootstrap).
#
#   kafka.sh stop --dir DIR
#       SIGTERM every node started in DIR, SIGKILL after 30 s.
#
#   kafka.sh tool CLASS ARGS...
#       Run a Kafka tool class (TopicCommand, ConsoleProducer, ...) on the
#       same classpath, logging only errors, on stderr.
#
# Only the `install` and `start` results go to stdout; progress and logs of
# this script go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
POM="$HERE/pom.xml"
LOG4J_CONFIG="$HERE/log4j2.properties"
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")"
SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
INSTALL_DIR="$SERVICES_HOME/kafka-$KAFKA_VERSION"
LIB_DIR="$INSTALL_DIR/lib"
JAVA="${JAVA:-java}"
# The JVM of a short-lived tool: small heap, quick start, only errors logged
# (on stderr, so stdout is the tool's own output).
TOOL_JAVA=("$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$LOG4J_CONFIG"
  -Dwalrelay.log.level=ERROR -Dwalrelay.log.serverlevel=ERROR
  -Dwalrelay.log.target=SYSTEM_ERR
  -cp "$LIB_DIR/*")

START_TIMEOUT_S=120
STOP_TIMEOUT_S=30

log() { echo "kafka.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- install ---

# The marker holds a checksum of pom.xml: editing the pom re-resolves.
pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

installed() {
  [[ -f "$INSTALL_DIR/.installed" && "$(cat "$INSTALL_DIR/.installed")" == "$(pom_sum)" ]]
}

cmd_install() {
  [[ -n "$KAFKA_VERSION" ]] || die "no <kafka.version> in $POM"
  if ! installed; then
    mkdir -p "$INSTALL_DIR"
    # Serialise concurrent installs (parallel test processes).
    exec 9>"$INSTALL_DIR/.lock"
    flock 9
    if ! installed; then
      log "resolving Kafka $KAFKA_VERSION from Maven into $LIB_DIR ..."
      local tmp="$INSTALL_DIR/lib.tmp"
      rm -rf "$tmp"
      # Maven's own output is progress: to stderr, without the colour codes
      # that Debian's Maven 3.8 prints even in batch mode.
      mvn -B -q -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' >&2 \
        || die "mvn failed to resolve the Kafka jars"
      ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null \
        || die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is missing"
      rm -rf "$LIB_DIR"
      mv "$tmp" "$LIB_DIR"
      # Written last: an interrupted run leaves no marker and is redone.
      pom_sum >"$INSTALL_DIR/.installed"
      log "installed $(ls "$LIB_DIR" | wc -l) jars"
    fi
    exec 9>&-
  fi
  echo "$LIB_DIR"
}

ensure_installed() { installed || cmd_install >/dev/null; }

# -------------------------------------------------------------------- run ---

# A Kafka cluster id: 16 random bytes, base64url without padding (22 chars),
# not starting with '-' (Kafka's own generator avoids that too).
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && { echo "$id"; return; }
  done
}

cmd_run() {
  local node_id="" dir="" port="" cport="" voters="" cluster_id="" heap="512m"
  local -a sets=() scram=()
  while (($#)); do
    case "$1" in
      --node-id) node_id="$2"; shift 2 ;;
      --dir) dir="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --controller-port) cport="$2"; shift 2 ;;
      --voters) voters="$2"; shift 2 ;;
      --cluster-id) cluster_id="$2"; shift 2 ;;
      --heap) heap="$2"; shift 2 ;;
      --set) sets+=("$2"); shift 2 ;;
      # A SCRAM credential created when the storage is formatted, e.g.
      # 'SCRAM-SHA-512=[name=walrelay,password=secret]' (KRaft has no ZooKeeper to hold it).
      --add-scram) scram+=(--add-scram "$2"); shift 2 ;;
      *) die "run: unknown argument: $1" ;;
    esac
  done
  [[ -n "$node_id" && -n "$dir" && -n "$port" && -n "$cport" ]] \
    || die "run needs --node-id, --dir, --port and --controller-port"
  [[ -n "$voters" ]] || voters="$node_id@127.0.0.1:$cport"

  ensure_installed
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  # Without --cluster-id: one id made on the first run and kept in DIR.
  if [[ -z "$cluster_id" ]]; then
    [[ -s "$dir/cluster-id" ]] || new_cluster_id >"$dir/cluster-id"
    cluster_id="$(cat "$dir/cluster-id")"
  fi

  # Replication settings follow the size of the quorum: 1 node, or 3 (or
  # more) nodes where a write with acks=all survives the loss of one node.
  local n_voters rf isr
  n_voters="$(tr ',' '\n' <<<"$voters" | grep -c .)"
  if ((n_voters >= 3)); then rf=3; isr=2; else rf=1; isr=1; fi

  cat >"$dir/server.properties" <<EOF
# Written by kafka.sh run: rewritten on every run, edit the command line.
process.roles=broker,controller
node.id=$node_id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data

auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
EOF
  if ((${#sets[@]})); then
    printf '# --set\n' >>"$dir/server.properties"
    printf '%s\n' "${sets[@]}" >>"$dir/server.properties"
  fi

  local -a jvm=(
    "-Xmx$heap" "-Xms$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=$LOG4J_CONFIG"
    -cp "$LIB_DIR/*"
  )

  # Format once: a node restarted on the same DIR keeps its data.
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    log "node $node_id: formatting $dir/data (cluster id $cluster_id)"
    "${TOOL_JAVA[@]}" kafka.tools.StorageTool format \
      --cluster-id "$cluster_id" --config "$dir/server.properties" "${scram[@]}" >&2 \
      || die "node $node_id: storage format failed"
  fi

  # shellcheck disable=SC2086 # WALRELAY_KAFKA_JAVA_OPTS is a list of flags.
  exec "$JAVA" "${jvm[@]}" ${WALRELAY_KAFKA_JAVA_OPTS:-} kafka.Kafka "$dir/server.properties"
}

# ------------------------------------------------------------------- tool ---

cmd_tool() {
  (($#)) || die "tool needs a class name"
  ensure_installed
  exec "${TOOL_JAVA[@]}" "$@"
}

# ------------------------------------------------------------ start / stop ---

# Is PID a live node process of DIR? (Guards against a reused process id.)
node_alive() {
  local pid="$1" dir="$2" cmdline
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *"$dir/"* ]]
}

# N distinct free TCP ports on 127.0.0.1, one a line.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
    s.close()
EOF
}

cmd_start() {
  local dir="" nodes=1
  local -a extra=()
  while (($#)); do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --nodes) nodes="$2"; shift 2 ;;
      --heap|--set) extra+=("$1" "$2"); shift 2 ;;
      *) die "start: unknown argument: $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start needs --dir"
  [[ "$nodes" == 1 || "$nodes" == 3 ]] || die "start: --nodes is 1 or 3"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  local i pidfile
  for pidfile in "$dir"/node-*.pid; do
    [[ -e "$pidfile" ]] || continue
    node_alive "$(cat "$pidfile")" "$dir" \
      && die "$dir already has a running node ($pidfile): kafka.sh stop --dir $dir"
    rm -f "$pidfile"
  done

  ensure_installed

  local -a ports
  mapfile -t ports < <(free_ports $((2 * nodes)))
  # ports[0..n-1]: clients, ports[n..2n-1]: controllers.
  local voters="" bootstrap=""
  for ((i = 1; i <= nodes; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:${ports[nodes + i - 1]}"
    bootstrap+="${bootstrap:+,}127.0.0.1:${ports[i - 1]}"
  done
  # One cluster id per DIR, so a later start on the same DIR reuses the data.
  [[ -s "$dir/cluster-id" ]] || new_cluster_id >"$dir/cluster-id"
  local cluster_id
  cluster_id="$(cat "$dir/cluster-id")"

  local -a args
  for ((i = 1; i <= nodes; i++)); do
    args=(run --node-id "$i" --dir "$dir/node-$i"
      --port "${ports[i - 1]}" --controller-port "${ports[nodes + i - 1]}"
      --voters "$voters" --cluster-id "$cluster_id" "${extra[@]}")
    printf '%s\n' "${args[@]}" >"$dir/node-$i.args"
    # setsid: the node outlives this shell and ignores its terminal's ^C.
    # `run` execs java, so $! is the JVM's process id.
    setsid bash "$SELF" "${args[@]}" >"$dir/node-$i.log" 2>&1 </dev/null &
    echo $! >"$dir/node-$i.pid"
  done
  log "starting $nodes node(s) in $dir (logs: $dir/node-N.log)"

  local started=$SECONDS ready pid
  while :; do
    for ((i = 1; i <= nodes; i++)); do
      pid="$(cat "$dir/node-$i.pid")"
      if ! node_alive "$pid" "$dir"; then
        echo >&2
        log "node $i exited during start; tail of $dir/node-$i.log:"
        tail -n 40 "$dir/node-$i.log" >&2
        cmd_stop --dir "$dir" >/dev/null 2>&1 || true
        exit 1
      fi
    done
    # Cheap check first (the broker's "started" log line), then a real
    # metadata request that must list every broker.
    ready=1
    for ((i = 1; i <= nodes; i++)); do
      grep -q "Kafka Server started" "$dir/node-$i.log" || { ready=0; break; }
    done
    if ((ready)) && (( $(timeout 30 "${TOOL_JAVA[@]}" \
          org.apache.kafka.tools.BrokerApiVersionsCommand \
          --bootstrap-server "$bootstrap" 2>/dev/null | grep -c '(id: ') == nodes )); then
      break
    fi
    if ((SECONDS - started >= START_TIMEOUT_S)); then
      echo >&2
      log "not ready after ${START_TIMEOUT_S}s"
      for ((i = 1; i <= nodes; i++)); do
        log "tail of $dir/node-$i.log:"
        tail -n 20 "$dir/node-$i.log" >&2
      done
      cmd_stop --dir "$dir" >/dev/null 2>&1 || true
      exit 1
    fi
    printf . >&2
    sleep 1
  done
  echo >&2
  log "ready after $((SECONDS - started))s"
  echo "$bootstrap" >"$dir/bootstrap"
  echo "$bootstrap"
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

  local pidfile pid
  local -a pids=()
  for pidfile in "$dir"/node-*.pid; do
    [[ -e "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    if node_alive "$pid" "$dir"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  local deadline=$((SECONDS + STOP_TIMEOUT_S)) alive
  while ((${#pids[@]})); do
    alive=()
    for pid in "${pids[@]}"; do
      if node_alive "$pid" "$dir"; then alive+=("$pid"); fi
    done
    pids=("${alive[@]+"${alive[@]}"}")
    ((${#pids[@]})) || break
    if ((SECONDS >= deadline)); then
      log "still running after ${STOP_TIMEOUT_S}s, SIGKILL: ${pids[*]}"
      kill -KILL "${pids[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  rm -f "$dir"/node-*.pid
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
  tool) cmd_tool "$@" ;;
  -h|--help|help) usage ;;
  *) log "unknown command: $cmd"; usage ;;
esac
