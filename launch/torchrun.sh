#!/usr/bin/env bash
# Training on one node or several without SLURM: run the same line on every node.
#
#   NNODES=2 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/torchrun.sh recipes/dcl.yaml run.dir=/shared/runs/x
#
# Environment (all optional on a single node):
#   NNODES          nodes in the job (1: `torchrun --standalone`, nothing else needed)
#   MASTER_ADDR     a node every node can reach; with the default c10d rendezvous it hosts the
#                   rendezvous store (run this script there too), with `static` it is rank 0
#   MASTER_PORT     rendezvous port (29500)
#   NODE_RANK       0..NNODES-1; only used by RDZV_BACKEND=static. c10d assigns node ranks itself,
#                   so nodes can start in any order and none needs to know its rank
#   RDZV_BACKEND    c10d (default) or static
#   RDZV_ID         job id shared by the nodes of one job (SLURM_JOB_ID, else "selfsup")
#   NPROC_PER_NODE  processes per node (default: one per GPU in CUDA_VISIBLE_DEVICES if set, else
#                   per GPU nvidia-smi lists, else 1)
#   SHUTDOWN_TIMEOUT seconds torchrun lets the trainers finish their checkpoint after a stop
#                   signal before it kills them (600; torchrun's own default, 30, is too short
#                   for a large model's checkpoint on a shared file system)
#   PYTHON          interpreter (python)
#   SELFSUP_DRY_RUN=1  print the torchrun command instead of running it
#
# Stopping: SIGTERM or SIGUSR1 to this script goes to torchrun, which passes it on to every
# trainer; the trainers finish their step, write a checkpoint and exit 75. This script then exits
# 75 too ("checkpoint written, run the same command again"), which torchrun itself cannot report:
# it turns any failed worker into exit 1. Why not `exec torchrun`: the exit code, and torchrun
# kills the workers 30 s after a signal unless told otherwise (--shutdown_timeout).
# run.dir must be on a file system every node sees.
set -euo pipefail

REQUEUE_EXIT=75 # selfsup.trainer.REQUEUE_EXIT_CODE
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-selfsup}}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}
PYTHON=${PYTHON:-python}
if [ -z "${NPROC_PER_NODE:-}" ]; then # one trainer per GPU this node lets us use
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then # set by SLURM/the user: nvidia-smi would list all
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    NPROC_PER_NODE=${#visible[@]}
  else
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1 # CPU: one process (set it for more)
fi

if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
elif [ "$RDZV_BACKEND" = static ]; then
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  rdzv=(--nnodes "$NNODES" --rdzv_backend "$RDZV_BACKEND" --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"
        --rdzv_id "$RDZV_ID")
fi
cmd=("$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC_PER_NODE"
     --signals_to_handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown_timeout "$SHUTDOWN_TIMEOUT"
     -m selfsup.cli "$@")
if [ -n "${SELFSUP_DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

stop=0
child=
trapped=0
forward() { # $1: signal name; torchrun relays it to every trainer of this node
  stop=1
  trapped=1
  [ -z "$child" ] || kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
"${cmd[@]}" &
child=$!
[ "$stop" = 0 ] || kill -s TERM "$child" 2>/dev/null || true # signalled before torchrun started
set +e
while :; do # a trapped signal ends `wait` early: wait again until torchrun has really exited
  trapped=0
  wait "$child"
  status=$?
  [ "$trapped" = 1 ] || break
done
set -e
if [ "$status" != 0 ] && [ "$stop" = 1 ]; then
  echo "selfsup: stopped by a signal; checkpoint written, exit $REQUEUE_EXIT (run again to resume)" >&2
  exit "$REQUEUE_EXIT"
fi
exit "$status"
