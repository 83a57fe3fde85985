#!/usr/bin/env bash
# Runs openai_client_test.py against the real server binary, in a venv with
# the pinned packages of requirements-openai.txt (made on the first run, and
# again when requirements-openai.txt changes; needs PyPI then).
# Usage: openai_client_test.sh VENV_DIR LORASERVE_BINARY SHARED_DIR
set -euo pipefail
if [ "$#" -ne 3 ]; then
  echo "usage: $0 VENV_DIR LORASERVE_BINARY SHARED_DIR" >&2
  exit 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
venv="$1"
"$here/pinned_venv.sh" "$venv" "$here/requirements-openai.txt"
exec "$venv/bin/python" "$here/openai_client_test.py" --binary "$2" --shared "$3"
