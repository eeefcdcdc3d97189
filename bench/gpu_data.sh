#!/usr/bin/env bash
# The JPEG data path on a GPU machine, in one go (about 6 minutes on one H200 with 16 cores), from
# the repo root:
#
#     bash bench/gpu_data.sh PHOTOS_DIR [OUTDIR]     # default OUTDIR bench/results/gpu-data
#
# PHOTOS_DIR: an ImageNet-shaped JPEG folder (python bench/imagenet_like.py PHOTOS_DIR --images 1000
# on a machine with scikit-image; about 57 MB, small enough to carry to a machine without network).
# 1. selfsup-shards keeps the JPEG bytes; the folder is written COPIES times under new keys, so
#    that an epoch is long enough to time (decoding costs the same for a repeated file);
# 2. bench/data.py --json: CPU core-ms per image and img/s of lightly's pipeline, selfsup's CPU
#    path and the GPU-decode path, and the cores each needs to feed ResNet-50 / ResNet-18;
# 3. the synthetic-input rate of the same training module (bench/gpu.py, ResNet-50 SimCLR,
#    channels_last, eager) and end-to-end selfsup-train from the JPEG shards with data.decode=cpu
#    and data.decode=device: the img/s of the last log windows against the synthetic rate (goal
#    >= 90 %).
# Each step has its own time limit. Scale down for a smoke test on a CPU: STEPS=4 BATCH=8
# WORKERS=2 COPIES=1 MODEL=resnet18 SIZE=64.
set -u
photos=${1:?usage: bash bench/gpu_data.sh PHOTOS_DIR [OUTDIR]}
out=${2:-bench/results/gpu-data}
steps=${STEPS:-120} batch=${BATCH:-256} workers=${WORKERS:-16} copies=${COPIES:-8}
model=${MODEL:-resnet50} size=${SIZE:-224}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=ssl:eval${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

nvidia-smi --query-gpu=name,driver_version --format=csv 2>/dev/null | tee "$out/device.txt"
$py -c "import os, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cpus', os.cpu_count())" | tee -a "$out/device.txt"

echo "== 1. shards (original JPEG bytes, $copies copies of $photos)"
for c in $(seq 1 "$copies"); do ln -s "$(realpath "$photos")" "$work/copy$c"; done
mkdir -p "$work/folder/all"
find -L "$work"/copy* -name '*.jpg' | awk '{printf "%s %s/folder/all/%06d.jpg\n", $0, w, NR}' w="$work" |
    while read -r src dst; do ln -s "$src" "$dst"; done
timeout 300 $py -m selfsup.shard_writer "$work/folder" "$work/shards" --split train --shard-size 1000 \
    2>&1 | tail -1 | tee "$out/shards.log"

echo "== 2. bench/data.py"
timeout 400 $py bench/data.py --shards "$work/shards/train.json" --size "$size" \
    --images $((copies * 500)) --workers "$workers" --json > "$out/data.json" 2> "$out/data.log"
tail -c 1500 "$out/data.json"

echo "== 3. synthetic rate, then end to end from the JPEG shards"
timeout 200 $py bench/gpu.py --cases "simclr-$model" --variants eager --out "$out/synthetic.jsonl" \
    2>&1 | tail -3
for decode in cpu device; do
    timeout 400 $py -m selfsup.cli recipes/simclr.yaml "data.train=$work/shards/train.json" \
        "model.name=$model" model.channels_last=true "augment.size=$size" "train.batch_size=$batch" \
        "train.max_steps=$steps" "data.num_workers=$workers" "data.decode=$decode" \
        train.log_every=10 checkpoint.every_steps=0 "run.dir=$work/run-$decode" 2>&1 | tail -2
    cp "$work/run-$decode/metrics.jsonl" "$out/train-$decode.jsonl" 2>/dev/null
    $py - "$out/train-$decode.jsonl" "$decode" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
late = rows[len(rows) // 2:]  # past start-up and the first epoch's worker spin-up
ips = sum(r["img_per_s"] for r in late) / len(late)
wait = sum(r["data_wait"] for r in late) / len(late)
print(f"decode={sys.argv[2]}: {ips:.0f} img/s end to end, data wait {wait:.0%}, corrupt {rows[-1]['corrupt_samples']}")
EOF
done
