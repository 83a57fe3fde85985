#!/usr/bin/env bash
# runtime_packages.sh BINARY: the Debian packages that own the shared
# libraries BINARY links (ldd), one per line: what the runtime stage installs.
# dpkg knows a library by the path its package ships, which merged /usr can
# hide behind a symlink: ldd's path, its real path and the /usr-less form are
# each tried. A library no package owns is an error.
set -euo pipefail
ldd "$1" | awk '/=> \// { print $3 }' | while read -r lib; do
  real="$(realpath "$lib")"
  for path in "$lib" "$real" "${real#/usr}"; do
    if owner="$(dpkg -S "$path" 2>/dev/null)"; then
      echo "${owner%%:*}"
      continue 2
    fi
  done
  echo "runtime_packages: no package owns $lib ($real)" >&2
  exit 1
done | sort -u
