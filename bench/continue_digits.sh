#!/bin/bash
# Continued pretraining at a tiny CPU budget (issue 27's evidence, one seed per call):
# DCL on Fashion-MNIST from a backbone pretrained on scikit-learn's digits vs from random weights,
# both judged by selfsup-eval with the digits backbone as `--baseline init`; then the guard on a
# deliberately far too high lr from the same start. Usage: bench/continue_digits.sh OUT [SEED]
# (Fashion-MNIST from FMNIST_DIR, default /usr/share/datasets/fashion-mnist; BIN: the venv's bin;
# STEPS: steps of each training run, default 100).
set -euo pipefail
OUT=${1:?usage: bench/continue_digits.sh OUT [SEED]}; SEED=${2:-0}
BIN=${BIN:-.venv/bin}; FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p "$OUT"
[ -f "$OUT/digits.npz" ] || "$BIN/python" - "$OUT/digits.npz" <<'PY'
import sys
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits()  # 1797 8x8 digits (0..16), upsampled to Fashion-MNIST's 28 px
imgs = np.stack([np.array(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                 for im in d.images])
np.savez(sys.argv[1], images=imgs, labels=d.target, class_names=np.array([str(i) for i in range(10)]))
PY
[ -f "$OUT/digits/train.json" ] || "$BIN/selfsup-shards" "$OUT/digits.npz" "$OUT/digits" --split train
for split in train test; do
  [ -f "$OUT/fmnist/$split.json" ] || "$BIN/selfsup-shards" "torchvision:FashionMNIST:$FMNIST_DIR" "$OUT/fmnist" --split $split
done
TINY=(train.max_steps=${STEPS:-100} train.batch_size=64 checkpoint.every_steps=0 "log.trackers=[]" run.seed=$SEED)
FM=(recipes/demo_fmnist.yaml data.train=$OUT/fmnist/train.json data.val=$OUT/fmnist/test.json "${TINY[@]}")
START=$OUT/digits-$SEED/export/backbone.safetensors
t() { local t0=$SECONDS rc=0; "$@" || rc=$?; echo "took $((SECONDS - t0)) s: ${*:1:3} ..."; return $rc; }
[ -f "$START" ] || t "$BIN/selfsup-train" recipes/demo_fmnist.yaml data.train=$OUT/digits/train.json data.val=null \
  run.dir=$OUT/digits-$SEED "${TINY[@]}"
t "$BIN/selfsup-train" "${FM[@]}" run.dir=$OUT/from_digits-$SEED model.init=$START
t "$BIN/selfsup-train" "${FM[@]}" run.dir=$OUT/from_random-$SEED
t "$BIN/selfsup-eval" all $OUT/from_digits-$SEED/export/backbone.safetensors $OUT/from_random-$SEED/export/backbone.safetensors \
  --baseline init --train $OUT/fmnist/train.json --val $OUT/fmnist/test.json --k 20 --out $OUT/eval-$SEED \
  --cache-dir $OUT/cache --no-pictures
# the guard: AdamW at 100x the demo's lr, no warm-up; expected exit 3 with the best export kept
rc=0
t "$BIN/selfsup-train" "${FM[@]}" run.dir=$OUT/too_high-$SEED model.init=$START optim.lr=50 optim.warmup_epochs=0 \
  monitor.every_steps=10 monitor.max_samples=1000 monitor.min_vs_init=-5 checkpoint.keep_best=true || rc=$?
echo "guard run exit status: $rc"
