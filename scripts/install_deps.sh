#!/usr/bin/env bash
# Installs, from Debian 12 packages, everything loraserve needs to build, test
# and run. `--build-only`: only what building the server needs (the container
# images' build stage).
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
PACKAGES=(
  build-essential cmake ninja-build pkg-config
  libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libopenblas-dev libeigen3-dev nlohmann-json3-dev libpcre2-dev libcpp-httplib-dev prometheus-cpp-dev
)
if [ "${1:-}" != "--build-only" ]; then
  PACKAGES+=(
    git python3 python3-venv libgtest-dev libgmock-dev libbenchmark-dev prometheus curl jq
    # The container images' build and run test (tests/deploy/image_test.sh).
    buildah debootstrap
    # The libFuzzer targets (scripts/fuzz.sh): clang and its sanitizer/fuzzer runtimes.
    clang clang-14 libclang-rt-14-dev
  )
fi
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install_deps: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
