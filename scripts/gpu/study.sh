#!/usr/bin/env bash
# On the GPU machine: the sparsity study. configs/125m-dense.yaml (lambda = 0) and
# configs/125m.yaml (lambda ramped to 1.28e-3) on the same tokens of the real-English corpus;
# logs, metrics.jsonl and TensorBoard files land in $OUT. Usage: study.sh BIN_DIR
set -uo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
BIN="$PWD/$CARRY/bin/sparse-train"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash scripts/gpu/prepare_corpus.sh "$CARRY"
for cfg in 125m-dense 125m; do
  "$BIN" --config configs/$cfg.yaml --quiet --set sparsity.ffn_path=dense --out-dir "$OUT/$cfg" \
    2>&1 | tee "$OUT/$cfg.log" | grep -E "^(model|step)|rror"
  rm -rf "$OUT/$cfg/checkpoints"
done
