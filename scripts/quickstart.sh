#!/usr/bin/env bash
# Installs what is missing, builds, and runs loraserve on the default model
# (../shared/models/aidreams-260k); extra arguments go to `loraserve generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
MODEL=${MODEL:-../shared/models/aidreams-260k}
exec "${BUILD_DIR:-build}/server/loraserve" generate --model "$MODEL" --prompt "" \
  --temperature 0 --max-tokens 64 "$@"
