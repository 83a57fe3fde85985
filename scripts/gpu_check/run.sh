#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with .gpu_pack/ carried
# (see pack.sh): the CUDA tests against the CPU backend, then the decode
# micro-benchmark, whose table is printed last. Logs go to $OUT when set.
#
#   scripts/gpu_check/run.sh              # everything
#   BENCH_ARGS="--batches 1,16" scripts/gpu_check/run.sh
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACK=$ROOT/.gpu_pack
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
[[ -f "$PACK/pack.tar.xz" ]] || { echo "run.sh: no $PACK/pack.tar.xz: run scripts/gpu_check/pack.sh here first and carry .gpu_pack" >&2; exit 2; }
# Binaries and libraries, unpacked outside the checkout.
BIN=/tmp/loraserve_gpu_check
rm -rf "$BIN" && mkdir -p "$BIN" && tar -xJf "$PACK/pack.tar.xz" -C "$BIN" || exit 2

# cuBLAS from the GPU image: the toolkit's folders, else the pip wheel's.
cuda_libs=""
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(ls -d /usr/local/lib/python3*/dist-packages/nvidia/*/lib /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null); do
  if ls "$dir"/libcublas.so.13* >/dev/null 2>&1; then cuda_libs="$cuda_libs:$dir"; fi
done
export LD_LIBRARY_PATH="$BIN/lib${cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true

# The tests read LORASERVE_SOURCE_DIR and ../shared as compiled in on the
# build machine (pack.sh wrote that path): point them at this checkout and
# the pack.
built_root=$(cat "$PACK/source_dir")
if [[ "$(cd "$built_root" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]]; then
  if [[ -e "$built_root" ]]; then
    echo "run.sh: $built_root exists and is not this checkout: goldens may not load" >&2
  else
    mkdir -p "$(dirname "$built_root")" && ln -s "$ROOT" "$built_root"
  fi
fi
shared_dir="$(dirname "$built_root")/shared"
[[ -e "$shared_dir" ]] || ln -s "$PACK/shared" "$shared_dir"

status=0
for test in cuda_factory_test cuda_backend_test; do
  echo "=== $test"
  "$BIN/bin/$test" --gtest_color=no 2>&1 | tee "$LOGS/$test.log" | grep -E '^\[  (FAILED|SKIPPED|PASSED) |Failure|error:|Skipped' -A3
  rc=${PIPESTATUS[0]}
  echo "=== $test exit $rc"
  ((rc == 0)) || status=1
  # On the GPU machine a skip means the GPU was not usable: that fails the check.
  if grep -q '^\[  SKIPPED \]' "$LOGS/$test.log"; then
    echo "=== $test: cases were skipped: the GPU check did not run them" >&2
    status=1
  fi
done

echo "=== cuda_decode_bench ${BENCH_ARGS:-}"
# Progress (stderr) as it comes; the table (stdout) last.
# shellcheck disable=SC2086
"$BIN/bin/cuda_decode_bench" ${BENCH_ARGS:-} >"$LOGS/bench.txt" 2> >(tee "$LOGS/bench.err" >&2)
rc=$?
((rc == 0)) || status=1
echo "=== cuda_decode_bench exit $rc"
cat "$LOGS/bench.txt"
exit $status
