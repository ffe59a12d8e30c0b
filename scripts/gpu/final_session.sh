#!/usr/bin/env bash
# On the GPU machine: the kernel GPU tests, the FFN op, and generation at 1.5b with the HEAD
# binary (after the host-side trims of the TwELL op).
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
for t in twell_cuda hybrid_cuda; do
  echo "+ $t"; LD_PRELOAD="$TL/libtorch_cuda.so" "$CARRY/bin/$t" --nocapture --test-threads 1 2>&1 | grep -E "^test |result|panicked"
done
run() { echo "+ sparse-train $*"; "$BIN" "$@" 2>&1 | grep -v autocast; }
run bench ffn --shape 1.5b --tokens 16384,1 --sparsity 0.995 --mode infer | tail -3
run bench generate --config configs/1.5b.yaml --gen-batch 1,32 --warmup 1
