#!/usr/bin/env bash
# A container image, built for real and run from its own filesystem:
# scripts/build_image.sh FLAVOR (cpu: buildah on a debootstrapped Debian 12
# base; cuda: on NVIDIA's CUDA images, skipped with exit 77 where they cannot
# be had), then scripts/run_image.sh (the image's entrypoint, user and environment in a
# chroot of the mounted image, as PID 1 of its own PID namespace). Checks:
#   - the runtime stage: a non-root numeric user, tini as the entrypoint, a
#     health check on /health, no compiler, every shared library found;
#   - flags from the environment (FLAGS_*), the model and the adapters as
#     read-only volumes, API keys from a mounted file (a Secret in Kubernetes);
#   - a completion with an adapter resolved from /adapters gives the host
#     build's text; a tenant's upload lands in the upload volume and serves;
#   - the image's own HEALTHCHECK command passes;
#   - SIGTERM reaches the server through tini: streams in flight finish with
#     [DONE], the server drains and exits 0.
# The server runs on the CPU backend in both (the CUDA build keeps it; this
# machine has no GPU). Usage: image_test.sh cpu|cuda LORASERVE_BINARY SHARED_DIR
# (the host build, for its text)
set -euo pipefail
if [ "$#" -ne 3 ]; then
  echo "usage: $0 cpu|cuda LORASERVE_BINARY SHARED_DIR" >&2
  exit 2
fi
FLAVOR="$1"
BIN="$2"
SHARED="$(realpath "$3")"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
IMAGE="loraserve:$FLAVOR"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
for tool in buildah debootstrap unshare curl jq python3; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is not installed (scripts/install_deps.sh)" >&2; exit 1; }
done

tmp="$(mktemp -d)"
run_pid=""
cleanup() {
  if [ -n "$run_pid" ]; then kill -TERM "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  [ -f "$tmp/server.log" ] && { echo "--- last lines of the server's log" >&2; tail -n 20 "$tmp/server.log" >&2; }
  exit 1
}

echo "== deploy/docker/flags_from_env names every serve flag (help text not marked generate: or gateway:)"
# --help exits 1 (Abseil's way): its text is kept, its status not.
help_text="$("$BIN" --help 2>&1 || true)"
python3 -c '
import re, sys
flags = re.findall(r"^    --(\w+) \((.*?)\); *\n?\s*default:", sys.stdin.read(), re.S | re.M)
serve = {name for name, text in flags if not re.match(r"(generate|gateway):", " ".join(text.split()))}
listed = set(open(sys.argv[1]).read().split("--tryfromenv=")[1].strip().split(","))
if not flags or serve != listed:
    sys.exit(f"flags_from_env: missing {sorted(serve - listed)}, not serve flags {sorted(listed - serve)}")
' "$REPO/deploy/docker/flags_from_env" <<<"$help_text" || fail "deploy/docker/flags_from_env is out of date"

echo "== build: scripts/build_image.sh $FLAVOR"
start=$(date +%s)
build_status=0
CACHE_DIR="$(dirname "$(dirname "$BIN")")/deploy-cache" \
  "$REPO/scripts/build_image.sh" "$FLAVOR" "$IMAGE" >"$tmp/build.log" 2>&1 || build_status=$?
if [ "$build_status" = 77 ]; then
  cat "$tmp/build.log" >&2
  exit 77
fi
[ "$build_status" = 0 ] || { tail -n 40 "$tmp/build.log" >&2; fail "the image did not build"; }
echo "built in $(($(date +%s) - start)) s"

echo "== the runtime stage"
config="$($SUDO buildah inspect --type image "$IMAGE" | jq '.Docker.config')"
jq -e '.User == "10001:10001"' <<<"$config" >/dev/null || fail "user is not 10001:10001: $(jq .User <<<"$config")"
jq -e '.Entrypoint[0] == "/usr/bin/tini"' <<<"$config" >/dev/null || fail "tini is not the entrypoint"
jq -e '.Healthcheck.Test | join(" ") | contains("/health")' <<<"$config" >/dev/null || fail "no health check on /health"
container="$($SUDO buildah from --pull-never --quiet "$IMAGE")"
root="$($SUDO buildah mount "$container")"
missing="$($SUDO chroot "$root" ldd /usr/local/bin/loraserve | grep 'not found' || true)"
compilers="$(ls "$root"/usr/bin/{g++,gcc,c++,cmake,nvcc} 2>/dev/null || true)"
size="$($SUDO du -sm "$root" | cut -f1)"
$SUDO buildah umount "$container" >/dev/null
$SUDO buildah rm "$container" >/dev/null
[ -z "$missing" ] || fail "libraries the binary cannot find in the image: $missing"
[ -z "$compilers" ] || fail "the runtime stage holds build tools: $compilers"
echo "image filesystem: $size MiB"

echo "== run: scripts/run_image.sh with volumes and FLAGS_* from the environment"
ports="$(python3 -c 'import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
read -r HTTP_PORT GRPC_PORT <<<"$ports"
HTTP="http://127.0.0.1:$HTTP_PORT"
printf 'admin-key-000001 ops admin\nacme-key-0000001 acme tenant\n' >"$tmp/api-keys"
ADMIN=admin-key-000001
ACME=acme-key-0000001
"$REPO/scripts/run_image.sh" \
  -v "$SHARED/models/aidreams-260k:/models:ro" \
  -v "$SHARED/adapters/aidreams-260k:/adapters:ro" \
  -v "$tmp/api-keys:/run/secrets/loraserve/api-keys:ro" \
  -e FLAGS_host=127.0.0.1 -e "FLAGS_http_port=$HTTP_PORT" -e "FLAGS_grpc_port=$GRPC_PORT" \
  -e FLAGS_api_keys=/run/secrets/loraserve/api-keys -e FLAGS_drain_seconds=20 \
  "$IMAGE" --device=cpu --threads=1 --kv-cache-bytes=16777216 >"$tmp/server.log" 2>&1 &
run_pid=$!
for _ in $(seq 600); do
  grep -q "HTTP listening on 127.0.0.1:$HTTP_PORT" "$tmp/server.log" && break
  kill -0 "$run_pid" 2>/dev/null || fail "the image's server exited before listening"
  sleep 0.1
done
grep -q "HTTP listening" "$tmp/server.log" || fail "the image's server did not listen within 60 s"
grep -q "serving /models" "$tmp/server.log" || fail "FLAGS_model=/models was not used"
grep -q "API keys: 2" "$tmp/server.log" || fail "FLAGS_api_keys from the environment was not used"
for pid in $(pgrep -f -- '--flagfile=/etc/loraserve/flags_from_env'); do
  case "$(ps -o comm= -p "$pid")" in
    tini | loraserve)
      user="$(ps -o user= -p "$pid")"
      [ "$user" = 10001 ] || fail "$(ps -o comm= -p "$pid") runs as '$user', not 10001"
      ;;
  esac
done

status() { curl -sS -o "$tmp/body" -w '%{http_code}' --max-time 60 "$@"; }
[ "$(status "$HTTP/health")" = 200 ] || fail "/health"
[ "$(status "$HTTP/ready")" = 200 ] || fail "/ready: $(cat "$tmp/body")"
HEALTHCHECK=1 "$REPO/scripts/run_image.sh" -e "FLAGS_http_port=$HTTP_PORT" "$IMAGE" >/dev/null ||
  fail "the image's HEALTHCHECK command failed"

body() {  # MODEL [EXTRA JSON]: a greedy completion's body
  jq -cn --arg m "$1" --argjson extra "${2:-{\}}" \
    '{model: $m, prompt: "Once upon a time", max_tokens: 16, temperature: 0} + $extra'
}
code="$(status -H "Authorization: Bearer $ACME" -H 'Content-Type: application/json' \
  -d "$(body ocean)" "$HTTP/v1/completions")"
[ "$code" = 200 ] || fail "completion with ocean (from /adapters): HTTP $code: $(cat "$tmp/body")"
image_text="$(jq -r '.choices[0].text' "$tmp/body")"
host_text="$("$BIN" generate --model "$SHARED/models/aidreams-260k" \
  --adapter "ocean=$SHARED/adapters/aidreams-260k/ocean" --lora ocean --prompt "Once upon a time" \
  --max_tokens 16 --temperature 0 --threads 1 2>/dev/null)"
[ "$image_text" = "$host_text" ] || fail "the image wrote '$image_text', the host build '$host_text'"
echo "ocean through the image: '$image_text' (the host build's text)"

code="$(status -H "Authorization: Bearer $ACME" -F name=tide \
  -F "adapter_config.json=@$SHARED/adapters/aidreams-260k/robot/adapter_config.json;type=application/json" \
  -F "adapter_model.safetensors=@$SHARED/adapters/aidreams-260k/robot/adapter_model.safetensors;type=application/octet-stream" \
  "$HTTP/v1/adapters")"
[ "$code" = 200 ] || [ "$code" = 201 ] || fail "tenant upload into the upload volume: HTTP $code: $(cat "$tmp/body")"
code="$(status -H "Authorization: Bearer $ACME" -H 'Content-Type: application/json' \
  -d "$(body tide)" "$HTTP/v1/completions")"
[ "$code" = 200 ] || fail "completion with the uploaded adapter: HTTP $code: $(cat "$tmp/body")"

echo "== SIGTERM with streams in flight"
for i in 1 2 3 4; do
  curl -sS -N --max-time 60 -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
    -d "$(body robot '{"stream": true, "max_tokens": 100, "ignore_eos": true, "n": 4}')" \
    "$HTTP/v1/completions" >"$tmp/stream.$i" 2>&1 &
  streams+=($!)
done
for i in 1 2 3 4; do
  for _ in $(seq 100); do [ -s "$tmp/stream.$i" ] && break; sleep 0.05; done
done
kill -TERM "$run_pid"
for pid in "${streams[@]}"; do wait "$pid" || true; done
exit_status=0
wait "$run_pid" || exit_status=$?
run_pid=""
for i in 1 2 3 4; do
  tail -n 3 "$tmp/stream.$i" | grep -q '^data: \[DONE\]' || fail "stream $i did not finish: $(tail -c 300 "$tmp/stream.$i")"
  ! grep -q '^data: {"error"' "$tmp/stream.$i" || fail "stream $i ended in an error: $(grep -m1 '"error"' "$tmp/stream.$i")"
done
[ "$exit_status" = 0 ] || fail "the image's server exited with $exit_status after SIGTERM"
grep -q "signal 15, draining" "$tmp/server.log" || fail "SIGTERM did not reach the server"
grep -q "loraserve: stopped" "$tmp/server.log" || fail "the server did not stop cleanly"
echo "PASS image_test: 4 streams finished, exit 0 after SIGTERM"
