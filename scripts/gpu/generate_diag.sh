#!/usr/bin/env bash
# On the GPU machine: where a decode step's time goes: clocks and other processes, a PyTorch
# GEMV probe, PyTorch eager decode, and bench generate with the per-FFN breakdown.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,utilization.gpu,compute_mode --format=csv
nvidia-smi --query-compute-apps=pid,name,used_memory --format=csv
nproc; lscpu | grep -E "Model name|MHz" | head -3
echo "+ gemv_probe.py"; python3 scripts/gpu/gemv_probe.py
echo "+ torch_decode.py"; python3 scripts/gpu/torch_decode.py --layers 28 --batch 1
echo "+ bench generate"; "$BIN" bench generate --config configs/1.5b.yaml --gen-batch 1 --new-tokens 64 2>&1 | grep -v autocast
