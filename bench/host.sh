# Sourced by run_bench.sh and smoke.sh: a private gpupd on temporary runtime/state directories
# (the same host as tests/differential: one PoCL adapter behind the OpenCL KMD), and helpers to
# run a program natively (only PoCL visible to the ICD loader) or as a guest of a partition.
#
# Needs: GPUP (the gpup CLI), KMD_DIR (GPUP_KMD_PATH), BUILD_DIR (for the PoCL cache), TMP (a
# private temporary directory the caller removes).

bench_env_init() {
  mkdir -p "$BUILD_DIR/pocl-cache" "$TMP/vendors"
  # One kernel cache for native runs and for the workers, so "warm build" is warm on both sides.
  export POCL_CACHE_DIR="$BUILD_DIR/pocl-cache"
  cp /etc/OpenCL/vendors/pocl.icd "$TMP/vendors/" || { echo "no /etc/OpenCL/vendors/pocl.icd" >&2; return 2; }
  HOST_UP=0
}

run_native() {
  env -u OCL_ICD_FILENAMES OCL_ICD_VENDORS="$TMP/vendors" "$@"
}

host_env() {
  env -u OCL_ICD_FILENAMES -u OCL_ICD_VENDORS GPUP_RUNTIME_DIR="$TMP/run" GPUP_STATE_DIR="$TMP/state" \
    GPUP_LOG="${GPUP_LOG:-warn}" GPUP_KMD_PATH="$KMD_DIR" "$@"
}

# host_up NAME...: starts gpupd and adds a 256 MiB partition per name.
host_up() {
  [ -x "$GPUP" ] || { echo "bench: $GPUP not built" >&2; return 2; }
  printf '[[adapter]]\nname = "pocl0"\nkmd = "opencl"\n' >"$TMP/gpupd.toml"
  if ! host_env timeout 120 "$GPUP" host start --config "$TMP/gpupd.toml" >>"$TMP/host.log" 2>&1; then
    echo "bench: gpup host start failed:" >&2; tail -n 30 "$TMP/host.log" >&2; return 2
  fi
  HOST_UP=1
  local vm
  for vm in "$@"; do
    if ! host_env timeout 60 "$GPUP" vm add "$vm" --max-vram 256MiB >>"$TMP/host.log" 2>&1; then
      echo "bench: gpup vm add $vm failed:" >&2; tail -n 30 "$TMP/host.log" >&2; return 2
    fi
  done
}

host_down() {
  if [ "${HOST_UP:-0}" = 1 ]; then
    host_env timeout 60 "$GPUP" host stop >>"$TMP/host.log" 2>&1 || true
    HOST_UP=0
  fi
}

# run_guest VM PROGRAM ARGS...
run_guest() {
  local vm="$1"; shift
  host_env timeout 600 "$GPUP" run --vm "$vm" -- "$@"
}
