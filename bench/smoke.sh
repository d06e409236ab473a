#!/usr/bin/env bash
# ctest bench_smoke: every benchmark runs for a tiny iteration count and prints well-formed
# output. Nothing here looks at a figure. Micro-benchmarks (fake host), cl_bench --quick natively
# and as a guest, bench_kmt against a real worker, and one short multi-partition throughput run.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD_DIR="$PWD/build"; GPUP=""; KMD_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --gpup) GPUP="$2"; shift 2 ;;
    --kmd-dir) KMD_DIR="$2"; shift 2 ;;
    *) echo "smoke.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
GPUP="${GPUP:-$BUILD_DIR/bin/gpup}"; KMD_DIR="${KMD_DIR:-$BUILD_DIR/lib}"
BIN="$BUILD_DIR/bin"
TMP="$(mktemp -d /tmp/gpup-bench-smoke-XXXXXX)"
. "$HERE/host.sh"
trap 'host_down; rm -rf "$TMP"' EXIT
bench_env_init || exit 2
CHECK="python3 $HERE/results.py"
status=0
step() {  # step NAME COMMAND...: runs, reports failure with the output's tail
  local name="$1"; shift
  if "$@" >"$TMP/$name.out" 2>"$TMP/$name.err"; then
    echo "ok   $name"
  else
    echo "FAIL $name"; tail -n 20 "$TMP/$name.err"; tail -n 5 "$TMP/$name.out"; status=1
  fi
}
GB=(--benchmark_min_time=0.0001 --benchmark_format=json)

step channel "$BIN/bench_channel" "${GB[@]}"
step channel_check $CHECK check-gbench "$TMP/channel.out"
step protocol "$BIN/bench_protocol" "${GB[@]}"
step protocol_check $CHECK check-gbench "$TMP/protocol.out"
step kmt_fake "$BIN/bench_kmt" "${GB[@]}"
step kmt_fake_check $CHECK check-gbench "$TMP/kmt_fake.out"
step cl_native run_native "$BIN/cl_bench" --quick
step cl_native_check $CHECK check-cl "$TMP/cl_native.out"

if host_up a b >/dev/null 2>"$TMP/host_up.err"; then
  step cl_guest run_guest a "$BIN/cl_bench" --quick
  step cl_guest_check $CHECK check-cl "$TMP/cl_guest.out" --platform gpup
  step kmt_worker run_guest a "$BIN/bench_kmt" "${GB[@]}"
  step kmt_worker_check $CHECK check-gbench "$TMP/kmt_worker.out"
  start=$(( $(date +%s%3N) + 1500 ))
  run_guest a "$BIN/cl_bench" --quick --throughput launch --seconds 0.2 --start-at $start >"$TMP/tp_a.out" 2>"$TMP/tp_a.err" &
  pa=$!
  run_guest b "$BIN/cl_bench" --quick --throughput sgemm --seconds 0.2 --start-at $start >"$TMP/tp_b.out" 2>"$TMP/tp_b.err"
  rb=$?
  wait $pa; ra=$?
  if [ $ra = 0 ] && [ $rb = 0 ]; then echo "ok   throughput"; else echo "FAIL throughput ($ra $rb)"; cat "$TMP"/tp_*.err; status=1; fi
  step throughput_check $CHECK check-throughput "$TMP/tp_a.out" "$TMP/tp_b.out"
else
  echo "FAIL host_up"; cat "$TMP/host_up.err"; tail -n 30 "$TMP/host.log"; status=1
fi
[ $status = 0 ] || { echo "--- host log (tail) ---"; tail -n 30 "$TMP/host.log"; }
exit $status
