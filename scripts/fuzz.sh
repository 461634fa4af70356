#!/usr/bin/env bash
# Fuzzing: runs the cargo-fuzz targets in fuzz/fuzz_targets/ one after another, each for a given
# time, and prints per target the executions and whether it crashed. Exits non-zero when a
# target crashed (or did not build); the crashing input is in fuzz/artifacts/<target>/.
#
# Usage: scripts/fuzz.sh [--seconds N] [--sanitizer address|none] [TARGET...]
#   --seconds N      time per target (default 60)
#   --sanitizer S    address (default; falls back to none, saying so, if it does not build)
#   TARGET...        default: every target in fuzz/fuzz_targets/ (copy_text envelope
#                    pgoutput value)
#
# Installs cargo-fuzz when missing. Works on a stable toolchain: cargo-fuzz passes nightly
# flags (-Zsanitizer=address and others), which RUSTC_BOOTSTRAP=1 lets stable rustc accept.
# Builds into fuzz/target unless CARGO_TARGET_DIR is set. Inputs that add coverage are kept in
# fuzz/corpus/<target>/ under their SHA-1 (ignored by git; the named files there are the seeds).
# Reproduce a crash: RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
sanitizer=address
sanitizer_given=false
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --seconds)
        seconds="${2:?--seconds needs a number}"
        shift 2
        ;;
    --seconds=*)
        seconds="${1#*=}"
        shift
        ;;
    --sanitizer)
        sanitizer="${2:?--sanitizer needs address or none}"
        sanitizer_given=true
        shift 2
        ;;
    --sanitizer=*)
        sanitizer="${1#*=}"
        sanitizer_given=true
        shift
        ;;
    -h | --help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
        exit 0
        ;;
    -*)
        echo "fuzz.sh: unknown option $1 (see --help)" >&2
        exit 2
        ;;
    *)
        targets+=("$1")
        shift
        ;;
    esac
done
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: --seconds must be a positive whole number, not '$seconds'" >&2
    exit 2
fi
case "$sanitizer" in address | none) ;; *)
    echo "fuzz.sh: --sanitizer must be address or none" >&2
    exit 2
    ;;
esac

all=()
for f in fuzz/fuzz_targets/*.rs; do
    all+=("$(basename "$f" .rs)")
done
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=("${all[@]}")
fi
for t in "${targets[@]}"; do
    if [[ ! -f "fuzz/fuzz_targets/$t.rs" ]]; then
        echo "fuzz.sh: no target '$t' (targets: ${all[*]})" >&2
        exit 2
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --version 0.13.2
fi

export RUSTC_BOOTSTRAP=1
target_dir="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"
logs="$target_dir/fuzz-logs"
mkdir -p "$logs"

# One build for all targets (cargo fuzz build builds every target when given none).
echo "fuzz.sh: building (sanitizer $sanitizer, log $logs/build.log)" >&2
build_ok=true
if [[ ${#targets[@]} -eq ${#all[@]} ]]; then
    cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir" >"$logs/build.log" 2>&1 || build_ok=false
else
    for t in "${targets[@]}"; do
        cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" >>"$logs/build.log" 2>&1 || build_ok=false
    done
fi
if ! $build_ok; then
    tail -n 30 "$logs/build.log" >&2
    if [[ "$sanitizer" == address && "$sanitizer_given" == false ]]; then
        echo "fuzz.sh: the AddressSanitizer build failed; falling back to --sanitizer none" >&2
        sanitizer=none
        cargo fuzz build --sanitizer none --target-dir "$target_dir" >"$logs/build.log" 2>&1 || {
            tail -n 30 "$logs/build.log" >&2
            echo "fuzz.sh: build failed" >&2
            exit 1
        }
    else
        echo "fuzz.sh: build failed" >&2
        exit 1
    fi
fi

failed=0
summary=()
for t in "${targets[@]}"; do
    log="$logs/$t.log"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    extra=()
    if [[ -f "fuzz/dict/$t.dict" ]]; then
        extra+=("-dict=fuzz/dict/$t.dict")
    fi
    echo "fuzz.sh: $t for ${seconds}s (log $log)" >&2
    status=0
    cargo fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 "${extra[@]}" \
        >"$log" 2>&1 || status=$?
    # libFuzzer's closing lines: "Done N runs in S second(s)" and the final stats.
    runs=$(grep -Eo '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1 || true)
    if [[ -z "$runs" ]]; then
        runs=$(grep -Eo '^Done [0-9]+ runs' "$log" | grep -Eo '[0-9]+' | tail -n 1 || true)
    fi
    per_s=$(grep -Eo '^stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1 || true)
    if [[ $status -eq 0 ]] && grep -Eq '^Done [0-9]+ runs' "$log"; then
        verdict="no crash"
    elif grep -q 'INFO: Seed:' "$log"; then
        verdict="CRASHED ($(grep -Eo 'SUMMARY: [^ ]+: [^ ]+( [^ ]+)?' "$log" | tail -n 1 || echo "exit $status"))"
        artifact=$(grep -Eo 'Test unit written to [^ ]+' "$log" | tail -n 1 | sed 's/Test unit written to //' || true)
        [[ -n "$artifact" ]] && verdict="$verdict, input $artifact"
        grep -E "panicked at|^thread '" "$log" | head -n 3 >&2 || true
        failed=1
    else
        verdict="DID NOT RUN (exit $status)"
        tail -n 20 "$log" >&2
        failed=1
    fi
    summary+=("$(printf '%-10s %6ss %14s executions %9s exec/s  %s' "$t" "$seconds" "${runs:-?}" "${per_s:-?}" "$verdict")")
done

echo
echo "fuzzing summary (sanitizer: $sanitizer)"
printf '%s\n' "${summary[@]}"
exit $failed
