#!/usr/bin/env bash
# One command for a machine with a GPU that has torch (but maybe no Ray, MLflow or network): installs what is
# missing from wheels carried in ./.whl, runs the CUDA tests, then the GPU benchmarks, and writes everything to
# $OUT (default ./gpu-results). Nothing here needs Ray or MLflow: training runs in-process.
#
#   bash bench/gpu_suite.sh            # on the GPU machine (about 6 minutes on one H200)
#   GPU_SUITE_DRY=1 bash bench/gpu_suite.sh   # tiny sizes on the CPU: checks the script itself
#
# Rows: CUDA tests; ResNet-50 256x128 bf16 channels-last training in memory (pure compute), end to end through
# the JPEG files (decoded per read in the loader workers), and end to end through the decoded cache, both augmented on the device (ours/plain = that vs in
# memory); loader capacity per core, JPEG vs cache; DCGAN 128x128; Market-1501-scale evaluation (3,368 x 15,913) on the GPU; one epoch of the
# `paper` preset (ResNet-50, 224x224 paper crops, bf16) on a Market-scale synthetic dataset (751 training ids).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.txt"
PY="${PYTHON:-python3}"
DRY="${GPU_SUITE_DRY:-0}"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels, e.g. PyYAML (no network there); pytest is
  rm -rf /tmp/site                                     # usually installed: do not carry one (its plugins clash)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  DEV=cpu; AMP=""; R50_BATCH=8; STEPS=2; WARM=1; REP=1; IDS=8; GAN="--gan-size 32 16 --gan-width 16 --gan-batch 8"
  EVAL="--queries 300 --gallery 1500"; MARKET_IDS=12; PAPER_SET="--set reid.image_size=[64,64] --set reid.batch_size=8"
  R50_SIZE="64 32"; LOADERS=0
else
  DEV=cuda; AMP="--amp --channels-last"; R50_BATCH=128; STEPS=50; WARM=10; REP=5; IDS=200
  GAN="--gan-size 128 128 --gan-width 64 --gan-batch 64"; EVAL=""; MARKET_IDS=751; PAPER_SET=""
  R50_SIZE="256 128"; LOADERS=8
fi

step() {  # step NAME CMD...: run, time, keep the output, never stop the suite
  echo "=== $1 ($(date +%T))" | tee -a "$LOG"
  shift
  local t0=$SECONDS
  "$@" 2>&1 | grep -v -i "warning" | tee -a "$LOG"
  echo "--- rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$LOG"
}

: > "$LOG"
step "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; \
  $PY -c 'import torch, torchvision, sys; print(sys.version.split()[0], \"torch\", torch.__version__, \
  \"torchvision\", torchvision.__version__, \"cuda\", torch.cuda.is_available()); import os; print(os.cpu_count(), \"CPUs\")'"
if "$PY" -c "import pytest" 2>/dev/null; then
  step "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_evaluation.py tests/test_models.py \
    tests/test_labels.py tests/test_augment.py
fi
step "ResNet-50 ${R50_SIZE} bf16, in memory" "$PY" -m bench.train --what reid --backbone resnet50 --size $R50_SIZE \
  --batch $R50_BATCH --device $DEV $AMP --data synthetic --steps $STEPS --warmup $WARM --repeats $REP
step "ResNet-50 ${R50_SIZE} bf16, JPEG files decoded per read + device augmentation (${LOADERS} workers)" "$PY" -m bench.train --what reid \
  --backbone resnet50 --size $R50_SIZE --batch $R50_BATCH --device $DEV $AMP --data images --ids $IDS \
  --loader-workers $LOADERS --steps $STEPS --warmup $WARM --repeats $REP
step "ResNet-50 ${R50_SIZE} bf16, decoded cache + device augmentation (${LOADERS} workers) vs in memory" "$PY" -m bench.train \
  --what reid --backbone resnet50 --size $R50_SIZE --batch $R50_BATCH --device $DEV $AMP --data cache --plain-in-memory \
  --ids $IDS --loader-workers $LOADERS --steps $STEPS --warmup $WARM --repeats $REP
step "loader capacity, ${R50_SIZE}: JPEG vs decoded cache" "$PY" -m bench.data --size $R50_SIZE --workers 0 \
  --batch $R50_BATCH --batches $STEPS --repeats $REP --device $DEV --train-rate 5000
step "DCGAN" "$PY" -m bench.train --what gan $GAN --device $DEV --steps $STEPS --warmup $WARM --repeats $REP
step "Market-scale evaluation, CPU path" "$PY" -m bench.evaluation $EVAL --repeats 3
step "Market-scale evaluation on $DEV (distances + ranking)" "$PY" - "$DEV" "$DRY" <<'PYEOF'
import sys, time
import numpy as np, torch
from trainables.evaluation.distance import compute_distance
from trainables.evaluation.ranking import evaluate
dev, dry = sys.argv[1], sys.argv[2] == "1"
nq, ng, d = (300, 1500, 256) if dry else (3368, 15913, 2048)
rng = np.random.default_rng(0)
centers = rng.standard_normal((750, d)).astype(np.float32)
qp, gp = rng.integers(1, 751, nq), rng.integers(1, 751, ng)
qc, gc = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
qf = torch.from_numpy(centers[qp - 1] + 0.8 * rng.standard_normal((nq, d)).astype(np.float32)).to(dev)
gf = torch.from_numpy(centers[gp - 1] + 0.8 * rng.standard_normal((ng, d)).astype(np.float32)).to(dev)
for rep in range(3):
    if dev == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    dist = compute_distance(qf, gf, metric="cosine")
    res = evaluate(dist, qp, gp, qc, gc, max_rank=50)
    if dev == "cuda": torch.cuda.synchronize()
    print(f"{nq} x {ng} x {d} on {dev}: {time.perf_counter() - t0:.3f} s  rank-1 {res.cmc[0]:.4f} mAP {res.mAP:.4f}")
PYEOF
DATA="$OUT/market-synthetic"
step "Market-scale synthetic dataset" "$PY" -m datasets.synthetic --out "$DATA" --ids $MARKET_IDS \
  --images-per-id 17 --distractors $((MARKET_IDS * 4)) --junk $((MARKET_IDS * 5)) --workers 16
step "paper preset, 1 epoch" "$PY" -m orchestrator.train reid --preset paper --set dataset.name=synthetic \
  --set dataset.root="$DATA" --set reid.pretrained=random --set reid.epochs=1 --set reid.lr_step_epoch=null --set reid.num_workers=0 \
  --set reid.use_gpu=$([ "$DEV" = cuda ] && echo true || echo false) --set reid.loader_workers=$LOADERS \
  $PAPER_SET --label-method baseline --out "$OUT/paper-run"
rm -rf "$DATA" "$OUT/paper-run"  # keep $OUT small: only the log comes back
echo "suite done in ${SECONDS} s; log: $LOG"
