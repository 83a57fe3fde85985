#!/usr/bin/env bash
# run_image.sh [-v HOST_PATH:PATH[:ro]]... [-e NAME=VALUE]... IMAGE [ARGS...]:
# runs IMAGE's entrypoint as `docker run` would (its user, environment and
# working directory; ARGS replace its CMD), but in a chroot of the image's own
# filesystem (buildah from + buildah mount) inside a private mount namespace,
# on the host's network: for machines where no container engine runs (this
# sandbox refuses `podman run`). -v bind-mounts a volume, -e adds to the
# image's environment. SIGTERM and SIGINT go to the entrypoint (tini, which
# passes them to the server), and its exit status is this script's.
#   HEALTHCHECK=1 run_image.sh ... IMAGE: runs the image's health check
#   command instead, in the same environment, and exits with its status.
set -euo pipefail
volumes=()
extra_env=()
while getopts "v:e:" opt; do
  case "$opt" in
    v) volumes+=("$OPTARG") ;;
    e) extra_env+=("$OPTARG") ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "$#" -ge 1 ] || { echo "usage: $0 [-v HOST:PATH[:ro]]... [-e NAME=VALUE]... IMAGE [ARGS...]" >&2; exit 2; }
image="$1"
shift
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

config="$($SUDO buildah inspect --type image "$image" | jq '.Docker.config')"
user="$(jq -r '.User // ""' <<<"$config")"
[ -n "$user" ] || user=0:0
case "$user" in *:*) ;; *) user="$user:$user" ;; esac
workdir="$(jq -r '.WorkingDir // "" | if . == "" then "/" else . end' <<<"$config")"
mapfile -t environment < <(jq -r '.Env // [] | .[]' <<<"$config")
environment+=("${extra_env[@]}")
if [ "${HEALTHCHECK:-0}" = 1 ]; then
  mapfile -t argv < <(jq -r '.Healthcheck.Test | if .[0] == "CMD-SHELL" then ["/bin/sh", "-c", .[1]] else .[1:] end | .[]' <<<"$config")
else
  mapfile -t argv < <(jq -r '.Entrypoint // [] | .[]' <<<"$config")
  if [ "$#" -gt 0 ]; then
    argv+=("$@")
  else
    mapfile -t -O "${#argv[@]}" argv < <(jq -r '.Cmd // [] | .[]' <<<"$config")
  fi
fi

container="$($SUDO buildah from --pull-never --quiet "$image")"
cleanup() {
  $SUDO buildah umount "$container" >/dev/null 2>&1 || true
  $SUDO buildah rm "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT
root="$($SUDO buildah mount "$container")"

# In private mount and PID namespaces: /proc, /dev (with its /dev/shm) and the
# volumes, then the chroot as the image's user; each step execs the next, so
# the entrypoint runs as PID 1 of its namespace, as in a container.
inside='
set -euo pipefail
root="$1" user="$2" workdir="$3" nvolumes="$4"
shift 4
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
for ((i = 0; i < nvolumes; i++)); do
  IFS=: read -r host path mode <<<"$1"
  shift
  if [ -d "$host" ]; then
    mkdir -p "$root$path"
  else  # a file (a key file, say): bound onto a file of its own
    mkdir -p "$(dirname "$root$path")"
    touch "$root$path"
  fi
  mount --bind "$host" "$root$path"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$root$path"; fi
done
nenv="$1"
shift
environment=("${@:1:nenv}")
shift "$nenv"
cd "$root$workdir"
exec chroot --userspec="$user" --groups="${user#*:}" "$root" /usr/bin/env -i "${environment[@]}" \
  /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$workdir" "$@"
'
$SUDO unshare --mount --propagation private --pid --fork -- /bin/bash -c "$inside" inside "$root" "$user" "$workdir" \
  "${#volumes[@]}" "${volumes[@]}" "${#environment[@]}" "${environment[@]}" "${argv[@]}" &
child=$!
# The entrypoint is the one child of unshare (which itself passes no signals on).
forward() { pkill --signal "$1" -P "$child" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
status=0
while true; do
  wait "$child" && status=0 || status=$?
  # A trapped signal ends `wait` early (status > 128) while the child runs on.
  kill -0 "$child" 2>/dev/null || break
done
exit "$status"
