#!/usr/bin/env bash
# Shared set-up of the HTTP e2e scripts (sourced, not run): arguments, tools,
# a temporary directory removed at exit with every server the script started,
# `fail`, `start_server`, and requests with checks of their answers (`req`,
# `expect_status`, `expect_error`, `expect_jq`).
# The sourcing script is called as: SCRIPT LORASERVE_BINARY SHARED_DIR
# shellcheck shell=bash
# shellcheck disable=SC2034  # BASE_MODEL, HTTP, GRPC_PORT are read by the sourcing scripts

if [ "$#" -ne 2 ]; then
  echo "usage: $0 LORASERVE_BINARY SHARED_DIR" >&2
  exit 2
fi
BIN="$1"
SHARED="$2"
MODEL_DIR="$SHARED/models/aidreams-260k"
ADAPTER_DIR="$SHARED/adapters/aidreams-260k"
BASE_MODEL="aidreams-260k"
for tool in curl jq python3; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is not installed (scripts/install_deps.sh)" >&2; exit 1; }
done

tmp="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  for log in "$tmp"/*.log; do
    [ -e "$log" ] || continue
    echo "--- last lines of $(basename "$log")" >&2
    tail -n 15 "$log" >&2
  done
  exit 1
}

# The binary may be relinked while a developer runs the test: give it a moment.
for _ in $(seq 60); do [ -x "$BIN" ] && break; sleep 1; done
[ -x "$BIN" ] || fail "no executable at $BIN"

# wait_for_line LOG PID PATTERN: the first line of LOG matching PATTERN, once
# it appears (fails if the process exits first or after 60 s).
wait_for_line() {
  local log="$1" pid="$2" pattern="$3" line=""
  for _ in $(seq 600); do
    line="$(grep -m1 -E "$pattern" "$log" || true)"
    [ -n "$line" ] && { echo "$line"; return 0; }
    kill -0 "$pid" 2>/dev/null || fail "$(basename "$log" .log) exited before printing '$pattern'"
    sleep 0.1
  done
  fail "$(basename "$log" .log) did not print '$pattern' within 60 s"
}

# start_server NAME [FLAGS...]: `loraserve serve` with the shared model and
# adapters; sets SERVER_PID, HTTP (base URL) and GRPC_PORT.
start_server() {
  local name="$1"
  shift
  mkdir -p "$tmp/$name-uploads"
  "$BIN" serve --model "$MODEL_DIR" --adapter-dir "$ADAPTER_DIR" --grpc-port 0 --http-port 0 \
    --api-keys "$tmp/keys" --threads 1 --kv-cache-bytes $((16 << 20)) \
    --upload-dir "$tmp/$name-uploads" "$@" >"$tmp/$name.log" 2>&1 &
  SERVER_PID=$!
  pids+=("$SERVER_PID")
  local http_line grpc_line
  http_line="$(wait_for_line "$tmp/$name.log" "$SERVER_PID" 'HTTP listening on 127\.0\.0\.1:[0-9]+')"
  grpc_line="$(wait_for_line "$tmp/$name.log" "$SERVER_PID" '^loraserve: listening on 127\.0\.0\.1:[0-9]+')"
  HTTP="http://127.0.0.1:${http_line##*:}"
  GRPC_PORT="${grpc_line##*:}"
}

# req URL METHOD PATH KEY [CURL ARGS...]: one request; sets STATUS and BODY.
# KEY "" sends no Authorization header.
req() {
  local url="$1" method="$2" path="$3" key="$4"
  shift 4
  local auth=()
  [ -n "$key" ] && auth=(-H "Authorization: Bearer $key")
  LAST="$method $path"
  STATUS="$(curl -sS --max-time 60 -o "$tmp/body" -w '%{http_code}' \
    -X "$method" "${auth[@]}" "$@" "$url$path")" || fail "$LAST: curl failed"
  BODY="$(cat "$tmp/body")"
}

expect_status() {
  local want="$1" what="$2"
  [ "$STATUS" = "$want" ] || fail "$what ($LAST): expected HTTP $want, got $STATUS; body: $BODY"
}

# An OpenAI error object whose code is the HTTP status.
expect_error_json() {
  local what="$1"
  jq -e --argjson code "$STATUS" '.error | (.message | type == "string" and length > 0)
      and (.type | type == "string") and has("param") and .code == $code' <<<"$BODY" >/dev/null \
    2>&1 || fail "$what ($LAST): HTTP $STATUS without an OpenAI error JSON: $BODY"
}

expect_error() {
  expect_status "$1" "$2"
  expect_error_json "$2"
}

# expect_jq FILTER WHAT [JQ ARGS...]: FILTER (jq -e) holds for BODY.
expect_jq() {
  local filter="$1" what="$2"
  shift 2
  jq -e "$@" "$filter" <<<"$BODY" >/dev/null 2>&1 ||
    fail "$what ($LAST): '$filter' does not hold for: $BODY"
}
