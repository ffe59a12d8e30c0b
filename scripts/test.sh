#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), build, lint, Rust tests,
# Python-side tests (TensorBoard reader, HF transformers parity, corpus extractors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo build --release --workspace --bins --examples
cargo clippy --release --workspace --all-targets -- -D warnings
bash scripts/tiny-data.sh
export SPARSE_TRAIN_BIN="$PWD/target/release/sparse-train"
cargo test --release --workspace
python3 -m pytest -q tensorboard/tests corpus/tests tests/python
