#!/usr/bin/env bash
# On the GPU machine: the TwELL kernel test (incl. the bounded spill buffer that overflows and
# regrows), the FFN bench, and the end-to-end forward at 1.5b and 2b (peak memory).
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
echo "+ twell_cuda"; LD_PRELOAD="$TL/libtorch_cuda.so" "$CARRY/bin/twell_cuda" --nocapture --test-threads 1 2>&1 | grep -E "^test |result|panicked|N=" | head -30
run() { echo "+ sparse-train $*"; "$BIN" "$@" 2>&1 | grep -v autocast | tail -8; }
run bench ffn --shape 1.5b --tokens 16384,32768 --sparsity 0.995 --mode infer
run bench infer --config configs/1.5b.yaml --steps 5 --warmup 2
run bench infer --config configs/2b.yaml --steps 5 --warmup 2
