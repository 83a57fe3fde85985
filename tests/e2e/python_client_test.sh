#!/usr/bin/env bash
# Runs python_client_test.py against the real server binary, in a venv with
# the pinned packages of requirements.txt (made on the first run, and again
# when requirements.txt changes; needs PyPI then).
# Usage: python_client_test.sh VENV_DIR LORASERVE_BINARY SHARED_DIR
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$1"
"$here/pinned_venv.sh" "$venv" "$here/requirements.txt"
exec "$venv/bin/python" "$here/python_client_test.py" --binary "$2" --shared "$3" \
  --proto-dir "$here/../../proto"
