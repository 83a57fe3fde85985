#!/usr/bin/env bash
# End-to-end test of the LoRA info gauge that the Gateway API Inference
# Extension's endpoint picker routes by (vllm:lora_requests_info): with one
# request running at a time (--max-running-requests 1), six closed-loop
# clients (two per adapter on three adapters) stream 100-token completions
# for 3 s while /metrics is scraped every 20 ms. Every scrape must list only adapters of requests in flight,
# at most one running; some scrape must list all three (one running, two
# waiting); within 2 s of the last answer the lists are empty; and max_lora is 1
# (one request at a time holds one adapter).
#
# Needs curl, jq and python3. Usage: lora_info_test.sh LORASERVE_BINARY SHARED_DIR
set -euo pipefail

# shellcheck source=tests/e2e/http_test_lib.sh
source "$(dirname "$0")/http_test_lib.sh"

cat >"$tmp/keys" <<'EOF2'
alpha-key-000001 alpha admin
EOF2

start_server lora_info --max-running-requests 1

echo "== six clients streaming on ocean, robot and qv-r4 for 3 s, scraped every 20 ms"
python3 - "$HTTP" alpha-key-000001 <<'EOF2' || fail "the LoRA info checks above failed"
import json, re, sys, threading, time, urllib.request

base, key = sys.argv[1], sys.argv[2]
adapters = ["ocean", "robot", "qv-r4"]
info_re = re.compile(r'^vllm:lora_requests_info\{(.*)\} (\S+)$', re.M)
label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

def scrape():
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    series = info_re.findall(text)
    assert len(series) == 1, f"expected one vllm:lora_requests_info series, got {series}"
    labels = dict(label_re.findall(series[0][0]))
    split = lambda v: set(filter(None, v.split(",")))
    return split(labels["running_lora_adapters"]), split(labels["waiting_lora_adapters"]), labels["max_lora"]

statuses = {}
def complete(adapter):
    body = json.dumps({"model": adapter, "prompt": "Once upon a time", "max_tokens": 100,
                       "temperature": 0, "ignore_eos": True, "stream": True}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body, headers={
        "Authorization": "Bearer " + key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
        statuses.setdefault(adapter, set()).add(response.status)

errors = []
deadline = time.time() + 3
def client(adapter):
    while time.time() < deadline:
        complete(adapter)

threads = [threading.Thread(target=client, args=(a,)) for a in adapters for _ in range(2)]
for t in threads:
    t.start()
observed = []
while any(t.is_alive() for t in threads):
    running, waiting, max_lora = scrape()
    observed.append((running, waiting))
    if not (running | waiting) <= set(adapters):
        errors.append(f"a scrape lists adapters no request named: running {running}, waiting {waiting}")
    if len(running) > 1:
        errors.append(f"{len(running)} adapters running with --max-running-requests 1: {running}")
    if max_lora != "1":
        errors.append(f"max_lora is {max_lora!r}, expected 1")
    time.sleep(0.02)
for t in threads:
    t.join()
if statuses != {a: {200} for a in adapters}:
    errors.append(f"completions answered {statuses}")
full = [o for o in observed if o[0] | o[1] == set(adapters)]
if not full:
    errors.append(f"no scrape listed all three adapters in flight; saw {observed[:20]}")
seen_running = set().union(*(r for r, _ in observed)) if observed else set()
if seen_running != set(adapters):
    errors.append(f"adapters ever seen running: {seen_running}, expected all three")
# The engine publishes its state after the step that ended the last stream.
for _ in range(100):
    running, waiting, _ = scrape()
    if not running and not waiting:
        break
    time.sleep(0.02)
if running or waiting:
    errors.append(f"after the last request the gauge still lists running {running}, waiting {waiting}")
for e in errors:
    print("  " + e, file=sys.stderr)
print(f"{len(observed)} scrapes; {len(full)} listed all three adapters in flight")
sys.exit(1 if errors else 0)
EOF2
echo "PASS: lora_info_test"
