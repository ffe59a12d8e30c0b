#!/usr/bin/env bash
# On the GPU machine: bench generate (dense vs TwELL, batch 1 and 32, and the reverse order to
# show the order does not matter after the warm-up) at 1.5b and 2b, and PyTorch's CUDA-graph
# decode at 1.5b for reference.
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
run() { echo "+ sparse-train $*"; "$BIN" "$@" 2>&1 | grep -v autocast; }
run bench generate --config configs/1.5b.yaml --gen-batch 1,32 --warmup 1
run bench generate --config configs/1.5b.yaml --gen-batch 1 --warmup 1 --paths twell,dense
run bench generate --config configs/2b.yaml --gen-batch 1,32 --warmup 1
for f in dense graph; do python3 scripts/gpu/torch_decode.py --layers 28 --batch 1,32 --ffn $f; done
