#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one go (under 10 minutes on one H100/H200), from the repo
# root, with the Fashion-MNIST shards of `make shards` in data/fashion-mnist:
#
#     bash bench/gpu_all.sh [OUTDIR]        # default bench/results/gpu
#
# 1. bench/gpu.py: img/s and MFU of the SimCLR (ResNet-18/50) and I-JEPA (ViT-S/16) steps in bf16,
#    eager with and without channels_last, then one Fashion-MNIST epoch with the demo recipe;
# 2. selfsup-eval on that epoch's export (GPU feature extraction and k-NN);
# 3. bench/gpu.py again: the torch.compile variants (compilation takes minutes, so they come last);
# 4. bench/train_step.py: selfsup's step vs lightly's example loop on the GPU;
# 5. bench/knn.py --device cuda: the k-NN sweep against scikit-learn.
# Each step has its own time limit, so one that hangs costs only its share.
set -u
out=${1:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=ssl:eval${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
data=data/fashion-mnist

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/device.txt"

echo "== 1. step throughput and MFU (eager), one Fashion-MNIST epoch"
timeout 170 $py bench/gpu.py --variants eager --out "$out/gpu.jsonl" --fmnist "$data" \
    --fmnist-batch 1024 256 2>&1 | tee "$out/gpu.log"

echo "== 2. selfsup-eval on the epoch's export (demo recipe, batch 256)"
s=$SECONDS
timeout 80 $py -m selfsup_eval all --baseline raw-pixels runs/gpu-fmnist-epoch/export/backbone.safetensors \
    --train "$data/train.json" --val "$data/test.json" --k 20 200 --out runs/gpu-eval 2>&1 | tee "$out/eval.log"
echo "eval wall $((SECONDS - s)) s" | tee -a "$out/eval.log"
cp runs/gpu-eval/results.json "$out/eval_results.json"

echo "== 3. torch.compile variants"
timeout 150 $py bench/gpu.py --variants compile --out "$out/gpu.jsonl" 2>&1 | tee -a "$out/gpu.log"

echo "== 4. selfsup step vs lightly's loop"
for args in "--model resnet50 --size 224 --batch 128" "--model resnet18 --size 32 --batch 256"; do
    timeout 45 $py bench/train_step.py $args --iters 10 --warmup 3 --rounds 2 2>&1 | tee -a "$out/train_step.log"
done

echo "== 5. k-NN on the GPU vs scikit-learn"
timeout 60 $py bench/knn.py --device cuda --repeat 1 2>&1 | tee "$out/knn.log"
