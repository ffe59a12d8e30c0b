#!/usr/bin/env bash
# On the GPU machine: the dense trainer at the 1.5b shape (MFU, peak memory) and the trainer
# under `mpirun -n 1` (NCCL path), with the binary carried in $1/bin.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
BIN="$PWD/$CARRY/bin/sparse-train"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN" --config configs/1.5b.yaml --quiet --synthetic-data --max-steps 16 \
  --set train.batch_size=16 --set train.log_every=4 --set sparsity.ffn_path=dense \
  --out-dir "$OUT/run-1.5b" 2>&1 | tee "$OUT/1.5b.log" | grep -E "^(model|step)|rror"
mpirun --allow-run-as-root -n 1 -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE "$BIN" \
  --config configs/125m.yaml --quiet --synthetic-data --max-steps 20 --set train.log_every=10 \
  --set checkpoint.every=0 --out-dir "$OUT/run-mpi1" 2>&1 | tee "$OUT/mpi1.log" | grep -E "^(model|step)|rror|rank"
