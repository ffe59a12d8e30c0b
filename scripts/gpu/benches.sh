#!/usr/bin/env bash
# On the GPU machine, with the binary in $1/bin: the FFN benches (inference and training),
# the end-to-end benches at the 1.5b shape, then scripts/gpu/final_checks.sh.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
BIN="$PWD/$CARRY/bin/sparse-train"
run() { echo "+ sparse-train $*"; "$BIN" "$@" 2>&1 | grep -v "Warning: at::autocast" | tail -25; }
run bench ffn --shape 1.5b --tokens 16384,4096 --sparsity 0.995 --mode infer
run bench ffn --shape 1.5b --tokens 16384,4096 --sparsity 0.995 --mode train
run bench ffn --shape 1.5b --tokens 16384 --sparsity 0.99 --mode train
run bench infer --config configs/1.5b.yaml --steps 5 --warmup 2
run bench train --config configs/1.5b.yaml --steps 8 --warmup 2
bash scripts/gpu/final_checks.sh "$CARRY"
