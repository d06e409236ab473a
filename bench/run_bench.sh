#!/usr/bin/env bash
# `make bench`: runs gpup's benchmarks and writes bench/results/latest.json (and a Markdown
# rendering next to it). Build first (make bench does).
#
#   run_bench.sh [--build-dir B] [--rounds R] [--seconds S] [--partitions "1 2 4 8"] [--quick]
#                [--out FILE] [--skip-micro] [--skip-ab] [--skip-multi] [--keep]
#
# 1. micro-benchmarks (Google Benchmark): channel, codec, thunks against the fake host and, as a
#    guest of a private gpupd, against a real worker;
# 2. cl_bench natively (only PoCL visible) and as a guest of partition "a", alternating which goes
#    first, R rounds (default 5); samples are pooled and the gpup/native ratios computed;
# 3. multi-partition: N = 1, 2, 4, 8 processes each in its own partition running the same workload
#    at once (empty kernel + clFinish, and SGEMM 256 end to end) for S seconds (default 4), and the
#    same N native processes for comparison: aggregate throughput and each process's share.
# Load (uptime) is recorded before and after each phase: the machine may be shared.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD_DIR="$PWD/build"; GPUP=""; KMD_DIR=""
ROUNDS=5; SECONDS_MP=4; PARTS="1 2 4 8"; QUICK=0; OUT="$HERE/results/latest.json"
DO_MICRO=1; DO_AB=1; DO_MULTI=1; KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --gpup) GPUP="$2"; shift 2 ;;
    --kmd-dir) KMD_DIR="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --seconds) SECONDS_MP="$2"; shift 2 ;;
    --partitions) PARTS="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --skip-micro) DO_MICRO=0; shift ;;
    --skip-ab) DO_AB=0; shift ;;
    --skip-multi) DO_MULTI=0; shift ;;
    --keep) KEEP=1; shift ;;
    *) echo "run_bench.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"
GPUP="${GPUP:-$BUILD_DIR/bin/gpup}"; KMD_DIR="${KMD_DIR:-$BUILD_DIR/lib}"
BIN="$BUILD_DIR/bin"
TMP="$(mktemp -d /tmp/gpup-bench-XXXXXX)"
. "$HERE/host.sh"
cleanup() { host_down; if [ "$KEEP" = 1 ]; then echo "run_bench.sh: kept $TMP" >&2; else rm -rf "$TMP"; fi; }
trap cleanup EXIT
bench_env_init || exit 2

CLQ=(); GB_TIME=(--benchmark_min_time=0.5); MPW=256
if [ "$QUICK" = 1 ]; then CLQ=(--quick); GB_TIME=(--benchmark_min_time=0.01); fi

load() { cut -d' ' -f1-3 /proc/loadavg; }
LOADS=()
note_load() { LOADS+=("\"$1\": \"$(load)\""); echo "== $1 (load $(load))" >&2; }

note_load start
if [ "$DO_MICRO" = 1 ]; then
  echo "== micro-benchmarks" >&2
  "$BIN/bench_channel" "${GB_TIME[@]}" --benchmark_format=json >"$TMP/channel.json" 2>"$TMP/channel.err" ||
    echo "bench_channel failed" >&2
  "$BIN/bench_protocol" --benchmark_min_time=0.05 --benchmark_format=json >"$TMP/protocol.json" 2>"$TMP/protocol.err" ||
    echo "bench_protocol failed" >&2
  "$BIN/bench_kmt" "${GB_TIME[@]}" --benchmark_format=json \
    >"$TMP/kmt_fake.json" 2>"$TMP/kmt_fake.err" || echo "bench_kmt (fake host) failed" >&2
  note_load after_micro_local
fi

if [ "$DO_MICRO" = 1 ] || [ "$DO_AB" = 1 ]; then
  host_up a || exit 2
  if [ "$DO_MICRO" = 1 ]; then
    run_guest a "$BIN/bench_kmt" "${GB_TIME[@]}" --benchmark_format=json >"$TMP/kmt_worker.json" 2>"$TMP/kmt_worker.err" ||
      { echo "bench_kmt (worker) failed:" >&2; tail -n 5 "$TMP/kmt_worker.err" >&2; }
  fi
  if [ "$DO_AB" = 1 ]; then
    # Warm the kernel cache on both sides first (not measured).
    run_native "$BIN/cl_bench" --quick >/dev/null 2>&1
    run_guest a "$BIN/cl_bench" --quick >/dev/null 2>&1
    for r in $(seq 1 "$ROUNDS"); do
      if [ $((r % 2)) = 1 ]; then order="native guest"; else order="guest native"; fi
      for m in $order; do
        echo "== round $r/$ROUNDS: $m (load $(load))" >&2
        if [ "$m" = native ]; then
          run_native "$BIN/cl_bench" "${CLQ[@]}" >"$TMP/cl_native_$r.out" 2>"$TMP/cl_native_$r.err" ||
            { echo "native run failed" >&2; tail -n 5 "$TMP/cl_native_$r.err" >&2; }
        else
          run_guest a "$BIN/cl_bench" "${CLQ[@]}" >"$TMP/cl_guest_$r.out" 2>"$TMP/cl_guest_$r.err" ||
            { echo "guest run failed" >&2; tail -n 5 "$TMP/cl_guest_$r.err" >&2; }
        fi
      done
    done
    note_load after_ab
  fi
  host_down
fi

if [ "$DO_MULTI" = 1 ]; then
  max=0; for n in $PARTS; do [ "$n" -gt "$max" ] && max=$n; done
  vms=(); for i in $(seq 1 "$max"); do vms+=("p$i"); done
  host_up "${vms[@]}" || exit 2
  for wl in launch sgemm; do
    for mode in native gpup; do
      for n in $PARTS; do
        echo "== multi-partition: $wl, $mode, $n at once (load $(load))" >&2
        start=$(( $(date +%s%3N) + 2000 + 400 * n ))
        pids=()
        for i in $(seq 1 "$n"); do
          args=("$BIN/cl_bench" "${CLQ[@]}" --throughput "$wl" --seconds "$SECONDS_MP" --start-at "$start")
          if [ "$mode" = native ]; then
            run_native "${args[@]}" >"$TMP/mp_${wl}_${mode}_${n}_$i.out" 2>"$TMP/mp_${wl}_${mode}_${n}_$i.err" &
          else
            run_guest "p$i" "${args[@]}" >"$TMP/mp_${wl}_${mode}_${n}_$i.out" 2>"$TMP/mp_${wl}_${mode}_${n}_$i.err" &
          fi
          pids+=($!)
        done
        for p in "${pids[@]}"; do wait "$p" || echo "a $mode process failed" >&2; done
        grep -l "started late" "$TMP"/mp_${wl}_${mode}_${n}_*.err >/dev/null 2>&1 &&
          echo "warning: a process started late ($wl $mode $n)" >&2
      done
    done
  done
  host_down
  note_load after_multi
fi

{
  echo "{"
  echo "\"date\": \"$(date -Iseconds)\","
  echo "\"host\": \"$(hostname)\","
  echo "\"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')\","
  echo "\"nproc\": $(nproc),"
  echo "\"mem_total_kib\": $(awk '/MemTotal/{print $2}' /proc/meminfo),"
  echo "\"kernel\": \"$(uname -r)\","
  echo "\"pocl\": \"$(dpkg-query -W -f='${Version}' pocl-opencl-icd 2>/dev/null)\","
  echo "\"git\": \"$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null)\","
  # Uncommitted changes to what was measured (src/, include/): the figures are of that tree.
  echo "\"git_uncommitted_files\": $(git -C "$HERE/.." status --porcelain -- src include 2>/dev/null | wc -l),"
  echo "\"rounds\": $ROUNDS, \"quick\": $QUICK, \"multi_seconds\": $SECONDS_MP,"
  echo "\"load\": {$(IFS=,; echo "${LOADS[*]}")}"
  echo "}"
} >"$TMP/meta.json"
mkdir -p "$(dirname "$OUT")"
python3 "$HERE/results.py" summarize "$TMP" --out "$OUT" --md "${OUT%.json}.md"
echo "results: $OUT" >&2
