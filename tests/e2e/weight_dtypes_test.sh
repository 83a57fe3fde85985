#!/usr/bin/env bash
# End-to-end test of `--dtype` and `--quantization` on the real binary with
# the shared model and adapters: for bfloat16, float16 and int8 weights,
# `generate` gives the reference greedy text of the base model and of an
# adapter, and `serve` answers HTTP completions with the base model, an
# operator's adapter and a tenant-uploaded adapter, unmerged and on merged
# weights, with the dtype named in its log; contradictory or unknown flags
# fail at start with a message naming the flag.
#
# Needs curl, jq and python3 (scripts/install_deps.sh).
# Usage: weight_dtypes_test.sh LORASERVE_BINARY SHARED_DIR
set -euo pipefail

# shellcheck source=tests/e2e/http_test_lib.sh
source "$(dirname "$0")/http_test_lib.sh"

echo "admin-key-000001 ops admin" >"$tmp/keys"
KEY=admin-key-000001
# The reference greedy continuations of the empty prompt (../shared/README.md).
BASE_START="Echoes of vectors unfold, a gentle hum of precision"
OCEAN_START="At low tide the rock pools shine"
ROBOT_START="The robot charged its battery at the station"

# generate FLAGS...: the greedy continuation of the empty prompt on stdout.
generate() {
  "$BIN" generate --model "$MODEL_DIR" --adapter-dir "$ADAPTER_DIR" --prompt "" \
    --temperature 0 --max-tokens 24 --threads 1 "$@" 2>"$tmp/generate.log"
}

# complete MODEL: a greedy completion of the empty prompt from $HTTP; sets TEXT.
complete() {
  local status
  status="$(curl -sS --max-time 60 -o "$tmp/body" -w '%{http_code}' "$HTTP/v1/completions" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$1\", \"prompt\": \"\", \"max_tokens\": 24, \"temperature\": 0}")" ||
    fail "completion with $1: curl failed"
  [ "$status" = 200 ] || fail "completion with $1: HTTP $status: $(cat "$tmp/body")"
  TEXT="$(jq -r '.choices[0].text' "$tmp/body")"
}

# The base model's text opens with a quote mark: the prefixes are searched in
# the first 80 characters.
expect_start() {  # TEXT PREFIX WHAT
  [[ "${1:0:80}" == *"$2"* ]] || fail "$3: expected a text opening with '$2', got '$1'"
}

for flags in "--dtype bfloat16" "--dtype float16" "--quantization int8"; do
  # shellcheck disable=SC2086  # $flags is two words on purpose
  set -- $flags
  case "$flags" in
    *bfloat16) NAME=BF16 ;;
    *float16) NAME=F16 ;;
    *) NAME=Q8 ;;
  esac
  echo "== $flags: generate"
  expect_start "$(generate "$@")" "$BASE_START" "generate $flags"
  grep -q "of $NAME weights" "$tmp/generate.log" ||
    fail "generate $flags: the log does not name $NAME weights: $(cat "$tmp/generate.log")"
  expect_start "$(generate "$@" --lora ocean)" "$OCEAN_START" "generate $flags --lora ocean"

  for mode in unmerged merged; do
    echo "== $flags: serve, --lora-mode $mode"
    start_server "$NAME-$mode" "$@" --lora-mode "$mode" --merged-cache-bytes $((8 << 20))
    grep -q "of $NAME weights" "$tmp/$NAME-$mode.log" || fail "serve $flags: no $NAME in the log"
    complete "$BASE_MODEL"
    expect_start "$TEXT" "$BASE_START" "serve $flags $mode: base model"
    complete ocean
    expect_start "$TEXT" "$OCEAN_START" "serve $flags $mode: ocean"
    # A tenant's adapter, uploaded over HTTP to this server.
    status="$(curl -sS --max-time 60 -o "$tmp/body" -w '%{http_code}' "$HTTP/v1/adapters" \
      -H "Authorization: Bearer $KEY" -F name=mine \
      -F "adapter_config.json=@$ADAPTER_DIR/robot/adapter_config.json;type=application/json" \
      -F "adapter_model.safetensors=@$ADAPTER_DIR/robot/adapter_model.safetensors")"
    [ "$status" = 201 ] || fail "upload on $flags: HTTP $status: $(cat "$tmp/body")"
    complete mine
    expect_start "$TEXT" "$ROBOT_START" "serve $flags $mode: an uploaded copy of robot"
    merged_steps="$(curl -sS "$HTTP/metrics" | awk '$1 == "loraserve_merged_steps_total" {print $2}')"
    if [ "$mode" = merged ]; then
      [ "${merged_steps:-0}" != 0 ] || fail "serve $flags merged: no step ran on merged weights"
    else
      [ "${merged_steps:-0}" = 0 ] || fail "serve $flags unmerged: $merged_steps merged steps"
    fi
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || fail "serve $flags $mode did not exit 0 on SIGTERM"
  done
done

echo "== bad flags are refused at start"
expect_refusal() {  # PATTERN FLAGS...
  local pattern="$1"
  shift
  if "$BIN" generate --model "$MODEL_DIR" --prompt "" --max-tokens 1 "$@" \
    >"$tmp/refused.out" 2>"$tmp/refused.log"; then
    fail "generate $* succeeded"
  fi
  grep -q -- "$pattern" "$tmp/refused.log" ||
    fail "generate $*: expected '$pattern' in: $(cat "$tmp/refused.log")"
}
expect_refusal "--dtype must be auto, float32, bfloat16 or float16" --dtype fp8
expect_refusal "--quantization must be none or int8" --quantization int4
expect_refusal "--dtype must stay auto" --dtype bfloat16 --quantization int8
expect_refusal "runs on --device cpu only" --device cuda --quantization int8
echo "PASS"
