#!/usr/bin/env bash
# The main job on a fresh machine: set-up (idempotent), release build, the tiny corpus, then
# trains configs/tiny.yaml on the CPU (a few minutes, falling loss, FFN sparsity past 90%).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
cargo build --release -p sparse-train
bash scripts/tiny-data.sh
exec target/release/sparse-train --config configs/tiny.yaml "$@"
