#!/usr/bin/env bash
# make demo: a host on the default device (PoCL's CPU device), two partitions, the sample guest in
# each at the same time, each partition's memory use, and a clean shutdown.
set -euo pipefail
BUILD=${1:-build}
BIN="$(cd "$BUILD/bin" && pwd)"
DEMO_DIR=$(mktemp -d /tmp/gpup-demo.XXXXXX)
export GPUP_RUNTIME_DIR="$DEMO_DIR/run" GPUP_STATE_DIR="$DEMO_DIR/state"
export GPUP_KMD_PATH="$(cd "$BUILD/lib" && pwd)"
GPUP="$BIN/gpup"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
  "$GPUP" host stop >/dev/null 2>&1 || true
  rm -rf "$DEMO_DIR"
}
trap cleanup EXIT

say "Starting the host (gpupd) with the built-in configuration: one adapter on PoCL's CPU device"
"$GPUP" host start
"$GPUP" host status

say "Partitionable adapters"
"$GPUP" adapters

say "Two partitions: alpha (max 256 MiB) and beta (max 512 MiB), one gpup-vmwp worker each"
"$GPUP" vm add alpha --max-vram 256MiB
"$GPUP" vm add beta --max-vram 512MiB
"$GPUP" vm list

say "The sample guest (build/bin/gpup-sample-vector-add) in each partition, at the same time"
# Each guest keeps its buffers until its stdin (a fifo held open here) closes.
mkfifo "$DEMO_DIR/alpha.in" "$DEMO_DIR/beta.in"
"$GPUP" run --vm alpha -- "$BIN/gpup-sample-vector-add" 4194304 hold < "$DEMO_DIR/alpha.in" > "$DEMO_DIR/alpha.out" 2>&1 &
a=$!
"$GPUP" run --vm beta -- "$BIN/gpup-sample-vector-add" 16777216 hold < "$DEMO_DIR/beta.in" > "$DEMO_DIR/beta.out" 2>&1 &
b=$!
exec 5> "$DEMO_DIR/alpha.in" 6> "$DEMO_DIR/beta.in"
rc=0
for _ in $(seq 600); do
  grep -q holding "$DEMO_DIR/alpha.out" && grep -q holding "$DEMO_DIR/beta.out" && break
  kill -0 $a 2>/dev/null || break
  kill -0 $b 2>/dev/null || break
  sleep 0.1
done
cat "$DEMO_DIR/alpha.out" "$DEMO_DIR/beta.out"

say "Partitions while both guests hold their memory"
"$GPUP" vm list
exec 5>&- 6>&-
wait $a || rc=1
wait $b || rc=1

say "An unmodified OpenCL program (build/bin/gpup-sample-opencl-saxpy, linked to libOpenCL only) in partition beta"
"$GPUP" run --vm beta -- "$BIN/gpup-sample-opencl-saxpy" 4194304 || rc=1
"$GPUP" run --vm beta -- clinfo -l || rc=1

say "A guest asking for more than its partition allows is refused (alpha has 256 MiB; 3 x 128 MiB buffers)"
if "$GPUP" run --vm alpha -- "$BIN/gpup-sample-vector-add" 33554432 > "$DEMO_DIR/over.out" 2>&1; then
  echo "unexpected: the over-budget run succeeded"; rc=1
else
  grep -m1 "QUOTA_EXCEEDED" "$DEMO_DIR/over.out" || { cat "$DEMO_DIR/over.out"; rc=1; }
fi

say "Partitions after the guests exited (their memory returned)"
"$GPUP" vm list

say "Stopping the host"
"$GPUP" host stop
trap - EXIT
rm -rf "$DEMO_DIR"
[ $rc -eq 0 ] && echo "demo: done" || echo "demo: FAILED"
exit $rc
