#!/usr/bin/env bash
# Runs the fuzz targets for a bounded time each. Usage: fuzz.sh BUILD_DIR SECONDS
# Every target runs even when an earlier one finds something; the script fails if any did.
# Corpora grow in BUILD_DIR/fuzz-corpus/NAME (seeded from tests/fuzz/corpus/TARGET when it exists),
# crashing inputs land in BUILD_DIR/fuzz-artifacts/TARGET/.
set -euo pipefail
BUILD=$1
SECONDS_PER_TARGET=${2:-60}
SEEDS="$(cd "$(dirname "$0")/.." && pwd)/tests/fuzz/corpus"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
# The fuzz build has UBSan too: a report must stop the run like a crash, or nobody sees it.
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
failed=()

# fuzz TARGET CORPUS_NAME MAX_LEN
fuzz() {
  local target=$1 corpus="$BUILD/fuzz-corpus/$2" artifacts="$BUILD/fuzz-artifacts/$1/"
  local dirs=("$corpus")
  mkdir -p "$corpus" "$artifacts"
  [ -d "$SEEDS/$target" ] && dirs+=("$SEEDS/$target")
  if "$BUILD/bin/$target" "${dirs[@]}" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=4096 \
    -max_len="$3" -print_final_stats=1 -artifact_prefix="$artifacts" 2>&1 | grep -v '# Uses:' | tail -n 25; then
    echo "fuzz: $target ran ${SECONDS_PER_TARGET}s without a finding"
  else
    echo "fuzz: $target FOUND A CRASH (input in $artifacts)"
    failed+=("$target")
  fi
}

fuzz fuzz_host_dispatch host_dispatch 8192
fuzz fuzz_ring ring 4096
fuzz fuzz_handshake handshake 4096

if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: findings in ${failed[*]}"
  exit 1
fi
