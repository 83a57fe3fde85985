#!/usr/bin/env bash
# End-to-end test of loraserve's HTTP API with tenants, against the real
# binary on free loopback ports: API keys (401), per-tenant adapter uploads,
# visibility and deletion (alpha vs beta vs operators' adapters), replace and
# versions, quota (429), upload size limit (413), per-tenant rate limit (429 +
# Retry-After, admins exempt), vLLM's load/unload_lora_adapter, malformed
# bodies and adapter files (4xx with an OpenAI error JSON, server still
# serving), /health and /ready, and `loraserve gateway` in front of the gRPC
# port (same answers; 503 once the upstream is gone).
#
# Needs curl, jq and python3 (scripts/install_deps.sh). Adapter files are
# copied from SHARED at run time. Exits non-zero at the first failure, naming
# the request, the expected and the received status and the body.
# Usage: http_tenants_test.sh LORASERVE_BINARY SHARED_DIR
# shellcheck disable=SC2016  # jq filters in single quotes use jq's own $variables
set -euo pipefail

# shellcheck source=tests/e2e/http_test_lib.sh
source "$(dirname "$0")/http_test_lib.sh"

cat >"$tmp/keys" <<'EOF'
# KEY TENANT ROLE
admin-key-000001 ops admin
alpha-key-000001 alpha tenant
beta-key-0000001 beta tenant
EOF
ADMIN=admin-key-000001
ALPHA=alpha-key-000001
BETA=beta-key-0000001

# Adapter files for uploads, copied from the shared adapters at test time.
mkdir -p "$tmp/ocean"
cp "$ADAPTER_DIR/ocean/adapter_config.json" "$ADAPTER_DIR/ocean/adapter_model.safetensors" \
  "$tmp/ocean/"
chmod u+w "$tmp/ocean"/*
CONFIG="$tmp/ocean/adapter_config.json"
TENSORS="$tmp/ocean/adapter_model.safetensors"

completion_body() {  # MODEL [MAX_TOKENS]
  jq -cn --arg model "$1" --argjson max "${2:-12}" \
    '{model: $model, prompt: "Once upon a time", max_tokens: $max, temperature: 0}'
}

# complete URL KEY MODEL: a greedy completion; sets STATUS/BODY and TEXT.
complete() {
  req "$1" POST /v1/completions "$2" -H 'Content-Type: application/json' \
    --data-binary "$(completion_body "$3")"
  TEXT=""
  if [ "$STATUS" = 200 ]; then TEXT="$(jq -r '.choices[0].text' <<<"$BODY")"; fi
}

# upload URL KEY NAME [EXTRA CURL ARGS...] with the ocean adapter's files.
upload() {
  local url="$1" key="$2" name="$3"
  shift 3
  req "$url" POST /v1/adapters "$key" -F "name=$name" \
    -F "adapter_config.json=@$CONFIG;type=application/json" "$@"
}
upload_files() {  # URL KEY NAME SAFETENSORS_FILE [EXTRA...]
  local url="$1" key="$2" name="$3" tensors="$4"
  shift 4
  upload "$url" "$key" "$name" -F "adapter_model.safetensors=@$tensors;type=application/octet-stream" "$@"
}

expect_serving() {  # URL WHAT
  req "$1" GET /health ""
  expect_status 200 "still serving after $2"
  complete "$1" "$ALPHA" "$BASE_MODEL"
  expect_status 200 "a completion after $2"
}

echo "== start the server (quota 1 adapter per tenant, uploads up to 400000 bytes)"
start_server main --tenant-max-adapters 1 --max-upload-bytes 400000
MAIN="$HTTP"
MAIN_GRPC="$GRPC_PORT"
MAIN_PID="$SERVER_PID"

echo "== health and readiness"
req "$MAIN" GET /health ""
expect_status 200 "/health"
req "$MAIN" GET /ready ""
expect_status 200 "/ready"
expect_jq '.model == $m' "/ready names the model" --arg m "$BASE_MODEL"

echo "== authentication"
req "$MAIN" GET /v1/models ""
expect_error 401 "no API key"
req "$MAIN" GET /v1/models "not-a-valid-key"
expect_error 401 "a wrong API key"
complete "$MAIN" "wrong-key-123456" "$BASE_MODEL"
expect_error 401 "a completion with a wrong API key"
req "$MAIN" GET /v1/models "" -H "Authorization: Basic $ALPHA"
expect_error 401 "a non-Bearer Authorization header"
req "$MAIN" GET /v1/models "$ALPHA"
expect_status 200 "models with alpha's key"
expect_jq '[.data[].id] | index("aidreams-260k") != null and index("ocean") != null' \
  "the base model and operators' adapters are listed"

echo "== reference completions"
complete "$MAIN" "$ALPHA" "$BASE_MODEL"
expect_status 200 "base completion"
BASE_TEXT="$TEXT"
complete "$MAIN" "$ALPHA" ocean
expect_status 200 "completion with operator adapter ocean"
OCEAN_TEXT="$TEXT"
[ -n "$OCEAN_TEXT" ] || fail "ocean produced no text: $BODY"
[ "$OCEAN_TEXT" != "$BASE_TEXT" ] ||
  fail "ocean and the base model answer the same ('$BASE_TEXT'): the adapter seems not applied"
req "$MAIN" GET /v1/adapters/ocean "$ALPHA"
expect_status 200 "GET operator adapter ocean"
OCEAN_HASH="$(jq -r .content_hash <<<"$BODY")"

echo "== alpha uploads 'mine'"
upload_files "$MAIN" "$ALPHA" mine "$TENSORS"
expect_status 201 "alpha uploads mine"
expect_jq '.id == "alpha/mine" and .canonical_id == "alpha/mine" and .owner == "alpha"
  and .version == 1' "upload answer"
expect_jq '.content_hash == $h' "mine has ocean's content hash" --arg h "$OCEAN_HASH"

req "$MAIN" GET /v1/adapters "$ALPHA"
expect_status 200 "alpha lists adapters"
expect_jq '[.data[].id] | index("alpha/mine") != null and index("ocean") != null' \
  "alpha's list has alpha/mine and operators' ocean"
req "$MAIN" GET /v1/models "$ALPHA"
expect_status 200 "alpha lists models"
expect_jq '[.data[].id] | index("alpha/mine") != null' "alpha's models include alpha/mine"
for name in mine alpha/mine; do
  req "$MAIN" GET "/v1/adapters/$name" "$ALPHA"
  expect_status 200 "alpha GETs $name"
  expect_jq '.id == "alpha/mine" and .version == 1' "alpha GETs $name"
  complete "$MAIN" "$ALPHA" "$name"
  expect_status 200 "alpha completes with model $name"
  [ "$TEXT" = "$OCEAN_TEXT" ] ||
    fail "model $name (a copy of ocean) answered '$TEXT', ocean answered '$OCEAN_TEXT'"
  expect_jq '.model == $m' "the answer names the model as asked" --arg m "$name"
done

echo "== re-upload: 409 without replace, version 2 with replace=true"
upload_files "$MAIN" "$ALPHA" mine "$TENSORS"
expect_error 409 "re-upload without replace"
upload_files "$MAIN" "$ALPHA" mine "$TENSORS" -F replace=true
expect_status 201 "re-upload with replace=true"
expect_jq '.id == "alpha/mine" and .version == 2' "replacement is version 2"
req "$MAIN" GET /v1/adapters/mine "$ALPHA"
expect_status 200 "GET after replace"
expect_jq '.version == 2' "GET shows version 2"

echo "== names: another tenant's namespace, malformed ids"
upload_files "$MAIN" "$ALPHA" beta/planted "$TENSORS"
expect_error 403 "alpha uploads into beta's namespace"
upload_files "$MAIN" "$ALPHA" "a/b/c" "$TENSORS"
expect_error 400 "an adapter id with two slashes"
upload_files "$MAIN" "$ALPHA" "bad name!" "$TENSORS"
expect_error 400 "an adapter id with a space and '!'"

echo "== quota: --tenant-max-adapters 1"
upload_files "$MAIN" "$ALPHA" second "$TENSORS"
expect_error 429 "alpha's second adapter is over the quota"
req "$MAIN" GET /v1/adapters/second "$ALPHA"
expect_error 404 "the refused upload is not stored"

echo "== beta cannot see, use or delete alpha's adapter"
req "$MAIN" GET /v1/adapters "$BETA"
expect_status 200 "beta lists adapters"
expect_jq '[.data[].id] | index("alpha/mine") == null and index("ocean") != null' \
  "beta's list lacks alpha/mine but has ocean"
req "$MAIN" GET /v1/models "$BETA"
expect_status 200 "beta lists models"
expect_jq '[.data[].id] | index("alpha/mine") == null' "beta's models lack alpha/mine"
for name in alpha/mine mine; do
  req "$MAIN" GET "/v1/adapters/$name" "$BETA"
  expect_error 404 "beta GETs $name"
  complete "$MAIN" "$BETA" "$name"
  expect_error 404 "beta completes with $name"
  req "$MAIN" DELETE "/v1/adapters/$name" "$BETA"
  expect_error 404 "beta DELETEs $name"
done
req "$MAIN" DELETE /v1/adapters/ocean "$BETA"
expect_error 403 "beta DELETEs operator adapter ocean"
req "$MAIN" GET /v1/adapters/ocean "$BETA"
expect_status 200 "ocean survives beta's DELETE"

echo "== admin sees every tenant's adapters"
req "$MAIN" GET /v1/adapters "$ADMIN"
expect_status 200 "admin lists adapters"
expect_jq '[.data[].id] | index("alpha/mine") != null and index("ocean") != null' \
  "admin's list has alpha/mine and ocean"
req "$MAIN" GET /v1/adapters/alpha/mine "$ADMIN"
expect_status 200 "admin GETs alpha/mine"

echo "== alpha deletes 'mine'"
req "$MAIN" DELETE /v1/adapters/mine "$ALPHA"
expect_status 200 "alpha deletes mine"
expect_jq '.deleted == true' "delete answer"
req "$MAIN" GET /v1/adapters/mine "$ALPHA"
expect_error 404 "GET mine after delete"
complete "$MAIN" "$ALPHA" alpha/mine
expect_error 404 "completion with alpha/mine after delete"
req "$MAIN" DELETE /v1/adapters/mine "$ALPHA"
expect_error 404 "second delete of mine"

echo "== upload size: --max-upload-bytes 400000"
python3 - "$tmp/big.safetensors" <<'EOF'
import json, struct, sys
# A well-formed safetensors file of 600000 bytes (one f32 tensor).
count = 150000 - 64
header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                     {"dtype": "F32", "shape": [count], "data_offsets": [0, 4 * count]}}).encode()
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header + bytes(4 * count))
EOF
upload_files "$MAIN" "$ALPHA" big "$tmp/big.safetensors"
expect_error 413 "an upload of 600 kB with --max-upload-bytes 400000"
expect_serving "$MAIN" "a 413"
# Far above the limit the HTTP layer refuses the body before reading it.
head -c 3000000 /dev/zero >"$tmp/huge.safetensors"
upload_files "$MAIN" "$ALPHA" huge "$tmp/huge.safetensors"
expect_error 413 "an upload of 3 MB with --max-upload-bytes 400000"
expect_serving "$MAIN" "a 413 for a body far above the limit"

echo "== vLLM load/unload_lora_adapter"
load_body="$(jq -cn --arg p "$ADAPTER_DIR/robot" '{lora_name: "robot2", lora_path: $p}')"
req "$MAIN" POST /v1/load_lora_adapter "$ALPHA" -H 'Content-Type: application/json' \
  --data-binary "$load_body"
expect_error 403 "a tenant loads from a server path"
req "$MAIN" POST /v1/load_lora_adapter "$ADMIN" -H 'Content-Type: application/json' \
  --data-binary "$load_body"
expect_status 200 "admin loads robot2"
complete "$MAIN" "$ALPHA" robot
expect_status 200 "completion with robot"
ROBOT_TEXT="$TEXT"
complete "$MAIN" "$ALPHA" robot2
expect_status 200 "completion with robot2"
[ "$TEXT" = "$ROBOT_TEXT" ] ||
  fail "robot2 (loaded from robot's folder) answered '$TEXT', robot answered '$ROBOT_TEXT'"
req "$MAIN" POST /v1/load_lora_adapter "$ADMIN" -H 'Content-Type: application/json' \
  --data-binary "$load_body"
expect_error 409 "loading robot2 twice"
req "$MAIN" POST /v1/unload_lora_adapter "$ALPHA" -H 'Content-Type: application/json' \
  --data-binary '{"lora_name": "robot2"}'
expect_error 403 "a tenant unloads an operators' adapter"
req "$MAIN" POST /v1/unload_lora_adapter "$ADMIN" -H 'Content-Type: application/json' \
  --data-binary '{"lora_name": "robot2"}'
expect_status 200 "admin unloads robot2"
complete "$MAIN" "$ALPHA" robot2
expect_error 404 "completion with robot2 after unload"

echo "== malformed completion bodies: 400 with an error JSON, server keeps serving"
bad_completion() {  # BODY WHAT
  req "$MAIN" POST /v1/completions "$ALPHA" -H 'Content-Type: application/json' --data-binary "$1"
  expect_error 400 "$2"
  expect_serving "$MAIN" "$2"
}
bad_completion '{"model": "ocean", "prompt": "hi", "max_tokens": 5' "invalid JSON"
bad_completion '{"model": "ocean", "prompt": "hi", "max_tokens": "5"}' "max_tokens as a string"
bad_completion '{"model": "ocean", "prompt": 7}' "prompt as a number"
bad_completion '{"model": "ocean", "prompt": "hi", "temperature": "hot"}' "temperature as a string"
bad_completion '{"model": "ocean", "prompt": "hi", "frobnicate": true}' "an unknown field"
bad_completion '{"model": "ocean", "prompt": "hi", "max_tokens": -1}' "negative max_tokens"
bad_completion '{"model": "ocean", "prompt": "hi", "n": 1000}' "n = 1000"
bad_completion '["model", "ocean"]' "a JSON array body"
bad_completion '{"prompt": "hi"}' "no model"

echo "== malformed uploads: 400 with an error JSON, server keeps serving"
req "$MAIN" POST /v1/adapters "$ALPHA" -F name=nofiles
expect_error 400 "multipart without the files"
expect_serving "$MAIN" "multipart without the files"
req "$MAIN" POST /v1/adapters "$ALPHA" -F name=noconfig \
  -F "adapter_model.safetensors=@$TENSORS;type=application/octet-stream"
expect_error 400 "multipart without adapter_config.json"
req "$MAIN" POST /v1/adapters "$ALPHA" -H 'Content-Type: application/json' \
  --data-binary '{"name": "json-upload"}'
expect_error 400 "a JSON (non-multipart) upload body"
expect_serving "$MAIN" "a non-multipart upload"
python3 - "$TENSORS" "$tmp/long-header.safetensors" "$tmp/past-end.safetensors" <<'EOF'
import json, struct, sys
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
body = data[8 + n:]
# 1: the header length field claims more bytes than the file has.
open(sys.argv[2], "wb").write(struct.pack("<Q", len(data) * 4) + data[8:])
# 2: a well-formed header whose last tensor's data_offsets end past the file.
last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
begin, end = header[last]["data_offsets"]
header[last]["data_offsets"] = [begin, end + 4096]
text = json.dumps(header).encode()
text += b" " * ((8 - len(text) % 8) % 8)
open(sys.argv[3], "wb").write(struct.pack("<Q", len(text)) + text + body)
EOF
upload_files "$MAIN" "$ALPHA" liar1 "$tmp/long-header.safetensors"
expect_error 400 "a safetensors header length past the end of the file"
expect_serving "$MAIN" "a lying header length"
upload_files "$MAIN" "$ALPHA" liar2 "$tmp/past-end.safetensors"
expect_error 400 "safetensors data_offsets past the end of the file"
expect_serving "$MAIN" "data_offsets past the end"
req "$MAIN" GET /v1/adapters "$ALPHA"
expect_status 200 "list after the bad uploads"
expect_jq '[.data[].id | select(startswith("alpha/"))] | length == 0' \
  "no bad upload was stored"
upload_files "$MAIN" "$ALPHA" after-bad "$TENSORS"
expect_status 201 "a good upload after the bad ones (the quota was not charged)"

echo "== rate limit: --tenant-requests-per-second 2"
start_server limited --tenant-requests-per-second 2
LIMITED="$HTTP"
burst() {  # KEY PREFIX: 10 completions at once; their status lines in $tmp/PREFIX.*
  local key="$1" prefix="$2" i
  local burst_pids=()
  for i in $(seq 10); do
    curl -sS --max-time 60 -o "$tmp/$prefix.$i.body" -D "$tmp/$prefix.$i.headers" \
      -w '%{http_code}' -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
      --data-binary "$(completion_body "$BASE_MODEL" 2)" "$LIMITED/v1/completions" \
      >"$tmp/$prefix.$i.status" &
    burst_pids+=($!)
  done
  for pid in "${burst_pids[@]}"; do wait "$pid" || fail "a curl of the $prefix burst failed"; done
}
burst "$ALPHA" tenant-burst
ok=0
limited=0
for i in $(seq 10); do
  status="$(cat "$tmp/tenant-burst.$i.status")"
  case "$status" in
    200) ok=$((ok + 1)) ;;
    429)
      limited=$((limited + 1))
      grep -qiE '^Retry-After: [1-9][0-9]*' "$tmp/tenant-burst.$i.headers" ||
        fail "a 429 without a Retry-After header: $(cat "$tmp/tenant-burst.$i.headers")"
      STATUS=429 BODY="$(cat "$tmp/tenant-burst.$i.body")" LAST="POST /v1/completions (burst)"
      expect_error_json "rate-limited completion"
      ;;
    *) fail "burst completion $i: expected 200 or 429, got $status: $(cat "$tmp/tenant-burst.$i.body")" ;;
  esac
done
echo "tenant burst: $ok x 200, $limited x 429"
[ "$ok" -ge 1 ] || fail "the tenant burst got no 200 at all (bucket of 2 requests)"
[ "$limited" -ge 1 ] || fail "10 requests at once at 2 per second: none got 429"
burst "$ADMIN" admin-burst
for i in $(seq 10); do
  status="$(cat "$tmp/admin-burst.$i.status")"
  [ "$status" = 200 ] ||
    fail "admin burst completion $i: expected 200 (admins are not limited), got $status: $(cat "$tmp/admin-burst.$i.body")"
done
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || fail "the rate-limited server did not stop cleanly on SIGTERM"

echo "== gateway mode: loraserve gateway --upstream 127.0.0.1:$MAIN_GRPC"
"$BIN" gateway --http-port 0 --upstream "127.0.0.1:$MAIN_GRPC" --api-keys "$tmp/keys" \
  >"$tmp/gateway.log" 2>&1 &
GATEWAY_PID=$!
pids+=("$GATEWAY_PID")
line="$(wait_for_line "$tmp/gateway.log" "$GATEWAY_PID" 'HTTP listening on 127\.0\.0\.1:[0-9]+')"
GATEWAY="http://127.0.0.1:${line##*:}"
req "$GATEWAY" GET /ready ""
expect_status 200 "gateway /ready with the upstream up"
for model in "$BASE_MODEL" ocean; do
  complete "$MAIN" "$ALPHA" "$model"
  expect_status 200 "in-process completion with $model"
  direct="$TEXT"
  complete "$GATEWAY" "$ALPHA" "$model"
  expect_status 200 "gateway completion with $model"
  [ "$TEXT" = "$direct" ] ||
    fail "model $model: the gateway answered '$TEXT', the in-process API '$direct'"
done
req "$GATEWAY" GET /v1/models ""
expect_error 401 "gateway without a key"

kill -TERM "$MAIN_PID"
wait "$MAIN_PID" || fail "the main server did not stop cleanly on SIGTERM"
req "$GATEWAY" GET /health ""
expect_status 200 "gateway /health with the upstream gone (the gateway itself lives)"
req "$GATEWAY" GET /ready ""
expect_error 503 "gateway /ready with the upstream gone"
for model in "$BASE_MODEL" ocean; do
  complete "$GATEWAY" "$ALPHA" "$model"
  expect_error 503 "gateway completion with $model, the upstream gone"
done

echo "PASS: http_tenants_test"
