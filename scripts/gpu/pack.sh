#!/usr/bin/env bash
# On the build machine: fills the carry folder that scripts/gpu/suite.sh reads on the GPU
# machine. Builds the release binary and the kernel crate's test binaries, strips them into
# CARRY/bin/sparse-train and CARRY/tests/<test name> (the kernel crate's tests and the trainer's
# GPU test), and copies the PyTorch anchor
# (SPARSE_TRAIN_TORCH_ANCHOR, default ../shared/bench/torch_anchor.py next to the checkout)
# to CARRY/torch_anchor.py when it exists. The corpus pack is separate:
# corpus/pack_for_device.sh data/corpus CARRY/corpus.tar.xz.
#
#   bash scripts/gpu/pack.sh [CARRY]      (default .carry)
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${1:-.carry}
source scripts/env.sh
cargo build --release -p sparse-train
mkdir -p "$CARRY/bin" "$CARRY/tests"
strip -o "$CARRY/bin/sparse-train" target/release/sparse-train
# Each GPU test target's executable, as cargo reports it: "name path" per line (every test
# of the kernel crate; the trainer's GPU test).
{
  cargo test --release -p sparse-kernels --no-run --message-format=json
  cargo test --release -p sparse-train --test cuda_graph_train --no-run --message-format=json
} |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])' |
  while read -r name exe; do
    strip -o "$CARRY/tests/$name" "$exe"
    echo "carried $CARRY/tests/$name"
  done
anchor=${SPARSE_TRAIN_TORCH_ANCHOR:-../shared/bench/torch_anchor.py}
if [ -f "$anchor" ]; then
  install -m 0644 "$anchor" "$CARRY/torch_anchor.py"
  echo "carried $CARRY/torch_anchor.py"
fi
du -sh "$CARRY"
