#!/usr/bin/env bash
# Multi-node (or single-node) training without SLURM: run this on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/torchrun.sh recipes/dcl.yaml run.dir=/shared/runs/x
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/torchrun.sh recipes/dcl.yaml run.dir=/shared/runs/x
#
# With NNODES=1 (the default) it is a plain single-node launch. run.dir must be on a file system
# every node sees. Exit code 75 means "preempted, checkpoint written: start me again".
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 1)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}
if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC_PER_NODE" -m selfsup.cli "$@")
if [ -n "${SELFSUP_DRY_RUN:-}" ]; then
  echo "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
