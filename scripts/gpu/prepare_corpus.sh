#!/usr/bin/env bash
# On the GPU machine: unpack the corpus text carried as .carry/corpus.tar.xz (made by
# corpus/pack_for_device.sh) and tokenize it with the carried binary (prose twice, as
# `corpus build` does).
set -euo pipefail
source scripts/gpu/env.sh
mkdir -p data/corpus && tar -xJf .carry/corpus.tar.xz -C data/corpus
mapfile -t train < <(python3 -c "
import json; m = json.load(open('data/corpus/manifest.json'))
print('\n'.join(m['train_files'] + m['prose_files']))")
"$BIN" prepare --input "${train[@]/#/data/corpus/}" --out data/corpus/shards/train
"$BIN" prepare --input data/corpus/val/bbc.jsonl --out data/corpus/shards/val
