#!/usr/bin/env bash
# The small real-English corpus of the quick start: Debian's `fortunes` package (quotations,
# jokes, poems; ~2.6 MB of text), fetched by name from the Debian archive into the cache
# (never installed), split into documents at the `%` lines, 5% held out (by hash) as
# validation, and tokenized into data/shards/tiny/{train,val}.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
BIN="${SPARSE_TRAIN_BIN:-target/release/sparse-train}"
OUT=data/shards/tiny
[ -f "$OUT/train/manifest.json" ] && [ -f "$OUT/val/manifest.json" ] && exit 0
SRC="$SPARSE_TRAIN_CACHE/fortunes"
if [ ! -f "$SRC/.ok" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC/deb"
  (cd "$SRC/deb" && { apt-get download fortunes >/dev/null 2>&1 || { apt-get update -qq && apt-get download fortunes; }; })
  dpkg-deb -x "$SRC"/deb/fortunes_*.deb "$SRC/root"
  touch "$SRC/.ok"
fi
python3 - "$SRC/root/usr/share/games/fortunes" "$SRC" <<'PY'
import json, os, sys, zlib
src, out = sys.argv[1], sys.argv[2]
train, val = [], []
for name in sorted(os.listdir(src)):
    p = os.path.join(src, name)
    if not os.path.isfile(p) or "." in name:
        continue
    text = open(p, encoding="utf-8", errors="replace").read()
    for doc in text.split("\n%\n"):
        doc = doc.strip("%\n ")
        if len(doc) < 20:
            continue
        (val if zlib.crc32(doc.encode()) % 20 == 0 else train).append(doc)
for split, docs in (("train", train), ("val", val)):
    with open(os.path.join(out, split + ".jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
print(f"fortunes: {len(train)} train / {len(val)} validation documents")
PY
"$BIN" prepare --input "$SRC/train.jsonl" --out "$OUT/train"
"$BIN" prepare --input "$SRC/val.jsonl" --out "$OUT/val"
