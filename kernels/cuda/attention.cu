// Attention of one new token per sequence over the KV cache (decode), with the number of
// keys read on the device, so that one captured decode step serves every position:
//   out[b, h] = softmax_j(q[b, h] . k[b, g, j] * scale) v[b, g, j],  j = 0..=pos,  g = h / (nh / nkv)
// q: [B, nh, hd] bf16; k_cache, v_cache: [B, nkv, capacity, hd] bf16; pos: int64 on the device
// (clamped to capacity - 1); out: [B, nh * hd] bf16, token-major (the output projection's
// input, no transpose). fp32 arithmetic, online softmax.
// One block per (b, h), ATTN_THREADS threads: warp w takes keys w, w + warps, ...; lane l holds
// dimensions [l E, l E + E), E = hd / 32 (hd % 32 == 0, E <= ATTN_MAX_LANE_DIMS); each warp
// keeps its own running max, sum and accumulator, and the warps are merged at the end.
#include "common.cuh"

DEV float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
decode_attention(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                 const __nv_bfloat16* __restrict__ v_cache, const long long* __restrict__ pos_dev,
                 __nv_bfloat16* __restrict__ out, int nh, int nkv, int hd, int capacity,
                 float scale) {
  constexpr int WARPS = ATTN_THREADS / 32;
  __shared__ float s_m[WARPS], s_l[WARPS];
  __shared__ float s_acc[WARPS][32 * ATTN_MAX_LANE_DIMS];
  const int bh = blockIdx.x;
  const int b = bh / nh, h = bh - b * nh;
  const int g = h / (nh / nkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e_n = hd >> 5;
  long long last = *pos_dev;
  if (last >= capacity) last = capacity - 1;
  if (last < 0) last = 0;
  const int keys = (int)last + 1;

  float qv[ATTN_MAX_LANE_DIMS], acc[ATTN_MAX_LANE_DIMS];
  const __nv_bfloat16* qrow = q + (size_t)bh * hd + lane * e_n;
#pragma unroll
  for (int e = 0; e < ATTN_MAX_LANE_DIMS; ++e) {
    qv[e] = e < e_n ? __bfloat162float(qrow[e]) * scale : 0.f;
    acc[e] = 0.f;
  }
  const size_t head_base = ((size_t)b * nkv + g) * capacity * hd + lane * e_n;
  const float neg_inf = __int_as_float(0xff800000);
  float m = neg_inf, l = 0.f;
  for (int j = warp; j < keys; j += WARPS) {
    const __nv_bfloat16* kr = k_cache + head_base + (size_t)j * hd;
    const __nv_bfloat16* vr = v_cache + head_base + (size_t)j * hd;
    float kv[ATTN_MAX_LANE_DIMS], vv[ATTN_MAX_LANE_DIMS];
#pragma unroll
    for (int e = 0; e < ATTN_MAX_LANE_DIMS; ++e) {
      kv[e] = e < e_n ? __bfloat162float(kr[e]) : 0.f;
      vv[e] = e < e_n ? __bfloat162float(vr[e]) : 0.f;
    }
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < ATTN_MAX_LANE_DIMS; ++e) s += qv[e] * kv[e];
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float c = __expf(m - m_new), p = __expf(s - m_new);
    l = l * c + p;
#pragma unroll
    for (int e = 0; e < ATTN_MAX_LANE_DIMS; ++e) acc[e] = acc[e] * c + p * vv[e];
    m = m_new;
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < ATTN_MAX_LANE_DIMS; ++e)
    if (e < e_n) s_acc[warp][lane * e_n + e] = acc[e];
  __syncthreads();
  // Merge the warps (a warp with no key has m = -inf and weight 0).
  float big = neg_inf;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) big = fmaxf(big, s_m[w]);
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += s_l[w] * __expf(s_m[w] - big);
  const float inv = 1.f / total;
  for (int i = threadIdx.x; i < hd; i += ATTN_THREADS) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) o += s_acc[w][i] * __expf(s_m[w] - big);
    out[(size_t)bh * hd + i] = __float2bfloat16(o * inv);
  }
}
