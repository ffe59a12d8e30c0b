#!/usr/bin/env bash
# On the GPU machine: trains configs/125m.yaml (sparse, auto FFN path) on the real corpus for
# a few hundred steps, then `sparse-train generate` from its checkpoint, dense vs TwELL, at
# batch 1 and 32. Usage: generate_trained.sh CARRY (with CARRY/bin/sparse-train and
# CARRY/corpus.tar.xz from corpus/pack_for_device.sh).
set -uo pipefail
CARRY=${1:-.carry}
STEPS=${STEPS:-300}
source scripts/gpu/env.sh
unset SPARSE_TRAIN_CUBINS
BIN="$PWD/$CARRY/bin/sparse-train"
bash scripts/gpu/prepare_corpus.sh "$CARRY"
"$BIN" --config configs/125m.yaml --quiet --max-steps "$STEPS" --set train.eval_every=100 \
  --out-dir "$OUT/125m" 2>&1 | tee "$OUT/train.log" | grep -E "^(model|step)|rror"
for b in 1 32; do
  for p in dense twell; do
    echo "+ generate --batch $b --ffn-path $p"
    "$BIN" generate --checkpoint "$OUT/125m" --prompt "The history of the city begins" \
      --max-tokens 200 --ignore-eos --batch $b --ffn-path $p --warmup 1 2>&1 | grep -v autocast | tail -4
  done
done
rm -rf "$OUT/125m/checkpoints"
