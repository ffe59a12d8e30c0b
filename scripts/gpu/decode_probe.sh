#!/usr/bin/env bash
# On the GPU machine: where a decode step's time goes (bench generate's FFN breakdown).
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
"$PWD/$CARRY/bin/sparse-train" bench generate --config configs/1.5b.yaml --gen-batch 1 --new-tokens 32 2>&1 | grep -v autocast
