#!/usr/bin/env bash
# build_image.sh cpu|cuda [TAG]: builds loraserve's container image from
# deploy/docker/Dockerfile with buildah (no Docker engine needed; TAG defaults
# to loraserve:cpu or loraserve:cuda).
#   cpu:  on a Debian 12 base made here with debootstrap from Debian's own
#         packages (no registry needed), kept as $CACHE_DIR/debian-bookworm.tar
#         (default build/deploy-cache) and imported as localhost/loraserve-debian:bookworm.
#   cuda: on NVIDIA's nvidia/cuda:13.0.1-devel-ubuntu24.04 (build stage) and
#         -runtime-ubuntu24.04 (runtime stage), pulled unless present; exits 77
#         (skipped), naming them, where they cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${1:-}"
case "$flavor" in cpu | cuda) ;; *)
  echo "usage: $0 cpu|cuda [TAG]" >&2
  exit 2
  ;;
esac
tag="${2:-loraserve:$flavor}"
cache="${CACHE_DIR:-build/deploy-cache}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
BUILDAH=($SUDO buildah)

have_image() { "${BUILDAH[@]}" inspect --type image "$1" >/dev/null 2>&1; }

# The Debian 12 base, from debootstrap: minbase plus the updates and security
# suites in its sources, no package lists or archives left in it.
debian_base() {
  local base=localhost/loraserve-debian:bookworm
  local tarball="$cache/debian-bookworm.tar"
  if [ ! -f "$tarball" ]; then
    mkdir -p "$cache"
    local rootfs="$cache/rootfs"
    $SUDO rm -rf "$rootfs"
    echo "build_image: debootstrap bookworm into $rootfs" >&2
    $SUDO debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 ||
      { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
    local mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
      "$mirror" "$mirror" | $SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null
    $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar -C "$rootfs" -cf "$tarball.tmp" .
    $SUDO mv "$tarball.tmp" "$tarball"
    $SUDO rm -rf "$rootfs"
    "${BUILDAH[@]}" rmi "$base" >/dev/null 2>&1 || true
  fi
  if ! have_image "$base"; then
    local context="$cache/base-context"
    mkdir -p "$context"
    ln -f "$tarball" "$context/debian-bookworm.tar"
    printf 'FROM scratch\nADD debian-bookworm.tar /\nCMD ["/bin/bash"]\n' >"$context/Dockerfile"
    "${BUILDAH[@]}" bud --isolation chroot --quiet -t "$base" "$context" >/dev/null
  fi
  echo "$base"
}

if [ "$flavor" = cpu ]; then
  base="$(debian_base)"
  args=(--build-arg "BUILD_BASE=$base" --build-arg "RUNTIME_BASE=$base")
else
  devel=docker.io/nvidia/cuda:13.0.1-devel-ubuntu24.04
  runtime=docker.io/nvidia/cuda:13.0.1-runtime-ubuntu24.04
  for image in "$devel" "$runtime"; do
    have_image "$image" && continue
    if ! error="$(timeout 120 "${BUILDAH[@]}" pull --quiet "$image" 2>&1 >/dev/null)"; then
      echo "SKIP: the CUDA image's base $image is not here and cannot be pulled: ${error##*$'\n'}" >&2
      exit 77
    fi
  done
  args=(--build-arg "BUILD_BASE=$devel" --build-arg "RUNTIME_BASE=$runtime" --build-arg CUDA=ON)
fi
echo "build_image: building $tag" >&2
"${BUILDAH[@]}" bud --isolation chroot --format docker --layers -f deploy/docker/Dockerfile \
  "${args[@]}" -t "$tag" .
