#!/usr/bin/env bash
# Build the selfsup image with docker, or with podman where there is no Docker engine.
#
#   launch/image.sh                       # tag selfsup:latest, base from the Dockerfile
#   IMAGE=registry/me/selfsup:1 launch/image.sh
#   BASE=localhost/bookworm-base launch/image.sh   # podman only: replace the Dockerfile's FROM
#
# Builds behind a mirror or a TLS-intercepting proxy: the caller's PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST and PIP_CERT go in as build arguments.
# With podman, the PIP_CERT bundle and any file:// index or find-links folder are bind-mounted
# read-only into the build so pip inside sees the same files; with docker, make them reachable
# yourself.
# CONTAINER=docker|podman picks the tool; EXTRA_BUILD_ARGS adds options.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-selfsup:latest}
tool=${CONTAINER:-}
if [ -z "$tool" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then tool=docker
  elif command -v podman >/dev/null 2>&1; then tool=podman
  else echo "launch/image.sh: error: neither a working docker nor podman found" >&2; exit 2
  fi
fi

args=(build -t "$image" -f "$root/Dockerfile")
global=()
if [ "$tool" = podman ]; then
  # runc and cgroupfs: podman's defaults (crun, systemd cgroups) fail on some hosts, e.g. VMs
  # without systemd; override with PODMAN_GLOBAL_ARGS.
  read -r -a global <<<"${PODMAN_GLOBAL_ARGS:---runtime runc --cgroup-manager=cgroupfs}"
  args+=(--network host)
  [ -z "${BASE:-}" ] || args+=(--from "$BASE")
elif [ -n "${BASE:-}" ]; then
  echo "launch/image.sh: error: BASE needs podman (docker build has no --from)" >&2; exit 2
fi

mounted=""
mount_ro() {  # bind-mount a host path at the same place inside the build (podman), once
  local path=$1
  [ "$tool" = podman ] && [ -e "$path" ] || return 0
  case " $mounted " in *" $path "*) return 0 ;; esac
  mounted="$mounted $path"
  args+=(-v "$path:$path:ro")
}
if [ -n "${PIP_CERT:-}" ]; then
  # not at its own path: the image's ca-certificates package writes /etc/ssl/certs
  if [ "$tool" = podman ]; then
    args+=(-v "$PIP_CERT:/run/selfsup-pip-ca.crt:ro" --build-arg PIP_CERT=/run/selfsup-pip-ca.crt)
  else
    args+=(--build-arg "PIP_CERT=$PIP_CERT")
  fi
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST; do
  value=${!var:-}
  [ -n "$value" ] || continue
  args+=(--build-arg "$var=$value")
  for item in $value; do
    case "$item" in
      file://*) path=${item#file://}; mount_ro "${path%/simple*}" ;;
      /*) mount_ro "$item" ;;
    esac
  done
done
# shellcheck disable=SC2206
args+=(${EXTRA_BUILD_ARGS:-} "$root")

echo "launch/image.sh: $tool ${global[*]} ${args[*]}" >&2
start=$(date +%s)
"$tool" "${global[@]}" "${args[@]}"
echo "launch/image.sh: built $image with $tool in $(( $(date +%s) - start )) s" >&2
