#!/usr/bin/env bash
# Installs what is missing, builds, and serves the default model
# (../shared/models/aidreams-260k) with the shared adapters: gRPC on port
# 50051 (GRPC_PORT overrides), the OpenAI-compatible HTTP API on port 8080
# (HTTP_PORT overrides). Extra arguments go to `loraserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
scripts/build.sh
MODEL=${MODEL:-../shared/models/aidreams-260k}
ADAPTERS=${ADAPTERS:-../shared/adapters/aidreams-260k}
exec "${BUILD_DIR:-build}/server/loraserve" serve --model "$MODEL" --adapter-dir "$ADAPTERS" \
  --grpc-port "${GRPC_PORT:-50051}" --http-port "${HTTP_PORT:-8080}" "$@"
