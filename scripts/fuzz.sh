#!/usr/bin/env bash
# Runs the fuzz targets for a bounded time each. Usage: fuzz.sh BUILD_DIR SECONDS
set -euo pipefail
BUILD=$1
SECONDS_PER_TARGET=${2:-60}
CORPUS="$BUILD/fuzz-corpus/host_dispatch"
mkdir -p "$CORPUS"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
"$BUILD/bin/fuzz_host_dispatch" "$CORPUS" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=4096 \
  -max_len=8192 -print_final_stats=1 2>&1 | tail -n 25
echo "fuzz: fuzz_host_dispatch ran ${SECONDS_PER_TARGET}s without a finding"
