#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite (GPU tests skip without a GPU).
#
# --sanitize=address: an ASan+UBSan build in build-asan/, running every test but the labels
#   deploy (container image builds; they do not exercise the server's memory) and gpu.
# --sanitize=thread: a TSan build in build-tsan/, running the tests of the multithreaded
#   parts (see TSAN_TESTS below), the e2e ones included: they run this build's server.
# BUILD_DIR overrides the build directory either way.
set -euo pipefail
cd "$(dirname "$0")/.."
sanitize=""
for arg in "$@"; do
  case "$arg" in
    --sanitize=address | --sanitize=thread) sanitize="${arg#--sanitize=}" ;;
    *) echo "usage: scripts/test.sh [--sanitize=address|thread]" >&2; exit 2 ;;
  esac
done
scripts/install_deps.sh
if [ -z "$sanitize" ]; then
  scripts/build.sh
  cd "${BUILD_DIR:-build}"
  ctest --output-on-failure -j "$(nproc)" --timeout 900
  exit 0
fi

# The tests of the multithreaded parts, by ctest name: the engine loop and the engine (its
# merged-weight cache), the registry and its prefetch thread, the device cache, the CPU
# backend's thread pool, the gateway's shared state (rate limiter, label limiter, metrics),
# the gRPC e2e tests and every e2e script (names without a dot: gRPC and HTTP clients
# against this build's server, which is where the API threads meet).
TSAN_TESTS='^([A-Za-z]+/)?(EngineLoopTest|EngineSchedulingTest|EngineTest|EngineGoldenTest|EngineAdapterTest|AdapterRegistryTest|DeviceAdapterCacheTest|CpuBackendTest|CpuBackendBatchInvarianceTest|RateLimiterTest|LabelLimiterTest|GatewayMetricsTest|Grpc[A-Za-z]*Test)\.|^[a-z_]+_test$'

root="$PWD"
build_dir=${BUILD_DIR:-build-$([ "$sanitize" = address ] && echo asan || echo tsan)}
# No benchmarks (not tests) and no CUDA (no GPU here; see CMakeLists.txt) in a sanitizer build.
BUILD_DIR="$build_dir" scripts/build.sh -DLORASERVE_SANITIZE="$sanitize" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLORASERVE_BENCH=OFF -DLORASERVE_CUDA=OFF
cd "$build_dir"

# Reports go to files, not stderr: the e2e tests start servers whose stderr and exit status
# they do not keep, so a report from one would go unseen. Any report fails the run.
logs="$PWD/sanitizer-logs"
rm -rf "$logs"
mkdir -p "$logs"
case "$sanitize" in
  address)
    export ASAN_OPTIONS="log_path=$logs/asan:halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:detect_odr_violation=2"
    export UBSAN_OPTIONS="log_path=$logs/ubsan:halt_on_error=1:print_stacktrace=1"
    select=(-LE 'deploy|gpu')
    ;;
  thread)
    # ignore_noninstrumented_modules: no reports from what Debian's uninstrumented libraries
    # (gRPC, Abseil, protobuf, libstdc++) do through libc (memcpy, epoll_*): TSan cannot see
    # their locks. Our code's own accesses are all still checked. The suppressions are gRPC's;
    # see the file for why and for what they leave unchecked.
    export TSAN_OPTIONS="log_path=$logs/tsan:halt_on_error=1:second_deadlock_stack=1:print_stacktrace=1:ignore_noninstrumented_modules=1:suppressions=$root/scripts/sanitizers/tsan.supp:print_suppressions=0"
    select=(-R "$TSAN_TESTS" -LE 'deploy|gpu')
    ;;
esac
status=0
# Sanitized tests run 2-15 times slower: a longer timeout than the normal suite's.
ctest --output-on-failure -j "$(nproc)" --timeout 1800 "${select[@]}" || status=$?
if [ -n "$(ls -A "$logs")" ]; then
  for report in "$logs"/*; do
    echo "=== sanitizer report $report" >&2
    cat "$report" >&2
  done
  echo "test.sh: the $sanitize sanitizer reported the errors above" >&2
  status=1
fi
exit "$status"
