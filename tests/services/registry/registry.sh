#!/usr/bin/env bash
# registry.sh: run a real schema registry with a Confluent-compatible REST API
# (Apicurio Registry, in-memory storage) for walrelay's tests and demo, built
# from artifacts on Maven Central. No Kafka needed.
#
#   registry.sh install
#       Build Apicurio Registry's Quarkus application from the artifacts
#       named in pom.xml (beside this script) into
#       ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/apicurio-registry-<version>/quarkus-app
#       and print that folder. Runs Maven only once: later calls are instant
#       and work offline.
#
#   registry.sh run --port P [--dir DIR] [--heap 256m] [--compat LEVEL]
#                   [--set key=value]...
#       The registry in the foreground, listening on 127.0.0.1:P only; execs
#       the JVM (the caller's process id is the registry's). Storage is an
#       in-memory H2 database: everything is gone when it stops. DIR (made if
#       missing) is the JVM's working and temporary folder (default: the
#       current folder and the JVM's own). --compat is the
#       compatibility applied to subjects without their own (default
#       BACKWARD, as Confluent's registry; NONE = Apicurio's own default, no
#       check). --set passes a Quarkus/Apicurio property (-Dkey=value).
#
#   registry.sh start --dir DIR [--port P] [--heap SIZE] [--compat LEVEL]
#                     [--set key=value]...
#       For people and the demo: a free loopback port (or P), the registry in
#       the background (DIR/registry.log, .pid, and .args = the `run`
#       arguments one per line), waits until GET <url>/subjects answers 200
#       (120 s at most), then prints the Confluent-compatible base URL
#       http://127.0.0.1:PORT/apis/ccompat/v7 (also written to DIR/url).
#
#   registry.sh stop --dir DIR
#       SIGTERM the registry started in DIR, SIGKILL after 30 s.
#
# Only the `install` and `start` results go to stdout; progress and logs of
# this script go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
POM="$HERE/pom.xml"
APICURIO_VERSION="$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$POM")"
SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
INSTALL_DIR="$SERVICES_HOME/apicurio-registry-$APICURIO_VERSION"
APP_DIR="$INSTALL_DIR/quarkus-app"
JAVA="${JAVA:-java}"
# Where Apicurio serves the Confluent Schema Registry API (v6 is the same).
CCOMPAT_PATH="/apis/ccompat/v7"

START_TIMEOUT_S=120
STOP_TIMEOUT_S=30

log() { echo "registry.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------- install ---

# The marker holds a checksum of pom.xml: editing the pom rebuilds.
pom_sum() { sha256sum "$POM" | cut -d' ' -f1; }

installed() {
  [[ -f "$INSTALL_DIR/.installed" && "$(cat "$INSTALL_DIR/.installed")" == "$(pom_sum)" ]]
}

cmd_install() {
  [[ -n "$APICURIO_VERSION" ]] || die "no <apicurio.version> in $POM"
  if ! installed; then
    mkdir -p "$INSTALL_DIR"
    # Serialise concurrent installs (parallel test processes).
    exec 9>"$INSTALL_DIR/.lock"
    flock 9
    if ! installed; then
      log "building Apicurio Registry $APICURIO_VERSION from Maven artifacts into $APP_DIR ..."
      # Maven writes target/ beside the pom: build in the cache, not in the
      # repository.
      local build="$INSTALL_DIR/build"
      rm -rf "$build"
      mkdir -p "$build"
      cp "$POM" "$build/pom.xml"
      # Maven's own output is progress: to stderr, without the colour codes
      # that Debian's Maven 3.8 prints even in batch mode.
      (cd "$build" && mvn -B -q package -DskipTests -Dquarkus.package.type=fast-jar) 2>&1 \
        | sed 's/\x1b\[[0-9;]*m//g' >&2 \
        || die "mvn failed to build the registry (build folder kept: $build)"
      [[ -f "$build/target/quarkus-app/quarkus-run.jar" ]] \
        || die "mvn finished but $build/target/quarkus-app/quarkus-run.jar is missing"
      rm -rf "$APP_DIR"
      mv "$build/target/quarkus-app" "$APP_DIR"
      rm -rf "$build"
      # Written last: an interrupted run leaves no marker and is redone.
      pom_sum >"$INSTALL_DIR/.installed"
      log "installed $(find "$APP_DIR/lib" -name "*.jar" | wc -l) jars, $(du -sh "$APP_DIR" | cut -f1)"
    fi
    exec 9>&-
  fi
  echo "$APP_DIR"
}

ensure_installed() { installed || cmd_install >/dev/null; }

# -------------------------------------------------------------------- run ---

check_compat() {
  case "$1" in
    NONE|BACKWARD|BACKWARD_TRANSITIVE|FORWARD|FORWARD_TRANSITIVE|FULL|FULL_TRANSITIVE) ;;
    *) die "--compat: one of NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE" ;;
  esac
}

cmd_run() {
  local port="" dir="" heap="256m" compat="BACKWARD"
  local -a sets=()
  while (($#)); do
    case "$1" in
      --port) port="$2"; shift 2 ;;
      --dir) dir="$2"; shift 2 ;;
      --heap) heap="$2"; shift 2 ;;
      --compat) compat="$2"; shift 2 ;;
      --set) sets+=("-D$2"); shift 2 ;;
      *) die "run: unknown argument: $1" ;;
    esac
  done
  [[ -n "$port" ]] || die "run needs --port"
  check_compat "$compat"

  ensure_installed
  local -a jvm=(
    "-Xmx$heap" -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true
  )
  if [[ -n "$dir" ]]; then
    mkdir -p "$dir/tmp"
    dir="$(cd "$dir" && pwd)"
    cd "$dir"
    # Vert.x's file cache and the like; also ties the process to DIR for
    # `stop`.
    jvm+=("-Djava.io.tmpdir=$dir/tmp")
  fi

  local -a props=(
    # Loopback only (Quarkus' default host is 0.0.0.0).
    -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=$port"
  )
  # The compatibility rule of subjects that have none. Apicurio applies it
  # but GET /config still answers NONE until a PUT /config stores a rule.
  [[ "$compat" == NONE ]] || props+=("-Dregistry.rules.global.compatibility=$compat")

  # shellcheck disable=SC2086 # WALRELAY_REGISTRY_JAVA_OPTS is a list of flags.
  exec "$JAVA" "${jvm[@]}" ${WALRELAY_REGISTRY_JAVA_OPTS:-} "${props[@]}" "${sets[@]}" \
    -jar "$APP_DIR/quarkus-run.jar"
}

# ------------------------------------------------------------ start / stop ---

# Is PID a live registry process of DIR? (Guards against a reused process id.)
registry_alive() {
  local pid="$1" dir="$2" cmdline
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  # bash running `run --dir DIR` (before its exec), then java with
  # -Djava.io.tmpdir=DIR/tmp.
  [[ "$cmdline" == *" --dir $dir "* || "$cmdline" == *"=$dir/tmp "* ]]
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cmd_start() {
  local dir="" port=""
  local -a extra=()
  while (($#)); do
    case "$1" in
      --dir) dir="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --compat) check_compat "$2"; extra+=("$1" "$2"); shift 2 ;;
      --heap|--set) extra+=("$1" "$2"); shift 2 ;;
      *) die "start: unknown argument: $1" ;;
    esac
  done
  [[ -n "$dir" ]] || die "start needs --dir"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"

  if [[ -e "$dir/registry.pid" ]]; then
    registry_alive "$(cat "$dir/registry.pid")" "$dir" \
      && die "$dir already has a running registry: registry.sh stop --dir $dir"
    rm -f "$dir/registry.pid"
  fi

  ensure_installed
  [[ -n "$port" ]] || port="$(free_port)"
  local url="http://127.0.0.1:$port$CCOMPAT_PATH"

  local -a args=(run --port "$port" --dir "$dir" "${extra[@]}")
  printf '%s\n' "${args[@]}" >"$dir/registry.args"
  # setsid: the registry outlives this shell and ignores its terminal's ^C.
  # `run` execs java, so $! is the JVM's process id.
  setsid bash "$SELF" "${args[@]}" >"$dir/registry.log" 2>&1 </dev/null &
  echo $! >"$dir/registry.pid"
  log "starting the registry in $dir (log: $dir/registry.log)"

  local started=$SECONDS pid code
  pid="$(cat "$dir/registry.pid")"
  while :; do
    if ! registry_alive "$pid" "$dir"; then
      echo >&2
      log "the registry exited during start; tail of $dir/registry.log:"
      tail -n 40 "$dir/registry.log" >&2
      rm -f "$dir/registry.pid"
      exit 1
    fi
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url/subjects" || true)"
    [[ "$code" == 200 ]] && break
    if ((SECONDS - started >= START_TIMEOUT_S)); then
      echo >&2
      log "not ready after ${START_TIMEOUT_S}s; tail of $dir/registry.log:"
      tail -n 20 "$dir/registry.log" >&2
      cmd_stop --dir "$dir" >/dev/null 2>&1 || true
      exit 1
    fi
    printf . >&2
    sleep 0.5
  done
  echo >&2
  log "ready after $((SECONDS - started))s"
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
  [[ -e "$dir/registry.pid" ]] || return 0

  local pid
  pid="$(cat "$dir/registry.pid")"
  if registry_alive "$pid" "$dir"; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while registry_alive "$pid" "$dir"; do
      if ((SECONDS >= deadline)); then
        log "still running after ${STOP_TIMEOUT_S}s, SIGKILL: $pid"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
  fi
  rm -f "$dir/registry.pid"
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
