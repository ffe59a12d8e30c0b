// Cross-entropy over rows of fp32 logits (one chunk of the LM head's output,
// kernels/src/fused/linear_cross_entropy.rs), one block per row:
//   lse = log sum_j exp(x_j);  loss = lse - x_t;  g_j = exp(x_j - lse) - [j == t]   (bf16)
// Rows whose target is < 0 are ignored: loss 0 and a zero gradient row. A target >= V gives a
// NaN loss (the step is then skipped as non-finite, naming the loss). `g` may be null (no
// gradient wanted).
//
// The `_smem` entry keeps the row in dynamic shared memory (V * 4 bytes): the logits are read
// from memory once, and the bf16 gradient written once, 6 bytes per logit. The `_global`
// entry, for rows larger than a block's shared memory, reads the row three times (the second
// and third mostly from L2). Unfused, the same work was five ATen passes over fp32 [C, V].
// logits: [rows, V] f32; targets: [rows] int64; g: [rows, V] bf16; loss: [rows] f32.
#include "common.cuh"

// The block's reduction of v by `op` (every thread gets it); `red` holds CE_THREADS / 32
// floats.
template <class Op>
DEV float block_reduce(float v, float* red, Op op) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // the previous reduction's readers are done with `red`
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
#pragma unroll
  for (int i = 1; i < CE_THREADS / 32; ++i) r = op(r, red[i]);
  return r;
}

struct MaxOp {
  DEV float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  DEV float operator()(float a, float b) const { return a + b; }
};

DEV float softmax_grad(float x, float lse, int j, int64_t t) {
  return __expf(x - lse) - (j == t ? 1.f : 0.f);
}

template <bool CACHED>
DEV void cross_entropy_row(const float* __restrict__ logits, const int64_t* __restrict__ targets,
                           __nv_bfloat16* __restrict__ g, float* __restrict__ loss, int v) {
  extern __shared__ float4 cached_row[];
  __shared__ float red[CE_THREADS / 32];
  const int tid = threadIdx.x;
  const size_t base = (size_t)blockIdx.x * v;
  const float* x = logits + base;
  // Rows of V % 4 != 0 are not 16-byte aligned: they go element by element.
  const bool vec = (v & 3) == 0;
  const int nv = vec ? v >> 2 : v;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float* cached1 = reinterpret_cast<float*>(cached_row);

  float m = -__int_as_float(0x7f800000);  // -inf (NVRTC has no math.h INFINITY)
  if (vec) {
#pragma unroll 8
    for (int i = tid; i < nv; i += CE_THREADS) {
      const float4 a = __ldg(x4 + i);
      if (CACHED) cached_row[i] = a;
      m = fmaxf(m, fmaxf(fmaxf(a.x, a.y), fmaxf(a.z, a.w)));
    }
  } else {
    for (int i = tid; i < nv; i += CE_THREADS) {
      const float a = __ldg(x + i);
      if (CACHED) cached1[i] = a;
      m = fmaxf(m, a);
    }
  }
  m = block_reduce(m, red, MaxOp());  // its barriers also publish the cached row

  const float4* src4 = CACHED ? cached_row : x4;
  const float* src1 = CACHED ? cached1 : x;
  float s = 0.f;
  if (vec) {
    for (int i = tid; i < nv; i += CE_THREADS) {
      const float4 a = src4[i];
      s += expf(a.x - m) + expf(a.y - m) + expf(a.z - m) + expf(a.w - m);
    }
  } else {
    for (int i = tid; i < nv; i += CE_THREADS) s += expf(src1[i] - m);
  }
  const float lse = m + logf(block_reduce(s, red, SumOp()));

  const int64_t t = targets[blockIdx.x];
  const bool keep = t >= 0;
  if (tid == 0) loss[blockIdx.x] = !keep ? 0.f : (t < v ? lse - x[t] : __int_as_float(0x7fc00000));
  if (g == nullptr) return;
  __nv_bfloat16* gr = g + base;
  if (vec) {
    for (int i = tid; i < nv; i += CE_THREADS) {
      uint2 o = make_uint2(0u, 0u);
      if (keep) {
        const float4 a = src4[i];
        const int j = 4 * i;
        o.x = pack_bf2(softmax_grad(a.x, lse, j, t), softmax_grad(a.y, lse, j + 1, t));
        o.y = pack_bf2(softmax_grad(a.z, lse, j + 2, t), softmax_grad(a.w, lse, j + 3, t));
      }
      reinterpret_cast<uint2*>(gr)[i] = o;
    }
  } else {
    for (int i = tid; i < nv; i += CE_THREADS)
      gr[i] = __float2bfloat16_rn(keep ? softmax_grad(src1[i], lse, i, t) : 0.f);
  }
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_rows_smem(const float* __restrict__ logits, const int64_t* __restrict__ targets,
                        __nv_bfloat16* __restrict__ g, float* __restrict__ loss, int v) {
  cross_entropy_row<true>(logits, targets, g, loss, v);
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
cross_entropy_rows_global(const float* __restrict__ logits, const int64_t* __restrict__ targets,
                          __nv_bfloat16* __restrict__ g, float* __restrict__ loss, int v) {
  cross_entropy_row<false>(logits, targets, g, loss, v);
}
