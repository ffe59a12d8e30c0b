#!/usr/bin/env bash
# On the GPU machine: unpack the corpus text carried as $1/corpus.tar.xz (made by
# corpus/pack_for_device.sh) and tokenize it with the carried binary $1/bin/sparse-train
# (prose twice, as `corpus build` does) into data/corpus/shards/{train,val}.
# Usage: prepare_corpus.sh [CARRY]   (default .carry)
set -euo pipefail
CARRY=${1:-.carry}
source scripts/gpu/env.sh
BIN="$PWD/$CARRY/bin/sparse-train"
mkdir -p data/corpus && tar -xJf "$CARRY/corpus.tar.xz" -C data/corpus
mapfile -t train < <(python3 -c "
import json; m = json.load(open('data/corpus/manifest.json'))
print('\n'.join(m['train_files'] + m['prose_files']))")
"$BIN" prepare --input "${train[@]/#/data/corpus/}" --out data/corpus/shards/train | tail -1
"$BIN" prepare --input data/corpus/val/bbc.jsonl --out data/corpus/shards/val | tail -1
