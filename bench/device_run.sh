#!/usr/bin/env bash
# One call on the lent GPU: install the carried wheels (.whl: this repo's wheel and the few packages
# the device image lacks), then run what the arguments name, writing results under $OUT.
#   bench/device_run.sh bench      train-step throughput / MFU of zoo presets + the transformers peer
#   bench/device_run.sh train      `zoo train` of a hybrid preset on the embedded corpus (bf16 on GPU)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
case "${1:-bench}" in
  bench)
    python3 bench/train_step.py --peer --presets "${PRESETS:-gqa-125m,gqa-350m,mamba2-hybrid-125m,mamba2-hybrid-350m,gdn-h1-125m}" \
      --batch "${BATCH:-16}" --seq-len "${SEQ_LEN:-2048}" --steps 10 --out "$OUT/train_step.jsonl" 2>&1 | tee "$OUT/bench.log" ;;
  train)
    # From /tmp: in the repository root the source folder zoo/ would shadow the installed package.
    (cd /tmp && python3 -m zoo.cli train --preset "${PRESET:-mamba2-hybrid-125m}" --steps "${STEPS:-300}" --batch-size 16 --seq-len 1024 \
      --set optim.learning_rate=1e-3 --set eval_every=100 --set checkpoint_every=150 --set log_every=25 \
      --out /tmp/run 2>&1) | tr '\r' '\n' | tee "$OUT/train.log" | grep -v "^training: "
    cp /tmp/run/metrics.jsonl /tmp/run/loss_curve.png "$OUT"/ ;;
esac
