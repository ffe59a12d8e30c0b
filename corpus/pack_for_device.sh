#!/usr/bin/env bash
# Pack the built corpus text (core training jsonl, validation jsonl, manifest and the per-source
# .done markers) into one xz-compressed tar small enough to travel to the GPU machine (< 45 MiB),
# where it is tokenized:
#
#   corpus/pack_for_device.sh data/corpus /tmp/corpus.tar.xz
#   # on the device machine, from the repository root:
#   mkdir -p data/corpus && tar -xJf corpus.tar.xz -C data/corpus
#   target/release/sparse-train corpus build --out data/corpus   # reuses the text: no downloads
#
# Set PACK_EXTENDED=1 to include the extended docs too (then the 45 MiB limit may not hold);
# PACK_LIMIT_BYTES overrides the limit.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 CORPUS_DIR OUTFILE.tar.xz" >&2
    exit 2
fi
dir=$1
outfile=$2
limit=${PACK_LIMIT_BYTES:-47185920}  # 45 MiB

if [[ ! -f "$dir/manifest.json" ]]; then
    echo "error: $dir/manifest.json not found: build the corpus first (sparse-train corpus build --out $dir)" >&2
    exit 1
fi

# the files named by the manifest (core only unless PACK_EXTENDED=1), plus markers
mapfile -t files < <(PACK_EXTENDED="${PACK_EXTENDED:-0}" python3 - "$dir" <<'EOF'
import json, os, sys
d = sys.argv[1]
m = json.load(open(os.path.join(d, "manifest.json")))
ext = os.environ.get("PACK_EXTENDED") == "1"
names = []
for name, info in m["sources"].items():
    if info.get("extended") and not ext:
        continue
    sub = "val" if info["group"] == "val" else "train"
    for p in (f"{sub}/{name}.jsonl", f".state/{name}.done"):
        if os.path.exists(os.path.join(d, p)):
            names.append(p)
print("\n".join(["manifest.json"] + names))
EOF
)

threads=$(nproc 2>/dev/null || echo 2)
tmp="$outfile.tmp.$$"
trap 'rm -f "$tmp"' EXIT
tar -C "$dir" -cf - "${files[@]}" | xz -9 -T"$threads" -c > "$tmp"
size=$(stat -c %s "$tmp")
mv "$tmp" "$outfile"
trap - EXIT
awk -v f="$outfile" -v n="${#files[@]}" -v s="$size" 'BEGIN { printf "%s: %d files, %.1f MiB\n", f, n, s / 1048576 }'
if (( size > limit )); then
    echo "error: $outfile is $size bytes, over the limit of $limit bytes" >&2
    exit 1
fi
