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
[[ -f "$PACK/pack.tar.gz" ]] || { echo "run.sh: no $PACK/pack.tar.gz: run scripts/gpu_check/pack.sh here first and carry .gpu_pack" >&2; exit 2; }
echo "pack of $(cat "$PACK/revision" 2>/dev/null || echo '(unknown revision)')"
# Binaries and libraries, unpacked outside the checkout.
BIN=/tmp/loraserve_gpu_check
rm -rf "$BIN" && mkdir -p "$BIN" && tar -xzf "$PACK/pack.tar.gz" -C "$BIN" || exit 2

# cuBLAS from the GPU image: the toolkit's folders, else the pip wheel's.
cuda_libs=""
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(ls -d /usr/local/lib/python3*/dist-packages/nvidia/*/lib /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null); do
  if ls "$dir"/libcublas.so.13* >/dev/null 2>&1; then cuda_libs="$cuda_libs:$dir"; fi
done
export LD_LIBRARY_PATH="$BIN/lib${cuda_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
# What the packed binaries need of this image (glibc, libstdc++, cuBLAS):
# anything missing shows up here rather than as a bare load failure below.
echo "image: $(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-?}"), $(ldd --version 2>&1 | head -n 1)"
for binary in "$BIN"/bin/*; do
  ldd "$binary" 2>&1 | grep -E 'not found' | sed "s|^|$(basename "$binary"): |"
done

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
# "$built_root/../shared" resolves through the physical parent when
# $built_root is a link: put shared/ beside both.
for parent in "$(dirname "$built_root")" "$(dirname "$(pwd -P)")"; do
  [[ -e "$parent/shared" ]] || ln -s "$PACK/shared" "$parent/shared"
done

# Each stage has its own time limit (seconds), so that a hang in the tests
# still leaves the benchmark its time within the device tool's 540 s.
status=0
run_tests() {  # name, limit, binary, gtest filter
  local name=$1 limit=$2 binary=$3 filter=$4 start=$SECONDS
  echo "=== $name"
  timeout -k 5 "$limit" "$BIN/bin/$binary" --gtest_color=no --gtest_filter="$filter" 2>&1 |
    tee "$LOGS/$name.log" | grep -E '^\[  (FAILED|SKIPPED|PASSED) |Failure|error:|Skipped' -A3
  local rc=${PIPESTATUS[0]}
  local note=""
  ((rc == 124)) && note=", timed out after ${limit} s"
  ((rc == 137)) && note=", killed (past the time limit, or out of memory)"
  echo "=== $name exit $rc ($((SECONDS - start)) s$note)"
  ((rc == 0)) || status=1
  # On the GPU machine a skip means the GPU was not usable: that fails the check.
  if grep -q '^\[  SKIPPED \]' "$LOGS/$name.log"; then
    echo "=== $name: cases were skipped: the GPU check did not run them" >&2
    status=1
  fi
}
# One process per suite: a crash in one leaves the other's results.
run_tests cuda_factory_test 20 cuda_factory_test '*'
run_tests backend_parity 60 backend_parity_test '*'
run_tests cuda_backend 60 cuda_backend_test '*'
run_tests cuda_model 150 cuda_model_test '*'

echo "=== cuda_decode_bench ${BENCH_ARGS:-}"
# Progress (stderr) as it comes; the table (stdout) last.
start=$SECONDS
# shellcheck disable=SC2086
timeout -k 5 "${BENCH_LIMIT:-250}" "$BIN/bin/cuda_decode_bench" ${BENCH_ARGS:-} \
  >"$LOGS/bench.txt" 2> >(tee "$LOGS/bench.err" >&2)
rc=$?
((rc == 0)) || status=1
echo "=== cuda_decode_bench exit $rc ($((SECONDS - start)) s)"
cat "$LOGS/bench.txt"
exit $status
