#!/usr/bin/env bash
# What a /metrics scrape costs the engine: `loraserve serve` under 8
# closed-loop streaming clients (grpc_load over the HTTP API, client i on
# adapter i of the shared adapters, base model for the rest), measured
# without and with a scrape every SCRAPE_MS, alternating, REPEAT times each,
# in one run. Prints a markdown table: decode TPOT p50/p99, output tokens/s,
# and the scrapes' p50/p99 time and size; medians over the repeats.
#
#   bench/scrape_cost.sh                                  # the shared tiny model
#   MODEL_FLAGS="--load-format dummy --model tinyllama-1.1b --tokenizer ../shared/models/aidreams-260k" \
#     ADAPTERS= bench/scrape_cost.sh                      # a 1B-shaped random model, base only
#
# Environment (defaults): LORASERVE_BUILD (<repo>/build), SHARED (<repo>/../shared),
# MODEL_FLAGS (the shared aidreams-260k with its adapters), ADAPTERS (ocean,robot,qv-r4,
# attn-r8,all-r8-bf16,mlp-r16-rslora; empty: base only), CLIENTS (8), RUN_SECONDS (20),
# SCRAPE_MS (100), REPEAT (3), THREADS (2), OUTPUT_TOKENS (32), VOCAB (500).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
LORASERVE_BUILD=${LORASERVE_BUILD:-$REPO/build}
SHARED=${SHARED:-$REPO/../shared}
MODEL_FLAGS=${MODEL_FLAGS:---model $SHARED/models/aidreams-260k --adapter-dir $SHARED/adapters/aidreams-260k}
ADAPTERS=${ADAPTERS-ocean,robot,qv-r4,attn-r8,all-r8-bf16,mlp-r16-rslora}
CLIENTS=${CLIENTS:-8}
SECONDS_PER_RUN=${RUN_SECONDS:-20}
SCRAPE_MS=${SCRAPE_MS:-100}
REPEAT=${REPEAT:-3}
THREADS=${THREADS:-2}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-32}
VOCAB=${VOCAB:-500}

work=$(mktemp -d)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# shellcheck disable=SC2086
"$LORASERVE_BUILD/server/loraserve" serve $MODEL_FLAGS --threads "$THREADS" --grpc-port 0 \
  --http-port 0 --max-running-requests "$CLIENTS" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do
  grep -qE 'HTTP listening on 127\.0\.0\.1:[0-9]+' "$work/server.log" &&
    grep -qE '^loraserve: listening on' "$work/server.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
http_port=$(grep -oE 'HTTP listening on 127\.0\.0\.1:[0-9]+' "$work/server.log" | grep -oE '[0-9]+$')
grpc_port=$(grep -oE '^loraserve: listening on 127\.0\.0\.1:[0-9]+' "$work/server.log" | grep -oE '[0-9]+$')

load_flags=(--base-only)
[[ -n $ADAPTERS ]] && load_flags=(--adapters "$ADAPTERS")
run() {  # SCRAPE_EVERY_MS -> one JSON line
  "$LORASERVE_BUILD/bench/grpc_load" --target "127.0.0.1:$grpc_port" --http "127.0.0.1:$http_port" \
    --clients "$CLIENTS" --seconds "$SECONDS_PER_RUN" --vocab "$VOCAB" --prompt-min 8 --prompt-max 16 \
    --output-min "$OUTPUT_TOKENS" --output-max "$OUTPUT_TOKENS" --scrape-every-ms "$1" "${load_flags[@]}"
}

run 0 >/dev/null  # warm-up: adapters loaded, caches filled
for ((i = 0; i < REPEAT; i++)); do
  run 0 >>"$work/without.jsonl"
  run "$SCRAPE_MS" >>"$work/with.jsonl"
done

python3 - "$work/without.jsonl" "$work/with.jsonl" "$SCRAPE_MS" "$CLIENTS" <<'PY'
import json, statistics, sys
rows = {name: [json.loads(l) for l in open(path)] for name, path in
        (("without", sys.argv[1]), ("with", sys.argv[2]))}
med = lambda name, key: statistics.median(r[key] for r in rows[name])
print(f"{sys.argv[4]} streaming clients, medians of {len(rows['with'])} runs each, alternating\n")
print("| scrape | TPOT p50 ms | TPOT p99 ms | tokens/s | failed | scrapes | scrape p50 ms | scrape p99 ms | scrape bytes |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, label in (("without", "none"), ("with", f"every {sys.argv[3]} ms")):
    print(f"| {label} | {med(name, 'tpot_p50_ms'):.2f} | {med(name, 'tpot_p99_ms'):.2f} | "
          f"{med(name, 'output_tokens_per_s'):.1f} | {sum(r['failed'] for r in rows[name])} | "
          f"{med(name, 'scrapes'):.0f} | {med(name, 'scrape_p50_ms'):.2f} | {med(name, 'scrape_p99_ms'):.2f} | "
          f"{med(name, 'scrape_bytes'):.0f} |")
ratio = med("with", "tpot_p50_ms") / med("without", "tpot_p50_ms")
print(f"\nTPOT p50 with / without scraping: {ratio:.3f}")
PY
