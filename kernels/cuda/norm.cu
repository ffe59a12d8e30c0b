// The residual add fused with RMSNorm, fp32 residual stream in, bf16 normed output out (the
// input of the next matrix product), forward and backward in one pass each
// (kernels/src/fused/norm.rs):
//   forward:  x_new = x + delta;  r = 1 / sqrt(mean(x_new^2) + eps);  y = bf16(w * x_new * r)
//   backward: xhat = x_new r;  gw = g_y * w;
//             g_x = g_x_new + r (gw - xhat mean(gw xhat))   (fp32; delta's gradient is its bf16)
//             dw  = sum over rows of g_y * xhat              (per-block partials, summed after)
// delta and g_x_new may be null (no residual branch / no gradient reaching x_new).
// x, x_new, g_x_new, g_x: [N, D] f32; delta, y, g_y, g_delta: [N, D] bf16; w: [D] f32;
// rstd: [N] f32; dw_part: [gridDim.x, D] f32. D % 4 == 0, D <= NORM_THREADS * 4 *
// NORM_MAX_GRANULES. The forward takes `rows` token rows per block (NORM_ROWS at training
// sizes, fewer for a few rows, so that decode-sized launches spread over the SMs); the
// backward NORM_ROWS. Thread t owns the 4-column granules t + j * NORM_THREADS.
#include "common.cuh"

// Sum of v over the block (every thread gets it); `red` holds NORM_THREADS / 32 floats.
DEV float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // the previous row's readers are done with `red`
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_THREADS / 32; ++i) s += red[i];
  return s;
}

DEV void load_bf16x4(const __nv_bfloat16* p, float* out) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  out[0] = bf_lo(u.x);
  out[1] = bf_hi(u.x);
  out[2] = bf_lo(u.y);
  out[3] = bf_hi(u.y);
}

DEV void store_bf16x4(__nv_bfloat16* p, const float* v) {
  uint2 u;
  u.x = pack_bf2(v[0], v[1]);
  u.y = pack_bf2(v[2], v[3]);
  *reinterpret_cast<uint2*>(p) = u;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
add_rms_norm_fwd(const float* __restrict__ x, const __nv_bfloat16* __restrict__ delta,
                 const float* __restrict__ w, float* __restrict__ x_new,
                 __nv_bfloat16* __restrict__ y, float* __restrict__ rstd, int n, int d,
                 float eps, int rows) {
  __shared__ float red[NORM_THREADS / 32];
  const int ng = d >> 2;
  const int r_end = min(n, (int)(blockIdx.x + 1) * rows);
  for (int r = blockIdx.x * rows; r < r_end; ++r) {
    const size_t base = (size_t)r * d;
    float v[NORM_MAX_GRANULES][4];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_MAX_GRANULES; ++j) {
      const int g = threadIdx.x + j * NORM_THREADS;
      if (g >= ng) break;
      const float4 a = *reinterpret_cast<const float4*>(x + base + 4 * g);
      v[j][0] = a.x; v[j][1] = a.y; v[j][2] = a.z; v[j][3] = a.w;
      if (delta != nullptr) {
        float b[4];
        load_bf16x4(delta + base + 4 * g, b);
#pragma unroll
        for (int e = 0; e < 4; ++e) v[j][e] += b[e];
      }
      *reinterpret_cast<float4*>(x_new + base + 4 * g) =
          make_float4(v[j][0], v[j][1], v[j][2], v[j][3]);
#pragma unroll
      for (int e = 0; e < 4; ++e) ss += v[j][e] * v[j][e];
    }
    const float rs = rsqrtf(block_sum(ss, red) / d + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
#pragma unroll
    for (int j = 0; j < NORM_MAX_GRANULES; ++j) {
      const int g = threadIdx.x + j * NORM_THREADS;
      if (g >= ng) break;
      const float4 wv = *reinterpret_cast<const float4*>(w + 4 * g);
      const float o[4] = {v[j][0] * rs * wv.x, v[j][1] * rs * wv.y, v[j][2] * rs * wv.z,
                          v[j][3] * rs * wv.w};
      store_bf16x4(y + base + 4 * g, o);
    }
  }
}

// One row's backward inputs, the thread's G granules (loaded a row ahead of their use).
template <int G>
struct BwdRow {
  float4 x[G], up[G];
  uint2 gy[G];
  float rs;
};

template <int G>
DEV void bwd_load(BwdRow<G>& row, const float* __restrict__ g_x_new, const __nv_bfloat16* __restrict__ g_y,
                  const float* __restrict__ x_new, const float* __restrict__ rstd, int r, int ng, int d) {
  const size_t base = (size_t)r * d;
  row.rs = rstd[r];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int g = threadIdx.x + j * NORM_THREADS;
    const bool in = g < ng;  // granules past the row are zeros: they add nothing to the sums
    row.x[j] = in ? *reinterpret_cast<const float4*>(x_new + base + 4 * g) : make_float4(0.f, 0.f, 0.f, 0.f);
    row.gy[j] = in ? *reinterpret_cast<const uint2*>(g_y + base + 4 * g) : make_uint2(0u, 0u);
    row.up[j] = in && g_x_new != nullptr ? *reinterpret_cast<const float4*>(g_x_new + base + 4 * g)
                                         : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// The backward over NORM_ROWS rows a block, G granules a thread (the smallest power of two that
// covers D, so that the registers a row needs are the row's and the next row's loads can be in
// flight during this row's block reduction: a block's rows would otherwise wait on memory one
// after another).
template <int G>
DEV void bwd_body(const float* __restrict__ g_x_new, const __nv_bfloat16* __restrict__ g_y,
                  const float* __restrict__ x_new, const float* __restrict__ w, const float* __restrict__ rstd,
                  float* __restrict__ g_x, __nv_bfloat16* __restrict__ g_delta, float* __restrict__ dw_part, int n,
                  int d) {
  __shared__ float red[NORM_THREADS / 32];
  const int ng = d >> 2;
  float wv[G][4], dw[G][4];
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int g = threadIdx.x + j * NORM_THREADS;
    const float4 a = g < ng ? *reinterpret_cast<const float4*>(w + 4 * g) : make_float4(0.f, 0.f, 0.f, 0.f);
    wv[j][0] = a.x; wv[j][1] = a.y; wv[j][2] = a.z; wv[j][3] = a.w;
#pragma unroll
    for (int e = 0; e < 4; ++e) dw[j][e] = 0.f;
  }
  const int r0 = blockIdx.x * NORM_ROWS, r_end = min(n, r0 + NORM_ROWS);
  BwdRow<G> cur;
  if (r0 < r_end) bwd_load(cur, g_x_new, g_y, x_new, rstd, r0, ng, d);
  for (int r = r0; r < r_end; ++r) {
    BwdRow<G> next;
    if (r + 1 < r_end) bwd_load(next, g_x_new, g_y, x_new, rstd, r + 1, ng, d);
    const size_t base = (size_t)r * d;
    const float rs = cur.rs;
    float xh[G][4], gw[G][4];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const float xa[4] = {cur.x[j].x, cur.x[j].y, cur.x[j].z, cur.x[j].w};
      const float gy[4] = {bf_lo(cur.gy[j].x), bf_hi(cur.gy[j].x), bf_lo(cur.gy[j].y), bf_hi(cur.gy[j].y)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        xh[j][e] = xa[e] * rs;
        gw[j][e] = gy[e] * wv[j][e];
        dot += gw[j][e] * xh[j][e];
        dw[j][e] += gy[e] * xh[j][e];
      }
    }
    const float m = block_sum(dot, red) / d;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int g = threadIdx.x + j * NORM_THREADS;
      if (g < ng) {
        const float up[4] = {cur.up[j].x, cur.up[j].y, cur.up[j].z, cur.up[j].w};
        float t[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) t[e] = rs * (gw[j][e] - xh[j][e] * m) + up[e];
        *reinterpret_cast<float4*>(g_x + base + 4 * g) = make_float4(t[0], t[1], t[2], t[3]);
        if (g_delta != nullptr) store_bf16x4(g_delta + base + 4 * g, t);
      }
    }
    cur = next;
  }
#pragma unroll
  for (int j = 0; j < G; ++j) {
    const int g = threadIdx.x + j * NORM_THREADS;
    if (g < ng)
      *reinterpret_cast<float4*>(dw_part + (size_t)blockIdx.x * d + 4 * g) =
          make_float4(dw[j][0], dw[j][1], dw[j][2], dw[j][3]);
  }
}

#define NORM_BWD_ARGS                                                                                       \
  const float *__restrict__ g_x_new, const __nv_bfloat16 *__restrict__ g_y, const float *__restrict__ x_new, \
      const float *__restrict__ w, const float *__restrict__ rstd, float *__restrict__ g_x,                 \
      __nv_bfloat16 *__restrict__ g_delta, float *__restrict__ dw_part, int n, int d
#define NORM_BWD_PASS g_x_new, g_y, x_new, w, rstd, g_x, g_delta, dw_part, n, d
static_assert(NORM_MAX_GRANULES == 8, "one entry per power of two up to NORM_MAX_GRANULES");
extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_bwd_g1(NORM_BWD_ARGS) { bwd_body<1>(NORM_BWD_PASS); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_bwd_g2(NORM_BWD_ARGS) { bwd_body<2>(NORM_BWD_PASS); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_bwd_g4(NORM_BWD_ARGS) { bwd_body<4>(NORM_BWD_PASS); }
extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rms_norm_bwd_g8(NORM_BWD_ARGS) { bwd_body<8>(NORM_BWD_PASS); }
