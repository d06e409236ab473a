#!/usr/bin/env bash
# Driver for the differential tests: runs an OpenCL program natively on PoCL and/or as a gpup
# guest (through a private gpupd started on temporary runtime/state directories) and compares.
#
#   differential.sh native  -- PROGRAM ARGS...   run natively (only PoCL visible); exit = its exit
#   differential.sh compare -- PROGRAM ARGS...   run natively and as a guest of partition "a"
#                                                (256 MiB); both must exit 0 with identical stdout
#   differential.sh guest   -- PROGRAM ARGS...   run as a guest of partition "a" only; exit = its exit
#   differential.sh clinfo                       `clinfo` and `clinfo -l` as guests: exit 0, a
#                                                platform named with "gpup", 268435456 bytes of
#                                                global memory (the partition's 256 MiB)
#
# Options (before the mode; the ctest registration passes them):
#   --gpup PATH         the gpup CLI            (default: <build>/bin/gpup)
#   --kmd-dir DIR       GPUP_KMD_PATH for gpupd (default: <build>/lib)
#   --build-dir DIR     the build tree, for POCL_CACHE_DIR=<build>/pocl-cache (default: ./build)
#   --keep              keep the temporary directory (logs, outputs) for inspection
#   --preload LIBS      LD_PRELOAD for guest runs: a sanitizer build's ICD loaded into a program
#                       that was not built with the sanitizers (clinfo, python3) needs their runtime
#
# GPUP_DIFF_MAX_VRAM (environment) sets partition a's max VRAM (default 256MiB; the clinfo mode
# expects the default).
#
# Only stdout is compared, and only the lines a test program prints as results: lines starting
# with "[", two spaces, "SUMMARY " or "RESULT " (so log lines of the implementations, which go
# anywhere, cannot cause a mismatch). stderr of each run is kept in the temp directory.
set -uo pipefail

BUILD_DIR="${BUILD_DIR:-$PWD/build}"
GPUP=""
KMD_DIR=""
KEEP=0
PRELOAD=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpup) GPUP="$2"; shift 2 ;;
    --kmd-dir) KMD_DIR="$2"; shift 2 ;;
    --build-dir) BUILD_DIR="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --preload) PRELOAD="$2"; shift 2 ;;
    native|compare|guest|clinfo) break ;;
    *) echo "differential.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
MODE="${1:-}"
shift || true
[ "${1:-}" = "--" ] && shift
GPUP="${GPUP:-$BUILD_DIR/bin/gpup}"
KMD_DIR="${KMD_DIR:-$BUILD_DIR/lib}"

TMP="$(mktemp -d /tmp/gpup-diff-XXXXXX)"
HOST_UP=0
cleanup() {
  if [ "$HOST_UP" = 1 ]; then
    host_env timeout 60 "$GPUP" host stop >>"$TMP/host.log" 2>&1 || true
  fi
  if [ "$KEEP" = 1 ]; then
    echo "differential.sh: kept $TMP" >&2
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

mkdir -p "$BUILD_DIR/pocl-cache"
export POCL_CACHE_DIR="$BUILD_DIR/pocl-cache"

# Native: the ICD loader sees only PoCL. ocl-icd 2.3: when OCL_ICD_VENDORS names a directory it
# replaces /etc/OpenCL/vendors; OCL_ICD_FILENAMES would take priority, so it is unset.
mkdir -p "$TMP/vendors"
cp /etc/OpenCL/vendors/pocl.icd "$TMP/vendors/" || { echo "no /etc/OpenCL/vendors/pocl.icd" >&2; exit 2; }
run_native() {
  env -u OCL_ICD_FILENAMES OCL_ICD_VENDORS="$TMP/vendors" "$@"
}

host_env() {
  env -u OCL_ICD_FILENAMES -u OCL_ICD_VENDORS GPUP_RUNTIME_DIR="$TMP/run" GPUP_STATE_DIR="$TMP/state" \
    GPUP_LOG="${GPUP_LOG:-info}" GPUP_KMD_PATH="$KMD_DIR" "$@"
}

# The same host as tests/e2e: one PoCL adapter behind the OpenCL KMD, partition "a" of 256 MiB.
host_up() {
  [ -x "$GPUP" ] || { echo "differential.sh: $GPUP not built" >&2; exit 2; }
  cat >"$TMP/gpupd.toml" <<'EOF'
[[adapter]]
name = "pocl0"
kmd = "opencl"
EOF
  if ! host_env timeout 120 "$GPUP" host start --config "$TMP/gpupd.toml" >>"$TMP/host.log" 2>&1; then
    echo "differential.sh: gpup host start failed:" >&2; cat "$TMP/host.log" >&2; exit 2
  fi
  HOST_UP=1
  if ! host_env timeout 60 "$GPUP" vm add a --max-vram "${GPUP_DIFF_MAX_VRAM:-256MiB}" >>"$TMP/host.log" 2>&1; then
    echo "differential.sh: gpup vm add failed:" >&2; cat "$TMP/host.log" >&2; exit 2
  fi
}

# gpup run sets OCL_ICD_VENDORS for the guest itself.
run_guest() {
  if [ -n "$PRELOAD" ]; then
    host_env timeout 300 "$GPUP" run --vm a -- env LD_PRELOAD="$PRELOAD" "$@"
  else
    host_env timeout 300 "$GPUP" run --vm a -- "$@"
  fi
}

filter() { grep -E '^(\[|  |SUMMARY |RESULT )' "$1" || true; }

case "$MODE" in
  native)
    [ $# -gt 0 ] || { echo "usage: differential.sh native -- PROGRAM ARGS" >&2; exit 2; }
    run_native "$@"
    exit $?
    ;;
  guest)
    [ $# -gt 0 ] || { echo "usage: differential.sh guest -- PROGRAM ARGS" >&2; exit 2; }
    host_up
    run_guest "$@"
    rc=$?
    [ $rc = 0 ] || { echo "--- gpup host log (tail) ---"; tail -n 40 "$TMP/host.log"; }
    exit $rc
    ;;
  compare)
    [ $# -gt 0 ] || { echo "usage: differential.sh compare -- PROGRAM ARGS" >&2; exit 2; }
    run_native "$@" >"$TMP/native.out" 2>"$TMP/native.err"
    native_rc=$?
    host_up
    run_guest "$@" >"$TMP/guest.out" 2>"$TMP/guest.err"
    guest_rc=$?
    filter "$TMP/native.out" >"$TMP/native.cmp"
    filter "$TMP/guest.out" >"$TMP/guest.cmp"
    status=0
    if [ "$native_rc" != 0 ]; then
      echo "native run failed (exit $native_rc); stderr:"; tail -n 30 "$TMP/native.err"; status=1
    fi
    if [ "$guest_rc" != 0 ]; then
      echo "gpup guest run failed (exit $guest_rc); stderr:"; tail -n 30 "$TMP/guest.err"; status=1
    fi
    if ! cmp -s "$TMP/native.cmp" "$TMP/guest.cmp"; then
      echo "MISMATCH between native (<) and gpup guest (>), with the case each line belongs to:"
      # Annotate every line with its case name so a difference is easy to place.
      annotate() { awk '/^\[/{c=$0} {print c " " $0}' "$1"; }
      diff <(annotate "$TMP/native.cmp") <(annotate "$TMP/guest.cmp") | head -n 200
      status=1
    else
      echo "identical: $(wc -l <"$TMP/native.cmp") lines"
    fi
    if [ "$status" != 0 ]; then
      echo "--- gpup host log (tail) ---"; tail -n 40 "$TMP/host.log"
    fi
    exit $status
    ;;
  clinfo)
    command -v clinfo >/dev/null || { echo "clinfo not installed" >&2; exit 2; }
    host_up
    status=0
    run_guest clinfo >"$TMP/clinfo.out" 2>"$TMP/clinfo.err"; rc=$?
    [ $rc = 0 ] || { echo "clinfo exited $rc"; tail -n 30 "$TMP/clinfo.err"; status=1; }
    grep -Eiq '^[[:space:]]*Platform Name[[:space:]]+.*gpup' "$TMP/clinfo.out" ||
      { echo "clinfo: no platform named with \"gpup\""; status=1; }
    grep -Eq '^[[:space:]]*Global memory size[[:space:]]+268435456([^0-9]|$)' "$TMP/clinfo.out" ||
      { echo "clinfo: device global memory size is not 268435456:";
        grep -E 'Global memory size' "$TMP/clinfo.out"; status=1; }
    run_guest clinfo -l >"$TMP/clinfo-l.out" 2>"$TMP/clinfo-l.err"; rc=$?
    [ $rc = 0 ] || { echo "clinfo -l exited $rc"; tail -n 30 "$TMP/clinfo-l.err"; status=1; }
    grep -Eiq '^Platform #0: .*gpup' "$TMP/clinfo-l.out" ||
      { echo "clinfo -l: platform #0 not named with \"gpup\""; cat "$TMP/clinfo-l.out"; status=1; }
    grep -Eq 'Device #0' "$TMP/clinfo-l.out" || { echo "clinfo -l: no device #0"; status=1; }
    if [ $status = 0 ]; then echo "clinfo: ok"; else echo "--- clinfo output ---"; head -n 60 "$TMP/clinfo.out"; fi
    exit $status
    ;;
  *)
    echo "usage: differential.sh [--gpup P] [--kmd-dir D] [--build-dir B] [--keep] native|compare|guest|clinfo [-- PROGRAM ARGS]" >&2
    exit 2
    ;;
esac
