#!/usr/bin/env bash
# End-to-end test of loraserve's GET /metrics: starts the real binary on free
# loopback ports, sends completions (the base model and two adapters) and one
# that fails, then checks the scrape three ways:
#   1. every required metric family is there with its type and label names,
#      and the request and token counters equal what the test sent;
#   2. `promtool check metrics` accepts loraserve's families without a lint
#      message (the protocol's vllm:* names draw only the colon lint);
#   3. a real Prometheus server (Debian's `prometheus`) scraping every second
#      sees the target up and the same counter values through its query API.
# Parts 2 and 3 print "SKIP: reason" and pass when promtool or prometheus is
# not installed (scripts/install_deps.sh installs both).
#
# Needs curl, jq and python3. Exits non-zero at the first failure with what
# was expected and what came back.
# Usage: prometheus_scrape_test.sh LORASERVE_BINARY SHARED_DIR
set -euo pipefail

# shellcheck source=tests/e2e/http_test_lib.sh
source "$(dirname "$0")/http_test_lib.sh"

cat >"$tmp/keys" <<'EOF'
alpha-key-000001 alpha tenant
beta-key-0000001 beta tenant
EOF
ALPHA=alpha-key-000001
BETA=beta-key-0000001

start_server loraserve

# complete KEY MODEL WANT_STATUS: one greedy completion; appends
# "tenant adapter status prompt_tokens completion_tokens" to $tmp/sent.
complete() {
  local key="$1" model="$2" want="$3" tenant adapter status
  status="$(curl -sS --max-time 60 -o "$tmp/body" -w '%{http_code}' \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    --data-binary "$(jq -cn --arg m "$model" \
      '{model: $m, prompt: "Once upon a time", max_tokens: 7, temperature: 0}')" \
    "$HTTP/v1/completions")" || fail "POST /v1/completions (model $model): curl failed"
  [ "$status" = "$want" ] ||
    fail "POST /v1/completions (model $model): expected HTTP $want, got $status: $(cat "$tmp/body")"
  tenant=alpha
  [ "$key" = "$BETA" ] && tenant=beta
  adapter="$model"
  [ "$model" = "$BASE_MODEL" ] && adapter=base
  if [ "$status" = 200 ]; then
    echo "$tenant $adapter $status $(jq -r '"\(.usage.prompt_tokens) \(.usage.completion_tokens)"' \
      "$tmp/body")" >>"$tmp/sent"
  else
    echo "$tenant none $status 0 0" >>"$tmp/sent"  # failed before its model was known
  fi
}

echo "== completions: base, ocean, robot; one for an unknown model"
: >"$tmp/sent"
complete "$ALPHA" "$BASE_MODEL" 200
complete "$ALPHA" "$BASE_MODEL" 200
complete "$ALPHA" ocean 200
complete "$ALPHA" robot 200
complete "$BETA" ocean 200
complete "$ALPHA" no-such-adapter 404

echo "== scrape /metrics (no API key needed)"
status="$(curl -sS --max-time 30 -o "$tmp/metrics.txt" -D "$tmp/metrics.headers" \
  -w '%{http_code}' "$HTTP/metrics")" || fail "GET /metrics: curl failed"
[ "$status" = 200 ] || fail "GET /metrics: expected HTTP 200, got $status: $(head -c 500 "$tmp/metrics.txt")"
grep -qi '^Content-Type: text/plain; version=0.0.4' "$tmp/metrics.headers" ||
  fail "GET /metrics: Content-Type is not the text exposition format 0.0.4: $(cat "$tmp/metrics.headers")"

echo "== required families, types, label names and counter values"
python3 - "$tmp/metrics.txt" "$tmp/sent" <<'EOF' || fail "the /metrics checks above failed"
import collections, re, sys

text = open(sys.argv[1]).read()
sent = [line.split() for line in open(sys.argv[2]) if line.strip()]
errors = []

types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
sample_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: \d+)?$')
label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
samples = collections.defaultdict(list)  # name -> [(labels dict, value)]
for line in text.splitlines():
    if not line or line.startswith("#"):
        continue
    m = sample_re.match(line)
    if not m:
        errors.append(f"unparsable sample line: {line!r}")
        continue
    samples[m.group(1)].append((dict(label_re.findall(m.group(2) or "")), float(m.group(3))))

# Family -> (type, label names). loraserve_kv_blocks_capacity is the pool's
# size: promtool's lint reserves the "_total" suffix for counters.
required = {
    "loraserve_requests_total": ("counter", {"adapter", "tenant", "status"}),
    "loraserve_prompt_tokens_total": ("counter", None),
    "loraserve_generation_tokens_total": ("counter", None),
    "loraserve_time_to_first_token_seconds": ("histogram", None),
    "loraserve_time_per_output_token_seconds": ("histogram", None),
    "loraserve_request_duration_seconds": ("histogram", None),
    "loraserve_requests_running": ("gauge", set()),
    "loraserve_requests_waiting": ("gauge", set()),
    "loraserve_kv_blocks_used": ("gauge", set()),
    "loraserve_kv_blocks_capacity": ("gauge", set()),
    "loraserve_adapter_resident": ("gauge", {"adapter", "tier"}),
    "loraserve_memory_bytes": ("gauge", {"pool"}),
    "loraserve_adapter_loads_total": ("counter", {"tier"}),
    "loraserve_adapter_evictions_total": ("counter", {"tier"}),
    "loraserve_merges_total": ("counter", set()),
    "loraserve_adapter_load_seconds": ("histogram", {"tier"}),
    # The Gateway API Inference Extension's model-server protocol, under the
    # names its endpoint picker reads by default (vLLM's).
    "vllm:num_requests_waiting": ("gauge", set()),
    "vllm:num_requests_running": ("gauge", set()),
    "vllm:kv_cache_usage_perc": ("gauge", set()),
    "vllm:gpu_cache_usage_perc": ("gauge", set()),
    "vllm:lora_requests_info": ("gauge", {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}),
    "vllm:cache_config_info": ("gauge", {"block_size", "num_gpu_blocks"}),
}
for family, (kind, labels) in required.items():
    if types.get(family) != kind:
        errors.append(f"{family}: expected '# TYPE {family} {kind}', got {types.get(family)!r}")
        continue
    if kind == "histogram":
        buckets, sums, counts = (samples.get(family + s, []) for s in ("_bucket", "_sum", "_count"))
        if not buckets or not sums or not counts:
            errors.append(f"{family}: histogram without _bucket/_sum/_count samples")
            continue
        for bucket_labels, value in buckets:
            if "le" not in bucket_labels:
                errors.append(f"{family}_bucket without le: {bucket_labels}")
        for count_labels, count in counts:
            inf = [v for l, v in buckets if l.get("le") == "+Inf" and
                   {k: x for k, x in l.items() if k != "le"} == count_labels]
            if inf != [count]:
                errors.append(f"{family}{count_labels}: +Inf bucket {inf} != _count {count}")
        series = counts
    else:
        series = samples.get(family, [])
        if not series:
            errors.append(f"{family}: no samples")
    if labels is not None:
        for l, _ in series:
            if set(l) != labels:
                errors.append(f"{family}: labels {sorted(l)}, expected {sorted(labels)}")

def value(name, **labels):
    found = [v for l, v in samples.get(name, []) if l == labels]
    return found[0] if found else None

# What the test sent, per (adapter, tenant[, status]).
want_requests = collections.Counter()
want_prompt = collections.Counter()
want_generated = collections.Counter()
want_ttft = collections.Counter()
want_duration = collections.Counter()
for tenant, adapter, status, prompt, generated in sent:
    want_requests[(adapter, tenant, status)] += 1
    want_prompt[(adapter, tenant)] += int(prompt)
    want_generated[(adapter, tenant)] += int(generated)
    want_duration[adapter] += 1
    if status == "200":
        want_ttft[adapter] += 1
got_requests = {(l["adapter"], l["tenant"], l["status"]): v
                for l, v in samples.get("loraserve_requests_total", [])}
if got_requests != {k: float(v) for k, v in want_requests.items()}:
    errors.append(f"loraserve_requests_total: expected {dict(want_requests)}, got {got_requests}")
for name, want in (("loraserve_prompt_tokens_total", want_prompt),
                   ("loraserve_generation_tokens_total", want_generated)):
    for (adapter, tenant), tokens in want.items():
        got = value(name, adapter=adapter, tenant=tenant)
        if got != tokens:
            errors.append(f"{name}{{adapter={adapter},tenant={tenant}}}: expected {tokens}, got {got}")
for name, want in (("loraserve_time_to_first_token_seconds_count", want_ttft),
                   ("loraserve_request_duration_seconds_count", want_duration)):
    for adapter, count in want.items():
        got = value(name, adapter=adapter)
        if got != count:
            errors.append(f"{name}{{adapter={adapter}}}: expected {count}, got {got}")

# Server state mirrored at scrape time.
checks = [
    ("loraserve_kv_blocks_capacity", {}, lambda v: v > 0),
    ("loraserve_requests_running", {}, lambda v: v == 0),
    ("loraserve_requests_waiting", {}, lambda v: v == 0),
    ("loraserve_adapter_resident", {"adapter": "ocean", "tier": "host"}, lambda v: v == 1),
    ("loraserve_adapter_resident", {"adapter": "robot", "tier": "host"}, lambda v: v == 1),
    ("loraserve_memory_bytes", {"pool": "weights"}, lambda v: v > 0),
    ("loraserve_memory_bytes", {"pool": "adapters_host"}, lambda v: v > 0),
    ("loraserve_adapter_loads_total", {"tier": "host"}, lambda v: v >= 2),
    ("loraserve_adapter_load_seconds_count", {"tier": "host"}, lambda v: v >= 2),
    ("vllm:num_requests_waiting", {}, lambda v: v == 0),
    ("vllm:num_requests_running", {}, lambda v: v == 0),
    ("vllm:kv_cache_usage_perc", {}, lambda v: 0 <= v <= 1),
]
for name, labels, ok in checks:
    got = value(name, **labels)
    if got is None or not ok(got):
        errors.append(f"{name}{labels}: unexpected value {got}")

# Idle: one LoRA info series with empty lists, a positive max_lora and a Unix
# time as its value.
info = samples.get("vllm:lora_requests_info", [])
if len(info) != 1:
    errors.append(f"vllm:lora_requests_info: expected one series, got {info}")
else:
    labels, stamp = info[0]
    if labels.get("running_lora_adapters") != "" or labels.get("waiting_lora_adapters") != "":
        errors.append(f"vllm:lora_requests_info: idle server lists adapters: {labels}")
    if not labels.get("max_lora", "").isdigit() or int(labels["max_lora"]) < 1:
        errors.append(f"vllm:lora_requests_info: max_lora {labels.get('max_lora')!r}")
    import time
    if abs(stamp - time.time()) > 120:
        errors.append(f"vllm:lora_requests_info: value {stamp} is not the time now")

for e in errors:
    print("  " + e, file=sys.stderr)
print(f"{len(required)} families, {sum(len(v) for v in samples.values())} samples checked")
sys.exit(1 if errors else 0)
EOF

skipped=()
echo "== promtool check metrics"
if command -v promtool >/dev/null; then
  # loraserve's own families lint clean. The protocol's names are vLLM's,
  # colons and all (the endpoint picker reads them so); promtool's lint says
  # of each, as of vLLM's own scrape, that colons are for recording rules,
  # and nothing else.
  lint_rc=0
  grep -v '^\(# [A-Z]* \)\?vllm:' "$tmp/metrics.txt" | promtool check metrics >"$tmp/promtool.out" 2>&1 ||
    lint_rc=$?
  if [ "$lint_rc" != 0 ] || [ -s "$tmp/promtool.out" ]; then
    fail "promtool check metrics (loraserve_* families) exited $lint_rc with: $(cat "$tmp/promtool.out")"
  fi
  promtool check metrics <"$tmp/metrics.txt" >"$tmp/promtool-all.out" 2>&1 || true
  unexpected="$(grep -v "^vllm:[a-z_]* metric names should not contain ':'$" "$tmp/promtool-all.out" || true)"
  [ -z "$unexpected" ] || fail "promtool check metrics (all) says more than the protocol names' colons: $unexpected"
  [ "$(grep -c . "$tmp/promtool-all.out")" = 6 ] ||
    fail "promtool check metrics (all): expected the six protocol names, got: $(cat "$tmp/promtool-all.out")"
else
  skipped+=("promtool is not installed (Debian package prometheus)")
fi

echo "== a Prometheus server scrapes loraserve every second"
if command -v prometheus >/dev/null; then
  prom_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: loraserve
    static_configs:
      - targets: ["${HTTP#http://}"]
EOF
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$tmp/prometheus.log" 2>&1 &
  PROM_PID=$!
  pids+=("$PROM_PID")
  PROM="http://127.0.0.1:$prom_port"
  query() {  # PROMQL -> the result vector as JSON
    curl -sS --max-time 10 -G --data-urlencode "query=$1" "$PROM/api/v1/query" |
      jq -c 'select(.status == "success") | .data.result'
  }
  # What the test sent, as sorted "adapter tenant status count" lines.
  want="$(awk '{print $2, $1, $3}' "$tmp/sent" | sort | uniq -c | awk '{print $2, $3, $4, $1}')"
  got=""
  up=""
  for _ in $(seq 60); do
    kill -0 "$PROM_PID" 2>/dev/null || fail "prometheus exited"
    up="$(query 'up{job="loraserve"}' 2>/dev/null | jq -r '.[0].value[1] // empty' 2>/dev/null || true)"
    got="$(query 'loraserve_requests_total{job="loraserve"}' 2>/dev/null |
      jq -r '.[] | "\(.metric.adapter) \(.metric.tenant) \(.metric.status) \(.value[1])"' \
        2>/dev/null | sort || true)"
    [ "$up" = 1 ] && [ "$got" = "$want" ] && break
    sleep 1
  done
  [ "$up" = 1 ] || fail "Prometheus: up{job=\"loraserve\"} is '$up' after 60 s, expected 1; targets: $(curl -sS "$PROM/api/v1/targets" 2>&1 | head -c 1500)"
  [ "$got" = "$want" ] ||
    fail "Prometheus: loraserve_requests_total is
$got
expected (adapter tenant status count)
$want"
  echo "Prometheus sees the target up and loraserve_requests_total:"
  while read -r line; do echo "  $line"; done <<<"$got"
  health="$(curl -sS --max-time 10 "$PROM/api/v1/targets" |
    jq -r '.data.activeTargets[] | select(.labels.job == "loraserve") | "\(.health) \(.lastError)"')"
  [ "$health" = "up " ] || fail "Prometheus: the loraserve target reports '$health'"

  # Traffic while Prometheus watches: the per-adapter request rate over the
  # HTTP API's PromQL, and the protocol gauges as the endpoint picker reads them.
  # (On series Prometheus has seen already: rate() does not count the first
  # sample of a new series as an increase.)
  for _ in 1 2 3; do
    complete "$ALPHA" ocean 200
    complete "$ALPHA" robot 200
  done
  rates=""
  for _ in $(seq 15); do
    rates="$(query 'sum by (adapter) (rate(loraserve_requests_total{job="loraserve",status="200"}[20s])) > 0' 2>/dev/null |
      jq -r '[.[].metric.adapter] | sort | join(" ")' 2>/dev/null || true)"
    [ "$rates" = "ocean robot" ] && break
    sleep 1
  done
  [ "$rates" = "ocean robot" ] ||
    fail "Prometheus: per-adapter rate(loraserve_requests_total) > 0 lists '$rates', expected 'ocean robot'; the query answered: $(curl -sS --max-time 10 -G --data-urlencode 'query=sum by (adapter) (rate(loraserve_requests_total{job="loraserve",status="200"}[20s])) > 0' "$PROM/api/v1/query" 2>&1 | head -c 2000)"
  echo "Prometheus: adapters with a request rate > 0: $rates"
  protocol="$(query '{__name__=~"vllm:num_requests_waiting|vllm:num_requests_running|vllm:kv_cache_usage_perc|vllm:lora_requests_info",job="loraserve"}' |
    jq -r '[.[] | .metric.__name__] | sort | join(" ")')"
  [ "$protocol" = "vllm:kv_cache_usage_perc vllm:lora_requests_info vllm:num_requests_running vllm:num_requests_waiting" ] ||
    fail "Prometheus: the protocol gauges are '$protocol'"
  max_lora="$(query 'vllm:lora_requests_info{job="loraserve"}' | jq -r '.[0].metric.max_lora')"
  echo "Prometheus: protocol gauges $protocol (max_lora $max_lora)"
else
  skipped+=("prometheus is not installed (Debian package prometheus)")
fi

for reason in "${skipped[@]}"; do echo "SKIP: $reason"; done
echo "PASS: prometheus_scrape_test"
