#!/usr/bin/env bash
# browser.sh: a real headless Chromium driving walrelay's live view page
# (consumer/src/stream/live/index.html) over the DevTools protocol: live_view.py.
#
#   browser.sh install
#       Install Debian's chromium with apt-get when /usr/bin/chromium is
#       missing (as root; otherwise say what to install), then create a venv
#       from requirements.txt (beside this script) in
#       ${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}/browser-<checksum of requirements.txt>/venv
#       and print its python's path. Runs apt/pip only once: later calls are
#       instant and work offline.
#
#   browser.sh run ARGS...
#       Exec live_view.py ARGS... with the venv's python (installing first if
#       needed). See live_view.py --help and README.md.
#
#   browser.sh python ARGS...
#       Exec the venv's python with ARGS.
#
# The base interpreter is $PYTHON (default python3, 3.10 or newer); the
# browser is $CHROMIUM (default: chromium on the PATH). Only the `install`
# result goes to stdout; progress and logs go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"
REQUIREMENTS="$HERE/requirements.txt"
BASE_PYTHON="${PYTHON:-python3}"
SERVICES_HOME="${WALRELAY_SERVICES_HOME:-$HOME/.cache/walrelay}"
REQ_SUM="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
INSTALL_DIR="$SERVICES_HOME/browser-${REQ_SUM:0:16}"
VENV="$INSTALL_DIR/venv"
VENV_PYTHON="$VENV/bin/python"

log() { echo "browser.sh: $*" >&2; }
die() { log "$*"; exit 1; }

have_chromium() { [[ -n "${CHROMIUM:-}" && -x "${CHROMIUM:-}" ]] || command -v chromium >/dev/null; }

# ---------------------------------------------------------------- install ---

# The marker holds the full checksum of requirements.txt; a venv whose base
# interpreter is gone (dangling bin/python) is rebuilt too.
installed() {
  [[ -f "$INSTALL_DIR/.installed" && "$(cat "$INSTALL_DIR/.installed")" == "$REQ_SUM" && -x "$VENV_PYTHON" ]] && have_chromium
}

install_chromium() {
  have_chromium && return 0
  [[ "$(id -u)" == 0 ]] || die "no chromium: install Debian's chromium package (apt-get install chromium), or set CHROMIUM"
  log "installing Debian's chromium with apt-get ..."
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2 || die "apt-get install chromium failed"
  have_chromium || die "chromium is still missing after apt-get install chromium"
}

cmd_install() {
  if ! installed; then
    mkdir -p "$INSTALL_DIR"
    # Serialise concurrent installs (parallel test processes).
    exec 9>"$INSTALL_DIR/.lock"
    flock 9
    if ! installed; then
      install_chromium
      if [[ ! -f "$INSTALL_DIR/.installed" || "$(cat "$INSTALL_DIR/.installed")" != "$REQ_SUM" || ! -x "$VENV_PYTHON" ]]; then
        command -v "$BASE_PYTHON" >/dev/null || die "no $BASE_PYTHON (set PYTHON)"
        "$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
          || die "$BASE_PYTHON is older than 3.10"
        log "creating $VENV from $REQUIREMENTS ..."
        rm -f "$INSTALL_DIR/.installed"
        rm -rf "$VENV"
        if "$BASE_PYTHON" -m venv "$VENV" >&2 2>&1; then
          "$VENV_PYTHON" -m pip install -q --no-input --disable-pip-version-check \
            -r "$REQUIREMENTS" >&2 || die "pip install failed"
        else
          # Debian without python3-venv (no ensurepip): a venv without pip,
          # filled by the base interpreter's pip (22.3 or newer has --python).
          log "python3 -m venv failed (no ensurepip?): venv without pip, filled by the base pip"
          rm -rf "$VENV"
          "$BASE_PYTHON" -m venv --without-pip "$VENV" >&2 || die "python3 -m venv --without-pip failed"
          "$BASE_PYTHON" -m pip --python "$VENV_PYTHON" install -q --no-input \
            --disable-pip-version-check -r "$REQUIREMENTS" >&2 \
            || die "pip install failed (install python3-venv, or a pip of 22.3 or newer)"
        fi
        "$VENV_PYTHON" -c 'import websockets.asyncio.client' >&2 \
          || die "the venv's packages do not import"
        # Written last: an interrupted run leaves no marker and is redone.
        echo "$REQ_SUM" >"$INSTALL_DIR/.installed"
        log "installed the venv, $(du -sh "$VENV" | cut -f1)"
      fi
    fi
    exec 9>&-
  fi
  echo "$VENV_PYTHON"
}

ensure_installed() { installed || cmd_install >/dev/null; }

# ------------------------------------------------------------------- main ---

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

(($#)) || usage
cmd="$1"; shift
case "$cmd" in
  install) cmd_install "$@" ;;
  run) ensure_installed; exec "$VENV_PYTHON" "$HERE/live_view.py" "$@" ;;
  python) ensure_installed; exec "$VENV_PYTHON" "$@" ;;
  -h|--help|help) usage ;;
  *) log "unknown command: $cmd"; usage ;;
esac
