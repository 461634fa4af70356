#!/usr/bin/env bash
# prometheus.sh: the Prometheus server and promtool for walrelay's tests and deploy checks, from
# Debian's `prometheus` package, unpacked (never installed: no service, no /etc changes).
#
#   prometheus.sh install
#       `apt-get download prometheus`, then `dpkg-deb -x` of its two binaries into
#       ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/prometheus/bin and print that
#       folder (it holds `prometheus` and `promtool`). Downloads only once: later calls are
#       instant and work offline. scripts/check-deploy.sh takes promtool from here too.
#
# The server itself is started by the tests (tests/src/prometheus/) with a config of their
# own. Only the folder goes to stdout; progress goes to stderr.
set -euo pipefail

SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
INSTALL_DIR="$SERVICES_HOME/prometheus"
BIN_DIR="$INSTALL_DIR/bin"

log() { echo "prometheus.sh: $*" >&2; }
die() { log "$*"; exit 1; }

installed() {
  [[ -s "$INSTALL_DIR/.installed" && -x "$BIN_DIR/prometheus" && -x "$BIN_DIR/promtool" ]]
}

cmd_install() {
  if ! installed; then
    mkdir -p "$INSTALL_DIR"
    # Serialise concurrent installs (parallel test processes, check-deploy.sh).
    exec 9>"$INSTALL_DIR/.lock"
    flock 9
    if ! installed; then
      local tmp
      tmp="$(mktemp -d)"
      # shellcheck disable=SC2064 # expand now: tmp is local
      trap "rm -rf '$tmp'" EXIT
      log "downloading Debian's prometheus package into $INSTALL_DIR ..."
      # An empty or stale package list (a fresh machine) knows no such package: update once.
      if ! (cd "$tmp" && apt-get download prometheus) >&2 2>&1; then
        apt-get update -qq >&2 || die "apt-get update failed"
        (cd "$tmp" && apt-get download prometheus) >&2 2>&1 \
          || die "apt-get download prometheus failed"
      fi
      local deb
      deb="$(ls "$tmp"/prometheus_*.deb)" || die "no prometheus_*.deb was downloaded"
      dpkg-deb -x "$deb" "$tmp/x"
      rm -rf "$BIN_DIR.tmp"
      mkdir -p "$BIN_DIR.tmp"
      cp "$tmp/x/usr/bin/prometheus" "$tmp/x/usr/bin/promtool" "$BIN_DIR.tmp/" \
        || die "the package has no usr/bin/prometheus or usr/bin/promtool"
      rm -rf "$BIN_DIR"
      mv "$BIN_DIR.tmp" "$BIN_DIR"
      # Written last: an interrupted run leaves no marker and is redone.
      dpkg-deb -f "$deb" Version >"$INSTALL_DIR/.installed"
      log "installed prometheus $(cat "$INSTALL_DIR/.installed")"
    fi
    exec 9>&-
  fi
  echo "$BIN_DIR"
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

(($#)) || usage
cmd="$1"; shift
case "$cmd" in
  install) cmd_install "$@" ;;
  -h|--help|help) usage ;;
  *) log "unknown command: $cmd"; usage ;;
esac
