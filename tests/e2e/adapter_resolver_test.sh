#!/usr/bin/env bash
# End-to-end test of --adapter-resolver-dir: adapters that are not loaded come
# from a folder on their first request (as vLLM's filesystem LoRA resolver),
# per tenant, with the validation loads get, and without a restart when the
# folder is filled while the server runs (the way a shared volume or an
# object-store sync feeds every replica). Over the in-process HTTP API and
# through `loraserve gateway`, whose lookups go to the server's gRPC API.
#
# The resolver folder holds symlinks to the shared adapters under new names,
# so a resolved adapter's greedy text must equal the preloaded original's.
# Usage: adapter_resolver_test.sh LORASERVE_BINARY SHARED_DIR
set -euo pipefail

# shellcheck source=tests/e2e/http_test_lib.sh
source "$(dirname "$0")/http_test_lib.sh"

cat >"$tmp/keys" <<'EOF'
admin-key-000001 ops admin
acme-key-0000001 acme tenant
beta-key-0000001 beta tenant
EOF
ADMIN=admin-key-000001
ACME=acme-key-0000001
BETA=beta-key-0000001

ROOT="$tmp/resolve"
mkdir -p "$ROOT/acme" "$ROOT/broken"
ln -s "$ADAPTER_DIR/ocean" "$ROOT/sea"       # default tenant: ROOT/NAME
ln -s "$ADAPTER_DIR/robot" "$ROOT/acme/tin"  # tenant acme: ROOT/acme/NAME
echo '{not json' >"$ROOT/broken/adapter_config.json"

# greedy URL KEY MODEL: a greedy completion; sets STATUS, BODY and TEXT.
greedy() {
  req "$1" POST /v1/completions "$2" -H 'Content-Type: application/json' \
    --data-binary "$(jq -cn --arg m "$3" \
      '{model: $m, prompt: "Once upon a time", max_tokens: 16, temperature: 0}')"
  TEXT=""
  if [ "$STATUS" = 200 ]; then TEXT="$(jq -r '.choices[0].text' <<<"$BODY")"; fi
}

# same_text URL KEY RESOLVED ORIGINAL: RESOLVED serves, with ORIGINAL's text.
same_text() {
  greedy "$1" "$2" "$4"
  expect_status 200 "completion with the preloaded $4"
  local original="$TEXT"
  greedy "$1" "$2" "$3"
  expect_status 200 "first completion with $3, resolved from $ROOT"
  [ "$TEXT" = "$original" ] || fail "$3 (resolved) wrote '$TEXT', $4 (the same files) '$original'"
}

start_server resolver --adapter-resolver-dir "$ROOT"

echo "== nothing is resolved before a request names it"
req "$HTTP" GET /v1/models "$ADMIN"
expect_status 200 "GET /v1/models"
expect_jq '[.data[].id] | index("sea") == null and index("acme/tin") == null' "unresolved adapters unlisted"

echo "== the default tenant's ROOT/NAME, on its first request"
same_text "$HTTP" "$ACME" sea ocean
req "$HTTP" GET /v1/models "$ACME"
expect_jq '.data[] | select(.id == "sea") | .parent == "aidreams-260k"' "sea listed with its parent"

echo "== a tenant's ROOT/TENANT/NAME: its own, invisible to other tenants"
same_text "$HTTP" "$ACME" tin robot
greedy "$HTTP" "$BETA" tin
expect_error 404 "beta asking for acme's tin"
req "$HTTP" GET /v1/models "$BETA"
expect_jq '[.data[].id] | index("tin") == null and index("acme/tin") == null' "acme's tin unlisted for beta"

echo "== no such folder: 404; a folder that is not an adapter: 400 naming it"
greedy "$HTTP" "$ACME" nowhere
expect_error 404 "an adapter in no folder"
greedy "$HTTP" "$ACME" broken
expect_error 400 "a broken adapter folder"
expect_jq '.error.message | contains("resolve/broken") and contains("json")' "the error names the folder"

echo "== filled while serving (a sync that finishes): served at the next request"
cp "$ADAPTER_DIR/ocean/adapter_model.safetensors" "$ADAPTER_DIR/ocean/adapter_config.json" "$ROOT/broken/"
chmod u+w "$ROOT/broken"/*
same_text "$HTTP" "$ACME" broken ocean
ln -s "$ADAPTER_DIR/qv-r4" "$ROOT/late"
same_text "$HTTP" "$ADMIN" late qv-r4

echo "== through loraserve gateway: lookups and requests cross the gRPC API"
"$BIN" gateway --http-port 0 --upstream "127.0.0.1:$GRPC_PORT" --api-keys "$tmp/keys" \
  >"$tmp/gateway.log" 2>&1 &
GATEWAY_PID=$!
pids+=("$GATEWAY_PID")
line="$(wait_for_line "$tmp/gateway.log" "$GATEWAY_PID" 'HTTP listening on 127\.0\.0\.1:[0-9]+')"
GATEWAY="http://127.0.0.1:${line##*:}"
ln -s "$ADAPTER_DIR/attn-r8" "$ROOT/acme/via-gateway"
same_text "$GATEWAY" "$ACME" via-gateway attn-r8
req "$HTTP" GET /v1/adapters/via-gateway "$ACME"
expect_status 200 "the in-process API sees what the gateway resolved"

req "$HTTP" GET /health ""
expect_status 200 "still serving"
kill -TERM "$GATEWAY_PID" "$SERVER_PID"
wait "$SERVER_PID" || fail "the server did not stop cleanly on SIGTERM"
echo "PASS adapter_resolver_test"
