#!/usr/bin/env bash
# Issue 18's GPU table in one go (about 10 minutes on one H200), from the repo root:
#
#     bash bench/gpu_efficiency.sh [OUTDIR]        # default bench/results/gpu-efficiency
#
# bench/gpu.py, bf16, synthetic device-resident images (the step without data loading):
# 1. eager: I-JEPA on ViT-S/16 and ViT-B/16 at two per-GPU batches (128: the recipe's; 256), and
#    SimCLR on ResNet-18/50 at 256 (the recipe's), each with a profiler breakdown of 10 steps
#    (forward, augmentation, masks, backward, optimizer, EMA: host and device ms; GPU idle ms);
# 2. the same with model.compile (compilation takes minutes, so it comes second);
# Each step has its own time limit, so one that hangs costs only its share; every record is
# appended to OUTDIR/gpu.jsonl as it is made. On a CPU, to check the script only:
# ALLOW_CPU=1 BATCHES="4 8" TINY=1 bash bench/gpu_efficiency.sh /tmp/check
set -u
out=${1:-bench/results/gpu-efficiency}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=ssl:eval${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
batches=${BATCHES:-128 256}
extra=()
if [ -n "${ALLOW_CPU:-}" ]; then extra+=(--allow-cpu --iters 2 --warmup 1); fi
vit=() cnn=()
if [ -n "${TINY:-}" ]; then  # a few-second model for a CPU check of the script
    vit=(--override model.kwargs.img_size=32 model.kwargs.patch_size=4 model.kwargs.embed_dim=64
         model.kwargs.depth=2 model.kwargs.num_heads=2 augment.size=32 objective.pred_depth=2
         objective.pred_dim=32 objective.min_keep=2)
    cnn=(--override augment.size=32 objective.proj_hidden_dim=64 objective.proj_dim=32)
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$out/device.txt"
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/device.txt"

for variant in eager compile; do
    limit=$([ $variant = eager ] && echo 150 || echo 330)
    echo "== $variant: I-JEPA ViT-S/16 and ViT-B/16, batches $batches"
    timeout $limit $py bench/gpu.py --cases ijepa-vit_small ijepa-vit_base --variants $variant \
        --batch $batches --profile 10 --out "$out/gpu.jsonl" "${extra[@]}" "${vit[@]}" 2>&1 | tee -a "$out/gpu.log"
    echo "== $variant: SimCLR ResNet-18 and ResNet-50, batch 256"
    timeout $((limit / 2)) $py bench/gpu.py --cases simclr-resnet18 simclr-resnet50 --variants $variant \
        --batch ${CNN_BATCH:-256} --profile 10 --out "$out/gpu.jsonl" "${extra[@]}" "${cnn[@]}" 2>&1 | tee -a "$out/gpu.log"
done
echo "records: $out/gpu.jsonl"
