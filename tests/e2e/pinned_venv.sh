#!/usr/bin/env bash
# pinned_venv.sh VENV_DIR REQUIREMENTS: makes VENV_DIR a venv holding exactly
# the pinned packages of REQUIREMENTS, on the first run and again whenever
# REQUIREMENTS changes (needs PyPI then). The Python e2e tests run in it.
set -euo pipefail
venv="$1"
requirements="$2"
if ! cmp -s "$requirements" "$venv/requirements.txt"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
