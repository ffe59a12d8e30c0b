// The dense FFN's gating between its matrix products, with the L1 term and the activity counts
// folded in: one pass forward, one backward (kernels/src/cuda/gating.rs, the dense training
// arm of kernels/src/op):
//   forward:  h = bf16(relu(g) u);  l1_row[t] = sum_j |h_tj|;  row_cnt[t] = #{j : h_tj != 0};
//             blk_cnt[b][j] = #{t of row block b : h_tj != 0}  (summed over the blocks after)
//   backward: e = dh + dl1 sign(h);  dg = bf16(e u [g > 0]);  du = bf16(e relu(g));
//             h again (bit for bit the forward's), for the down projection's weight gradient,
//             so the forward need not keep it.
// g, u, h, dh, dg, du: [N, H] bf16 row-major, H % 8 == 0, 16-byte aligned rows. l1_row: [N] f32;
// row_cnt: [N] int; blk_cnt: [ceil(N / GATING_ROWS), H] uint8; dl1: one f32 on the device (the
// gradient of sum_t l1_row[t]). fp32 arithmetic, one rounding per output; deterministic.
#include "common.cuh"

// Eight bf16 of a 16-byte granule as floats.
DEV void unpack_bf16x8(uint4 v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = bf_lo(w[j]);
    out[2 * j + 1] = bf_hi(w[j]);
  }
}

// h = bf16(relu(g) u), as a float (the value the down projection multiplies).
DEV float gated(float g, float u) {
  return __bfloat162float(__float2bfloat16_rn(fmaxf(g, 0.f) * u));
}

// Forward: block b takes rows b * GATING_ROWS ..; thread tid the granules tid + k * GATING_THREADS
// of each row. Per-row partials stay in registers (the row loop is unrolled), then one block
// reduction per row; the per-unit counts of the block's rows are written once per granule.
extern "C" __global__ void __launch_bounds__(GATING_THREADS)
gating_fwd(const __nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ u,
           __nv_bfloat16* __restrict__ h, float* __restrict__ l1_row, int* __restrict__ row_cnt,
           uint8_t* __restrict__ blk_cnt, int n, int hdim) {
  constexpr int WARPS = GATING_THREADS / 32;
  __shared__ float red_l1[GATING_ROWS][WARPS];
  __shared__ int red_cnt[GATING_ROWS][WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = hdim >> 3;
  const int r0 = blockIdx.x * GATING_ROWS;
  const int rows = min(GATING_ROWS, n - r0);
  float l1[GATING_ROWS];
  int cnt[GATING_ROWS];
#pragma unroll
  for (int r = 0; r < GATING_ROWS; ++r) {
    l1[r] = 0.f;
    cnt[r] = 0;
  }
  for (int gi = tid; gi < g8; gi += GATING_THREADS) {
    int unit[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
    for (int r = 0; r < GATING_ROWS; ++r) {
      if (r < rows) {
        const size_t at = (size_t)(r0 + r) * g8 + gi;
        float gv[8], uv[8], hv[8];
        unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(g) + at), gv);
        unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(u) + at), uv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          hv[e] = gated(gv[e], uv[e]);
          const int on = hv[e] != 0.f;
          l1[r] += fabsf(hv[e]);
          cnt[r] += on;
          unit[e] += on;
        }
        store_bf16x8(h + (size_t)(r0 + r) * hdim, gi, hv);
      }
    }
    uint2 packed;
    packed.x = unit[0] | unit[1] << 8 | unit[2] << 16 | unit[3] << 24;
    packed.y = unit[4] | unit[5] << 8 | unit[6] << 16 | unit[7] << 24;
    reinterpret_cast<uint2*>(blk_cnt + (size_t)blockIdx.x * hdim)[gi] = packed;
  }
#pragma unroll
  for (int r = 0; r < GATING_ROWS; ++r) {
    float s = l1[r];
    int c = cnt[r];
#pragma unroll
    for (int off = 16; off; off >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
      c += __shfl_xor_sync(0xffffffffu, c, off);
    }
    if (lane == 0) {
      red_l1[r][warp] = s;
      red_cnt[r][warp] = c;
    }
  }
  __syncthreads();
  if (tid < rows) {
    float s = 0.f;
    int c = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      s += red_l1[tid][w];
      c += red_cnt[tid][w];
    }
    l1_row[r0 + tid] = s;
    row_cnt[r0 + tid] = c;
  }
}

// Backward: one thread per granule of 8 units, grid-stride over all N * H / 8 granules.
extern "C" __global__ void __launch_bounds__(GATING_THREADS)
gating_bwd(const __nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ u,
           const __nv_bfloat16* __restrict__ dh, const float* __restrict__ dl1,
           __nv_bfloat16* __restrict__ dg, __nv_bfloat16* __restrict__ du,
           __nv_bfloat16* __restrict__ h, long long granules) {
  const float lam = __ldg(dl1);
  for (long long i = (long long)blockIdx.x * GATING_THREADS + threadIdx.x; i < granules;
       i += (long long)gridDim.x * GATING_THREADS) {
    float gv[8], uv[8], dv[8], og[8], ou[8], oh[8];
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(g) + i), gv);
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(u) + i), uv);
    unpack_bf16x8(__ldg(reinterpret_cast<const uint4*>(dh) + i), dv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float hv = gated(gv[e], uv[e]);
      const float sign = (hv > 0.f) - (hv < 0.f);
      const float grad = fmaf(lam, sign, dv[e]);
      const float p = fmaxf(gv[e], 0.f);
      og[e] = gv[e] > 0.f ? grad * uv[e] : 0.f;
      ou[e] = grad * p;
      oh[e] = hv;
    }
    store_bf16x8(dg + i * 8, 0, og);
    store_bf16x8(du + i * 8, 0, ou);
    store_bf16x8(h + i * 8, 0, oh);
  }
}
