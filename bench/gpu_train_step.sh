#!/usr/bin/env bash
# bench/train_step.py on a GPU machine, from the repository root: figures to $OUT (train_step.json, train_step.log).
# Extra arguments go to the script, e.g.
#   bash bench/gpu_train_step.sh --variants a,b --steps 20                 # vlacl against the baseline
#   bash bench/gpu_train_step.sh --variants b --impls vlacl --compile      # with vlacl train-task --compile beside
#   bash bench/gpu_train_step.sh --variants b --impls none --cl-bench      # ER/MIR/EWC step-time ratios, one GPU
#   bash bench/gpu_train_step.sh --variants a --impls vlacl --ddp 2        # DDP scaling and MIR/EWC under DDP, 2 GPUs
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# NVLink multicast (NVLS) stays off for the DDP runs: plain NCCL ring/tree all-reduce.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
out=${OUT:-/tmp/train-step-out}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
  python bench/train_step.py --json-out "$out/train_step.json" "$@"
} 2>&1 | tee "$out/train_step.log"
