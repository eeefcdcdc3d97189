#!/usr/bin/env bash
# The container check (`make image-check`; not part of `make test`): build the image, train a
# tiny recipe inside it as the image's non-root user with the run directory bind-mounted from
# the host, then evaluate the export on the host with the host's selfsup-eval. It proves that the
# image installs, that its entry point and launcher start a run on a machine without GPUs, that
# a non-root container writes usable files into a host directory, and that the export format is
# the same on both sides.
#
#   launch/image_check.sh                    # docker, or podman when there is no Docker engine
#   BASE=localhost/bookworm-base launch/image_check.sh    # podman with a local Debian base
#   SKIP_BUILD=1 IMAGE=selfsup:latest launch/image_check.sh
#
# Without a registry (e.g. a VM with podman only), make the base from Debian's mirror first:
#   debootstrap --variant=minbase bookworm /tmp/bookworm && tar -C /tmp/bookworm -c . |
#     podman import - localhost/bookworm-base
# Debian bookworm's python3 is 3.11, the Dockerfile's Ubuntu 24.04 base has 3.12.
# Needs the host's .venv (make venv). Prints the image size and the build, train and eval times.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export IMAGE=${IMAGE:-localhost/selfsup:check}
tool=${CONTAINER:-$(command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && echo docker || echo podman)}
export CONTAINER=$tool
venv=${VENV:-$root/.venv}
work=$(mktemp -d "${TMPDIR:-/tmp}/selfsup-image-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
global=()
[ "$tool" != podman ] || read -r -a global <<<"${PODMAN_GLOBAL_ARGS:---runtime runc --cgroup-manager=cgroupfs}"

t0=$(date +%s)
[ -n "${SKIP_BUILD:-}" ] || "$root/launch/image.sh"
t1=$(date +%s)

# tiny labelled data, written on the host by the host's selfsup-shards
"$venv/bin/python" - "$work" <<'PY'
import sys
import numpy as np
out = sys.argv[1]
rng = np.random.default_rng(0)
for split, n in (("train", 64), ("val", 32)):
    labels = np.arange(n) % 4
    images = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
    for i, c in enumerate(labels):  # one bright channel per class: something to learn
        images[i, 4:12, 4:12, c % 3] = 200 + 15 * (c // 3)
    np.savez(f"{out}/{split}.npz", images=images, labels=labels,
             class_names=np.array([f"class{c}" for c in range(4)]))
PY
for split in train val; do
  SELFSUP_PROGRESS=off "$venv/bin/selfsup-shards" "$work/$split.npz" "$work/shards" --split "$split" >/dev/null
done
mkdir -p "$work/run"
# the image runs as uid 1000: the bind-mounted run directory must be writable for it
if [ "$(id -u)" = 0 ]; then chown 1000:1000 "$work/run"; else chmod 777 "$work/run"; fi

run_args=(run --rm --ulimit nofile=4096:4096 --ulimit nproc=4096:4096
          -v "$work/shards:/data:ro" -v "$work/run:/workspace/runs/check")
"$tool" "${global[@]}" "${run_args[@]}" "$IMAGE" \
  train recipes/tiny.yaml data.train=/data/train.json run.dir=runs/check train.max_steps=4
t2=$(date +%s)

owner=$(stat -c %u "$work/run/export/backbone.safetensors")
[ "$owner" = 1000 ] || { echo "image_check: export owned by uid $owner, not 1000" >&2; exit 1; }
"$venv/bin/selfsup-eval" knn "$work/run/export/backbone.safetensors" --train "$work/shards/train.json" \
  --val "$work/shards/val.json" --k 5 --no-cache --out "$work/eval"
t3=$(date +%s)
"$venv/bin/python" - "$work/eval/results.json" <<'PY'
import json, sys
record = json.load(open(sys.argv[1]))[0]
assert record["step"] == 4 and record["val_samples"] == 32, record
print(f"image_check: export of step {record['step']} evaluated on the host: k-NN@5 {record['knn']['k=5']}")
PY
size=$("$tool" "${global[@]}" image inspect "$IMAGE" --format '{{.Size}}')
echo "image_check: OK  image $IMAGE $((size / 1000000)) MB; build $((t1 - t0)) s, train in the" \
     "container $((t2 - t1)) s, eval on the host $((t3 - t2)) s"
