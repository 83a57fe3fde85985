#!/usr/bin/env bash
# Configures and builds the libFuzzer targets with clang into build-fuzz/ (BUILD_DIR
# overrides), ASan and UBSan on, then runs each for SECONDS (default 60) with its corpus
# and regression inputs (tests/fuzz/run.sh; extra args: the targets to run).
# Usage: scripts/fuzz.sh [SECONDS [TARGET...]]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift $(( $# > 0 ? 1 : 0 ))
BUILD_DIR=${BUILD_DIR:-build-fuzz}
JOBS=${JOBS:-$(nproc)}
CC=${CC:-clang-14} CXX=${CXX:-clang++-14} cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLORASERVE_FUZZ=ON -DLORASERVE_CUDA=OFF \
  -DLORASERVE_TESTS=OFF -DLORASERVE_BENCH=OFF
cmake --build "$BUILD_DIR" -j "$JOBS" --target loraserve_fuzz
tests/fuzz/run.sh "$BUILD_DIR" "$SECONDS_EACH" "$@"
