# Source on the GPU machine, from the repository root, after setting CARRY (default .carry):
# libtorch and the NVIDIA libraries of the machine's torch install on the library path, a
# libnccl.so link (cudarc looks for that name; the wheel ships libnccl.so.2), NCCL's
# environment, and BIN (the carried binary). The binary embeds its kernel images, so nothing
# here points at cubins: set SPARSE_TRAIN_CUBINS yourself only to try a cubin without a rebuild.
CARRY=${CARRY:-.carry}
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
NV=$(dirname "$(dirname "$TL")")/nvidia
mkdir -p /tmp/ncclso && ln -sf "$NV/nccl/lib/libnccl.so.2" /tmp/ncclso/libnccl.so
export LD_LIBRARY_PATH="$TL:$NV/cu13/lib:$NV/nccl/lib:/tmp/ncclso${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
BIN=$(realpath -m "$CARRY/bin/sparse-train")
