#!/usr/bin/env bash
# Configures and builds the libFuzzer targets with clang into build-fuzz/ (BUILD_DIR
# overrides), ASan and UBSan on, then runs each for SECONDS (default 60) with its corpus
# and regression inputs: one ctest test per target (label fuzz, each one tests/fuzz/run.sh),
# JOBS (default: the cores) at a time, since every fuzzer is one process on one core.
# Prints each target's executions, crashes and coverage; exits non-zero if any crashed.
# Usage: scripts/fuzz.sh [SECONDS [TARGET...]]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift $(( $# > 0 ? 1 : 0 ))
BUILD_DIR=${BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
CC=${CC:-clang-14} CXX=${CXX:-clang++-14} cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLORASERVE_FUZZ=ON -DLORASERVE_CUDA=OFF \
  -DLORASERVE_TESTS=OFF -DLORASERVE_BENCH=OFF -DLORASERVE_FUZZ_SECONDS="$SECONDS_EACH"
cmake --build "$BUILD_DIR" -j "$JOBS" --target loraserve_fuzz
select=()
if [ $# -gt 0 ]; then
  select=(-R "^fuzz_($(IFS='|'; echo "$*"))\$")
fi
status=0
ctest --test-dir "$BUILD_DIR" -L fuzz -j "$JOBS" --output-on-failure "${select[@]}" || status=$?
echo "== fuzz summary (SECONDS=$SECONDS_EACH, JOBS=$JOBS)"
# run.sh prints one line per target; ctest keeps every test's output in LastTest.log.
grep -h -E '^[a-z_]+ +([0-9]+s of [0-9]+s|regression input crashes)' \
  "$BUILD_DIR/Testing/Temporary/LastTest.log" | sort -u
exit "$status"
