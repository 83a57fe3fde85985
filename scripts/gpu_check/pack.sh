#!/usr/bin/env bash
# Runs HERE (the build machine, no GPU needed): builds the CUDA tests and the
# decode benchmark with LORASERVE_CUDA=ON and packs what the GPU machine needs
# into .gpu_pack/ at the repository root:
#   pack.tar.gz  bin/ and lib/, compressed (OpenBLAS alone is 36 MB plain;
#                gzip, which every image can unpack):
#   bin/     backend_parity_test, cuda_backend_test, cuda_model_test, cuda_factory_test,
#            cuda_decode_bench (stripped)
#   lib/     the shared libraries they load that the GPU image lacks (Abseil,
#            OpenBLAS, PCRE2, gtest, ...; found with ldd). Not glibc, libstdc++
#            or libgcc (the GPU image has newer ones) and not the CUDA driver or
#            cuBLAS (the GPU image has CUDA 13.0; cudart is linked statically).
#   source_dir   the repository path compiled into the tests
#   revision     the commit packed (git describe --dirty), which run.sh prints
#   shared/  the small model and adapters of ../shared the tests read.
# .gpu_pack/ is git-ignored through .git/info/exclude and travels with the
# device tool's `carry`. It must stay under 64 MiB together with the tree.
#
#   scripts/gpu_check/pack.sh          # then, on the GPU machine (device tool):
#   run(command="scripts/gpu_check/run.sh", carry=[".gpu_pack"], timeout_s=540)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-$ROOT/build-gpu}
PACK=$ROOT/.gpu_pack
JOBS=${JOBS:-2}
LIMIT_MIB=24  # leaves room for the working tree in the device tool's 64 MiB
TARGETS=(backend_parity_test cuda_backend_test cuda_model_test cuda_factory_test cuda_decode_bench)

cmake -S "$ROOT" -B "$BUILD" -G Ninja -DLORASERVE_CUDA=ON -DLORASERVE_TESTS=ON \
  -DLORASERVE_BENCH=ON >/dev/null
cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}"

STAGE=$BUILD/gpu_pack_stage
rm -rf "$PACK" "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/lib" "$PACK/shared/models" "$PACK/shared/adapters"
for target in "${TARGETS[@]}"; do
  binary=$(find "$BUILD" -type f -name "$target" -perm -u+x | head -n 1)
  [[ -n "$binary" ]] || { echo "pack.sh: $target was not built" >&2; exit 1; }
  strip --strip-unneeded -o "$STAGE/bin/$target" "$binary"
done

# Libraries: everything ldd resolves except the C runtime, the compiler's
# runtime and CUDA's own (those come from the GPU image).
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+|libgcc_s|libcuda\.|libcublas|libcudart|libnvidia)'
for binary in "$STAGE"/bin/*; do
  ldd "$binary" | awk '/=> \//{print $1, $3}'
done | sort -u | while read -r name path; do
  if [[ "$name" =~ $skip ]]; then continue; fi
  cp -L "$path" "$STAGE/lib/$name"
done
strip --strip-unneeded "$STAGE"/lib/* 2>/dev/null || true

tar -czf "$PACK/pack.tar.gz" -C "$STAGE" bin lib
git -C "$ROOT" describe --always --dirty >"$PACK/revision"

# Test binaries hold this path (LORASERVE_SOURCE_DIR); run.sh recreates it.
echo "$ROOT" >"$PACK/source_dir"

SHARED=$(cd "$ROOT/../shared" && pwd)
cp -r "$SHARED/models/aidreams-260k" "$PACK/shared/models/"
cp -r "$SHARED/adapters/aidreams-260k" "$PACK/shared/adapters/"

# Keep the pack out of git; the device tool still carries it when named.
exclude="$(git -C "$ROOT" rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu_pack/' "$exclude" 2>/dev/null || echo '/.gpu_pack/' >>"$exclude"

size_mib=$(du -sm "$PACK" | cut -f1)
echo "packed $PACK: ${size_mib} MiB ($(ls "$STAGE/lib" | wc -l) libraries)"
du -sh "$PACK"/* | sed 's/^/  /'
if ((size_mib > LIMIT_MIB)); then
  echo "pack.sh: the pack is ${size_mib} MiB, over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
