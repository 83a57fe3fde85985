#!/usr/bin/env bash
# loraserve vs llama.cpp on the CPU, side by side, on the same seeded random
# TinyLlama-1.1B-shaped Llama (vocab 32000, hidden 2048, 22 layers, 32 heads,
# 4 KV heads, untied lm_head), in 16-bit and in 8-bit:
#
#   format  llama.cpp GGUF            loraserve
#   f16     F16 (from the f16 ckpt)   f16 checkpoint, --dtype float16
#   bf16    BF16 (from the bf16 ckpt) bf16 checkpoint, --dtype bfloat16
#   q8_0    Q8_0 (from the bf16 ckpt) bf16 checkpoint, --quantization int8
#
# Rows: single-stream decode (llama-bench tg vs engine_bench batch 1), and the
# same closed-loop grpc_load over the OpenAI HTTP API (8 clients, prompts of
# 8-16 random token ids, 32 output tokens, ignore_eos) against llama-server
# (-np 8, continuous batching) and `loraserve serve`, base-only and with 8
# rank-16 all-projection LoRA adapters, client i on adapter i.
#
# Builds nothing. Needs: llama.cpp's llama-bench and llama-server
# (LLAMA_CPP_BIN), loraserve's build (LORASERVE_BUILD: server/loraserve,
# bench/engine_bench, bench/grpc_load with --llama-lora), python3 (a venv with
# bench/peer/requirements.txt is made at VENV).
#
#   bench/peer/vs_llamacpp.sh                              # everything
#   ENGINES=llama.cpp FORMATS="f16 q8_0" bench/peer/vs_llamacpp.sh
#   SHAPE=tiny-32k LOAD_SECONDS=5 bench/peer/vs_llamacpp.sh   # smoke test, seconds
#
# Environment (defaults): LLAMA_CPP_BIN (/work/peer/llama_cpp_python-0.3.36/
# vendor/llama.cpp/build/bin), LORASERVE_BUILD (<repo>/build), GRPC_LOAD
# ($LORASERVE_BUILD/bench/grpc_load), WORK (/tmp/vs_llamacpp: checkpoints,
# GGUFs, adapters, logs, results.jsonl; reused when present), VENV
# (<repo>/.venv-peer), SHAPE (tinyllama-1.1b), FORMATS (f16 q8_0), ENGINES
# (llama.cpp loraserve), CASES (decode serve-base serve-lora), THREADS (2),
# REPEAT (1: runs per row, the table shows medians), TG_TOKENS (64),
# LOAD_SECONDS (40), CLIENTS (8), ADAPTERS (8), RANK (16), TOKENIZER
# (../shared/models/aidreams-260k: loraserve needs a tokenizer.json; prompts
# are token ids so any will do), QUIET_WAIT (120: seconds to wait for an idle
# CPU before each run; the load average is recorded either way).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LLAMA_CPP_BIN=${LLAMA_CPP_BIN:-/work/peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin}
LORASERVE_BUILD=${LORASERVE_BUILD:-$REPO/build}
GRPC_LOAD=${GRPC_LOAD:-$LORASERVE_BUILD/bench/grpc_load}
WORK=${WORK:-/tmp/vs_llamacpp}
VENV=${VENV:-$REPO/.venv-peer}
SHAPE=${SHAPE:-tinyllama-1.1b}
FORMATS=${FORMATS:-f16 q8_0}
ENGINES=${ENGINES:-llama.cpp loraserve}
CASES=${CASES:-decode serve-base serve-lora}
THREADS=${THREADS:-2}
REPEAT=${REPEAT:-1}
TG_TOKENS=${TG_TOKENS:-64}
LOAD_SECONDS=${LOAD_SECONDS:-40}
CLIENTS=${CLIENTS:-8}
ADAPTERS=${ADAPTERS:-8}
RANK=${RANK:-16}
TOKENIZER=${TOKENIZER:-$REPO/../shared/models/aidreams-260k}
QUIET_WAIT=${QUIET_WAIT:-120}
LLAMA_PORT=${LLAMA_PORT:-18200}
LS_GRPC_PORT=${LS_GRPC_PORT:-18210}
LS_HTTP_PORT=${LS_HTTP_PORT:-18211}
VOCAB=32000
PROMPT_TOKENS=16  # engine_bench's prompt before the measured decode

PY=$VENV/bin/python
RESULTS=$WORK/results.jsonl
LOGS=$WORK/logs
SERVER_PID=

log() { echo "[vs_llamacpp] $*" >&2; }
die() { log "error: $*"; exit 1; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ setup

setup_venv() {
  if ! "$PY" -c 'import gguf, numpy' 2>/dev/null; then
    log "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$HERE/requirements.txt"
  fi
}

# The checkpoints (bf16, f16), the GGUFs, and ADAPTERS PEFT adapters with
# their GGUF conversions; each step skipped when its output exists.
prepare_data() {
  mkdir -p "$WORK" "$LOGS"
  local dtype
  for dtype in bf16 f16; do
    [[ -f $WORK/hf-$dtype/model.safetensors ]] ||
      "$PY" "$HERE/make_checkpoint.py" --shape "$SHAPE" --dtype "$dtype" --out "$WORK/hf-$dtype"
  done
  local fmt
  for fmt in $FORMATS; do
    [[ -f $WORK/model-$fmt.gguf ]] ||
      "$PY" "$HERE/hf_to_gguf.py" model "$(checkpoint_of "$fmt")" "$WORK/model-$fmt.gguf" --outtype "$fmt"
  done
  [[ -f $WORK/peft/a$((ADAPTERS - 1))/adapter_model.safetensors ]] ||
    "$PY" "$HERE/make_adapters.py" --base "$WORK/hf-bf16" --count "$ADAPTERS" --rank "$RANK" --out "$WORK/peft"
  mkdir -p "$WORK/lora-gguf"
  local i
  for ((i = 0; i < ADAPTERS; i++)); do
    [[ -f $WORK/lora-gguf/a$i.gguf ]] ||
      "$PY" "$HERE/hf_to_gguf.py" lora "$WORK/peft/a$i" "$WORK/lora-gguf/a$i.gguf" --base "$WORK/hf-bf16"
  done
}

checkpoint_of() {  # the HF checkpoint a format's GGUF and loraserve run read
  case $1 in
    f16) echo "$WORK/hf-f16" ;;
    bf16 | q8_0) echo "$WORK/hf-bf16" ;;
    *) die "unknown format $1" ;;
  esac
}

# Waits (up to QUIET_WAIT s) until the CPUs have been < 15% busy for 3 s.
wait_quiet() {
  local deadline=$((SECONDS + QUIET_WAIT)) a b busy
  while ((SECONDS < deadline)); do
    read -r _ a1 a2 a3 a4 a5 a6 a7 _ < /proc/stat; a=$((a1 + a2 + a3 + a6 + a7)); b=$((a + a4 + a5))
    sleep 3
    read -r _ c1 c2 c3 c4 c5 c6 c7 _ < /proc/stat
    busy=$(( (c1 + c2 + c3 + c6 + c7 - a) * 100 / ((c1 + c2 + c3 + c4 + c5 + c6 + c7) - b + 1) ))
    ((busy < 15)) && return 0
    log "CPU ${busy}% busy (load $(loadavg)); waiting"
  done
  log "warning: CPU still busy after ${QUIET_WAIT}s; measuring anyway (load $(loadavg))"
}

# record ENGINE FORMAT CASE TOK_S TPOT_MS TTFT_MS LOAD RAW_JSON
record() {
  "$PY" - "$@" >> "$RESULTS" <<'EOF'
import json, sys
e, f, c, tok, tpot, ttft, load, raw = sys.argv[1:9]
num = lambda x: None if x in ("", "null", "None") else float(x)
print(json.dumps({"engine": e, "format": f, "case": c, "tok_s": num(tok), "tpot_p50_ms": num(tpot),
                  "ttft_p50_ms": num(ttft), "load": load, "raw": json.loads(raw) if raw else None}))
EOF
  log "$1 $2 $3: $(printf '%.2f' "$4") tok/s, TPOT p50 $(printf '%.1f' "$5") ms (load $7)"
}

wait_http() {  # URL PID: until URL answers 200, or the server dies
  local i
  for ((i = 0; i < 600; i++)); do
    curl -sf -o /dev/null "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.5
  done
  return 1
}

stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}

# grpc_load against whatever listens; prints its JSON line.
run_load() {  # extra grpc_load flags...
  "$GRPC_LOAD" --vocab "$VOCAB" --clients "$CLIENTS" --seconds "$LOAD_SECONDS" \
    --prompt-min 8 --prompt-max 16 --output-min 32 --output-max 32 "$@"
}

record_load() {  # ENGINE FORMAT CASE LOAD JSON
  local tok tpot ttft
  local failed
  read -r tok tpot ttft failed < <("$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["output_tokens_per_s"], d["tpot_p50_ms"], d["ttft_p50_ms"], d["failed"])' "$5")
  ((failed == 0)) || log "warning: $1 $2 $3: $failed failed requests"
  record "$1" "$2" "$3" "$tok" "$tpot" "$ttft" "$4" "$5"
}

# ------------------------------------------------------------------ llama.cpp

llama_decode() {  # FORMAT
  local load out
  wait_quiet; load=$(loadavg)
  out=$("$LLAMA_CPP_BIN/llama-bench" -m "$WORK/model-$1.gguf" -p 0 -n "$TG_TOKENS" -t "$THREADS" -r 3 \
        -o json 2>"$LOGS/llama-bench-$1.err")
  local tok
  tok=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])[0]["avg_ts"])' "$out")
  record llama.cpp "$1" decode "$tok" "$("$PY" -c "print(1000/$tok)")" "" "$load" \
    "$("$PY" -c 'import json,sys; r=json.loads(sys.argv[1])[0]; print(json.dumps({k: r[k] for k in ("avg_ts","stddev_ts","samples_ts","n_gen","n_threads","type_k","build_commit")}))' "$out")"
}

llama_serve() {  # FORMAT CASE
  local args=(-m "$WORK/model-$1.gguf" -t "$THREADS" -tb "$THREADS" -np "$CLIENTS" -c $((CLIENTS * 512))
              --cont-batching --host 127.0.0.1 --port "$LLAMA_PORT" --no-webui)
  local load_flags=(--base-only)
  if [[ $2 == serve-lora ]]; then
    local i scaled=
    # Loaded at scale 0 (a request without a "lora" field would otherwise get
    # every adapter at scale 1); each request selects its own at scale 1.
    # One comma-separated flag: repeating it loads them all too, but warns.
    for ((i = 0; i < ADAPTERS; i++)); do scaled+="${scaled:+,}$WORK/lora-gguf/a$i.gguf:0"; done
    args+=(--lora-scaled "$scaled")
    load_flags=(--llama-lora "$ADAPTERS")
  fi
  wait_quiet
  "$LLAMA_CPP_BIN/llama-server" "${args[@]}" > "$LOGS/llama-server-$1-$2.log" 2>&1 &
  SERVER_PID=$!
  wait_http "http://127.0.0.1:$LLAMA_PORT/health" "$SERVER_PID" || die "llama-server did not start: $LOGS/llama-server-$1-$2.log"
  local load out
  load=$(loadavg)
  out=$(run_load --target 127.0.0.1:1 --http "127.0.0.1:$LLAMA_PORT" "${load_flags[@]}")
  stop_server
  record_load llama.cpp "$1" "$2" "$load" "$out"
}

# ------------------------------------------------------------------ loraserve

# Every loraserve invocation goes through here: the flags that pick the
# weight format. FORMAT -> model dir and --dtype/--quantization.
loraserve_format_flags() {
  case $1 in
    f16) echo "--model $WORK/hf-f16 --dtype float16 --quantization none" ;;
    bf16) echo "--model $WORK/hf-bf16 --dtype bfloat16 --quantization none" ;;
    q8_0) echo "--model $WORK/hf-bf16 --dtype auto --quantization int8" ;;
  esac
}

loraserve_decode() {  # FORMAT
  local load out
  wait_quiet; load=$(loadavg)
  # shellcheck disable=SC2046
  out=$("$LORASERVE_BUILD/bench/engine_bench" $(loraserve_format_flags "$1") --batch-sizes 1 \
        --decode-tokens "$TG_TOKENS" --prompt-tokens "$PROMPT_TOKENS" --threads "$THREADS" \
        2>"$LOGS/engine_bench-$1.err")
  local tok tpot
  read -r tok tpot < <("$PY" -c 'import json,sys; r=json.loads(sys.argv[1])["results"][0]; print(r["decode_tokens_per_s"], r["decode_step_ms_median"])' "$out")
  record loraserve "$1" decode "$tok" "$tpot" "" "$load" "$("$PY" -c 'import json,sys; print(json.dumps(json.loads(sys.argv[1])))' "$out")"
}

loraserve_serve() {  # FORMAT CASE
  local load_flags=(--base-only) extra=()
  if [[ $2 == serve-lora ]]; then
    extra=(--adapter-dir "$WORK/peft")
    load_flags=(--adapters "$(seq -s, -f 'a%g' 0 $((ADAPTERS - 1)))")
  fi
  wait_quiet
  # shellcheck disable=SC2046
  "$LORASERVE_BUILD/server/loraserve" serve $(loraserve_format_flags "$1") --tokenizer "$TOKENIZER" \
    --threads "$THREADS" --grpc-port "$LS_GRPC_PORT" --http-port "$LS_HTTP_PORT" "${extra[@]}" \
    > "$LOGS/loraserve-$1-$2.log" 2>&1 &
  SERVER_PID=$!
  wait_http "http://127.0.0.1:$LS_HTTP_PORT/v1/models" "$SERVER_PID" || die "loraserve did not start: $LOGS/loraserve-$1-$2.log"
  local load out
  load=$(loadavg)
  out=$(run_load --target "127.0.0.1:$LS_GRPC_PORT" --http "127.0.0.1:$LS_HTTP_PORT" "${load_flags[@]}")
  stop_server
  record_load loraserve "$1" "$2" "$load" "$out"
}

# ------------------------------------------------------------------ main

table() {
  "$PY" - "$RESULTS" "$SHAPE" "$THREADS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(engine, fmt, case, key):
    v = [r[key] for r in rows if (r["engine"], r["format"], r["case"]) == (engine, fmt, case) and r[key] is not None]
    return statistics.median(v) if v else None
def loads(engine, fmt, case):
    return "; ".join(r["load"].split()[0] for r in rows if (r["engine"], r["format"], r["case"]) == (engine, fmt, case))
fmt_ = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"
names = {"decode": "single-stream decode", "serve-base": f"serve, 8 clients, base",
         "serve-lora": "serve, 8 clients, 8 LoRA"}
print(f"\n{sys.argv[2]}, {sys.argv[3]} threads; tok/s (median of runs); TPOT p50 ms; load = 1-min load average at start\n")
print("| case | format | llama.cpp tok/s | loraserve tok/s | loraserve / llama.cpp | llama.cpp TPOT p50 | loraserve TPOT p50 | load (llama.cpp; loraserve) |")
print("|---|---|---:|---:|---:|---:|---:|---|")
seen = []
for r in rows:
    k = (r["case"], r["format"])
    if k not in seen: seen.append(k)
for case, f in seen:
    a, b = med("llama.cpp", f, case, "tok_s"), med("loraserve", f, case, "tok_s")
    ratio = f"{b / a:.2f}x" if a and b else "-"
    lf = {"q8_0": "q8_0 / int8"}.get(f, f)
    print(f"| {names.get(case, case)} | {lf} | {fmt_(a)} | {fmt_(b)} | {ratio} | "
          f"{fmt_(med('llama.cpp', f, case, 'tpot_p50_ms'))} | {fmt_(med('loraserve', f, case, 'tpot_p50_ms'))} | "
          f"{loads('llama.cpp', f, case) or '-'} / {loads('loraserve', f, case) or '-'} |")
EOF
}

main() {
  local engine fmt case rep
  for engine in $ENGINES; do
    case $engine in
      llama.cpp) [[ -x $LLAMA_CPP_BIN/llama-bench && -x $LLAMA_CPP_BIN/llama-server ]] || die "no llama-bench/llama-server in LLAMA_CPP_BIN=$LLAMA_CPP_BIN" ;;
      loraserve) [[ -x $LORASERVE_BUILD/server/loraserve && -x $LORASERVE_BUILD/bench/engine_bench ]] || die "no loraserve build in LORASERVE_BUILD=$LORASERVE_BUILD" ;;
      *) die "unknown engine $engine" ;;
    esac
  done
  [[ $CASES != *serve* ]] || [[ -x $GRPC_LOAD ]] || die "no grpc_load at GRPC_LOAD=$GRPC_LOAD"
  setup_venv
  prepare_data
  mkdir -p "$LOGS"
  : > "$RESULTS"
  "$LLAMA_CPP_BIN/llama-server" --version 2>&1 | grep -i version | sed 's/^/[vs_llamacpp] llama.cpp /' >&2 || true
  for case in $CASES; do
    for fmt in $FORMATS; do
      for ((rep = 0; rep < REPEAT; rep++)); do
        for engine in $ENGINES; do
          case $engine:$case in
            llama.cpp:decode) llama_decode "$fmt" ;;
            loraserve:decode) loraserve_decode "$fmt" ;;
            llama.cpp:serve-*) llama_serve "$fmt" "$case" ;;
            loraserve:serve-*) loraserve_serve "$fmt" "$case" ;;
            *) die "unknown case $case" ;;
          esac
        done
      done
    done
  done
  table
  log "results: $RESULTS, logs: $LOGS"
}

main "$@"
