#!/usr/bin/env bash
# Idempotent set-up: installs what a fresh machine lacks, reuses the cache otherwise.
# Cache (outside the clone): $SPARSE_TRAIN_CACHE (default ~/.cache/sparse-train)
#   venv/   python venv with torch==2.11.0 (libtorch for tch 0.24, plus the test-side
#           python packages: tensorboard, transformers, tokenizers, safetensors)
#   nvcc/   pinned nvcc from PyPI, used by kernels/build.rs to compile cubins
set -euo pipefail
CACHE="${SPARSE_TRAIN_CACHE:-$HOME/.cache/sparse-train}"
mkdir -p "$CACHE"

need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -e /usr/lib/x86_64-linux-gnu/openmpi/include/mpi.h ] || need_apt+=(libopenmpi-dev)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

VENV="$CACHE/venv"
PY_PKGS="torch==2.11.0 tensorboard==2.20.0 transformers==4.56.2 tokenizers==0.22.2 safetensors numpy pytest"
if [ ! -f "$VENV/.ok-torch-2.11.0" ]; then
  echo "setup: creating $VENV (torch 2.11.0, ~5 GB, a minute or two)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q $PY_PKGS
  touch "$VENV/.ok-torch-2.11.0"
fi
# Added after the first venvs were made: the tokenizer parity tests read tokenizers directly.
"$VENV/bin/python3" -c "import tokenizers" 2>/dev/null || "$VENV/bin/pip" install -q tokenizers==0.22.2

NVCC_DIR="$CACHE/nvcc-13.0.88"
if [ ! -f "$NVCC_DIR/.ok" ]; then
  echo "setup: installing pinned nvcc 13.0.88 into $NVCC_DIR"
  rm -rf "$NVCC_DIR"
  "$VENV/bin/pip" install -q --target "$NVCC_DIR" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  touch "$NVCC_DIR/.ok"
fi
echo "setup: ok (cache $CACHE)"
