#!/usr/bin/env bash
# Docker entrypoint: `train`, `eval`, `shards`, or any other command passed through.
#   docker run --gpus all --ipc=host -v /data:/data selfsup train recipes/dcl.yaml data.train=/data/shards/train.json
# `train` uses every visible GPU (one process each) through torchrun; exec keeps signals
# (SIGTERM from the scheduler) going to the trainer, which checkpoints and exits 75.
set -euo pipefail
sub=${1:-help}
shift || true
case "$sub" in
  train)  exec /workspace/launch/torchrun.sh "$@" ;;
  eval)   exec selfsup-eval "$@" ;;
  shards) exec selfsup-shards "$@" ;;
  help|--help|-h)
    echo "usage: (train RECIPE [key=value...] | eval ARGS | shards ARGS | COMMAND ...)"; exit 0 ;;
  *)      exec "$sub" "$@" ;;
esac
