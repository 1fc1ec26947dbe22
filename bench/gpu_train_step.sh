#!/usr/bin/env bash
# bench/train_step.py on a GPU machine, from the repository root: figures to $OUT (train_step.json, train_step.log).
# Extra arguments go to the script, e.g. `bash bench/gpu_train_step.sh --variants a,b --steps 20`.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
out=${OUT:-/tmp/train-step-out}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python bench/train_step.py --json-out "$out/train_step.json" "$@"
} 2>&1 | tee "$out/train_step.log"
