#!/usr/bin/env bash
# On the GPU machine (device tool, .carry holding the binary and the corpus pack): the dense
# trainer on 125m over real text, then a short dense run at the 1.5b shape for MFU.
set -uo pipefail
source scripts/gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash scripts/gpu/prepare_corpus.sh 2>&1 | tail -3
"$BIN" --config configs/125m.yaml --quiet --max-steps 300 --set sparsity.ffn_path=dense \
  --set train.eval_every=100 --out-dir "$OUT/run-125m" 2>&1 | tee "$OUT/125m.log" | grep -E "^(model|step)"
"$BIN" --config configs/1.5b.yaml --quiet --synthetic-data --max-steps 16 \
  --set train.batch_size=16 --set train.log_every=4 --set sparsity.ffn_path=dense \
  --out-dir "$OUT/run-1.5b" 2>&1 | tee "$OUT/1.5b.log" | grep -E "^(model|step)|rror"
