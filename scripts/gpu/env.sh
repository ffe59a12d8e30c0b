# Source on the GPU machine: libtorch and the NVIDIA libraries of its torch install on the
# library path, a libnccl.so link (cudarc looks for that name; the wheel ships libnccl.so.2),
# and the carried binary and cubins from .carry/.
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
NV=$(dirname "$(dirname "$TL")")/nvidia
mkdir -p /tmp/ncclso && ln -sf "$NV/nccl/lib/libnccl.so.2" /tmp/ncclso/libnccl.so
export LD_LIBRARY_PATH="$TL:$NV/cu13/lib:$NV/nccl/lib:/tmp/ncclso${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SPARSE_TRAIN_CUBINS="$PWD/.carry/cubins"
export NCCL_NVLS_ENABLE=0
BIN="$PWD/.carry/bin/sparse-train"
