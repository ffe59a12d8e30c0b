#!/usr/bin/env bash
# On the GPU machine, with the binaries in $1/bin: the kernel tests and an FFN bench under each
# kernel image (the sm_90a cubin, the compute_80 PTX = the non-Hopper mma.sync path JIT-compiled
# for this card, and NVRTC from the embedded sources), then generation with SM-clock sampling.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for img in auto compute_80 nvrtc; do
  export SPARSE_TRAIN_KERNEL_IMAGE=$img
  echo "=== SPARSE_TRAIN_KERNEL_IMAGE=$img"
  for t in twell_cuda hybrid_cuda; do
    echo "+ $t"; LD_PRELOAD="$TL/libtorch_cuda.so" "$CARRY/bin/$t" --nocapture --test-threads 1 2>&1 \
      | grep -E "^test |result|panicked|max\||err|case|N=" | head -40
  done
  echo "+ bench ffn infer"
  "$BIN" bench ffn --shape 1.5b --tokens 16384,4096,1 --sparsity 0.995 --mode infer 2>&1 | grep -v autocast | tail -6
  echo "+ bench ffn train"
  "$BIN" bench ffn --shape 1.5b --tokens 16384 --sparsity 0.995 --mode train 2>&1 | grep -v autocast | tail -5
done
unset SPARSE_TRAIN_KERNEL_IMAGE
echo "+ bench generate (SM clock sampled)"
"$BIN" bench generate --config configs/1.5b.yaml --gen-batch 1,32 2>&1 | grep -v autocast
