#!/usr/bin/env bash
# On the GPU machine: 125m on the real corpus with the lambda ramp, trained twice on the same
# tokens: every FFN on the dense path, and on the auto path (layers move to the hybrid CUDA
# kernels once their non-zeros per token fall under l0_cutoff). Usage: hybrid_train.sh CARRY
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
BIN="$PWD/$CARRY/bin/sparse-train"
bash scripts/gpu/prepare_corpus.sh "$CARRY"
COMMON="--config configs/125m.yaml --quiet --max-steps 300 --set sparsity.l1_end_step=150
  --set train.eval_every=100 --set checkpoint.every=0 --set sparsity.switch_period=25"
for path in dense auto; do
  "$BIN" $COMMON --set sparsity.ffn_path=$path --set sparsity.l0_cutoff=200 \
    --out-dir "$OUT/$path" 2>&1 | tee "$OUT/$path.log" | grep -E "^(model|step)|rror|panick"
  rm -rf "$OUT/$path/checkpoints"
done
