#!/usr/bin/env bash
# Docker entrypoint: `train`, `eval`, `shards`, or any other command passed through.
#
#   docker run --gpus all --ipc=host -v /data:/data selfsup train recipes/dcl.yaml data.train=/data/shards/train.json
#   docker run -v /data:/data selfsup eval knn runs/x --train ... --val ...
#   docker run -it selfsup bash
#
# `train` runs launch/torchrun.sh: one trainer per visible GPU (NPROC_PER_NODE to override; the
# NNODES/MASTER_ADDR/... variables of that script make it multi-node). `exec` replaces this shell
# so that signals reach the launcher directly: `docker stop` sends SIGTERM, the trainers write a
# checkpoint and the container exits 75 (give them time: `docker stop -t 300`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
sub=${1:-help}
[ $# -eq 0 ] || shift
case "$sub" in
  train) exec "$here/torchrun.sh" "$@" ;;
  eval) exec selfsup-eval "$@" ;;
  shards) exec selfsup-shards "$@" ;;
  help | --help | -h)
    cat <<'USAGE'
usage: train RECIPE [RECIPE...] [key=value...]   pretrain (selfsup-train under torchrun, all GPUs)
       eval (knn|linear|all) CHECKPOINT... ARGS  selfsup-eval
       shards SOURCE OUT_DIR --split NAME ...    selfsup-shards
       COMMAND [ARGS...]                         any other command, e.g. bash
USAGE
    ;;
  *) exec "$sub" "$@" ;;
esac
