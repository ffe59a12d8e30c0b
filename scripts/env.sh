# Source this file: puts the cached torch venv first on PATH so tch builds against it,
# and libtorch on the library path for test binaries (the release binary carries an rpath).
CACHE="${SPARSE_TRAIN_CACHE:-$HOME/.cache/sparse-train}"
export SPARSE_TRAIN_CACHE="$CACHE"
export PATH="$CACHE/venv/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
_torch_lib="$(ls -d "$CACHE"/venv/lib/python3*/site-packages/torch/lib 2>/dev/null | head -n 1)"
export SPARSE_TRAIN_TORCH_LIB="$_torch_lib"
# The NVIDIA wheels' libraries (libnvrtc for the kernels' run-time compilation test).
_nv_lib="$(dirname "$(dirname "$_torch_lib")")/nvidia/cu13/lib"
export LD_LIBRARY_PATH="$_torch_lib:$_nv_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SPARSE_TRAIN_NVCC="$CACHE/nvcc-13.0.88/nvidia/cu13/bin/nvcc"
unset _torch_lib _nv_lib
