#!/usr/bin/env bash
# On the GPU machine, with the binaries in $1/bin: the TwELL kernel test, the FFN op with and
# without statistics, the end-to-end forward, and generation (prefill + KV-cache decode)
# dense vs TwELL at batch 1 and 32, at the 1.5b and 2b shapes.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
run() { echo "+ sparse-train $*"; "$BIN" "$@" 2>&1 | grep -v "Warning: at::autocast" | tail -25; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -x "$CARRY/bin/twell_cuda" ]; then
  echo "+ twell_cuda"; LD_PRELOAD="$TL/libtorch_cuda.so" "$CARRY/bin/twell_cuda" --nocapture --test-threads 1 2>&1 | tail -30
fi
run bench ffn --shape 1.5b --tokens 16384,4096 --sparsity 0.995 --mode infer
run bench ffn --shape 1.5b --tokens 1,8,32 --sparsity 0.995 --mode infer --repeats 200
run bench generate --config configs/1.5b.yaml --gen-batch 1,32 --prompt-len 128 --new-tokens 128
run bench infer --config configs/1.5b.yaml --steps 5 --warmup 2
run bench generate --config configs/2b.yaml --gen-batch 1,32 --prompt-len 128 --new-tokens 128
run bench infer --config configs/2b.yaml --steps 5 --warmup 2
