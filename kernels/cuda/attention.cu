// Attention of one new token per sequence over the KV cache (decode), with the number of
// keys read on the device, so that one captured decode step serves every position:
//   out[b, h] = softmax_j(q[b, h] . k[b, g, j] * scale) v[b, g, j],  j = 0..=pos,  g = h / (nh / nkv)
// q: [B, nh, hd] bf16; k_cache, v_cache: [B, nkv, capacity, hd] bf16; pos: int64 on the device
// (clamped to capacity - 1); out: [B, nh * hd] bf16, token-major (the output projection's
// input, no transpose). fp32 arithmetic, online softmax.
// One block per (b, h) of blockDim.x <= ATTN_THREADS threads (fewer when the blocks are many:
// a lane's accumulator takes HD registers, so few blocks fit an SM, and smaller blocks keep
// it busy). Warp w takes keys in tiles of 32 (tile w, w + warps, ...) with one key per lane: the lane loads its key's row and value's row (16-byte
// loads, all independent, so a tile costs about one memory latency), forms the score, and the
// warp updates its running max and sum; each lane accumulates p_j v_j over all HD dimensions
// in registers. At the end the lanes' accumulators are summed across the warp and the warps'
// states merged. HD (the head width) is a template parameter: 32, 64 or 128.
#include "common.cuh"

DEV float warp_max(float v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

DEV void bf16x8(const uint4 u, float* f) {
  f[0] = bf_lo(u.x); f[1] = bf_hi(u.x); f[2] = bf_lo(u.y); f[3] = bf_hi(u.y);
  f[4] = bf_lo(u.z); f[5] = bf_hi(u.z); f[6] = bf_lo(u.w); f[7] = bf_hi(u.w);
}

template <int HD>
DEV void decode_attention_hd(const __nv_bfloat16* __restrict__ q,
                             const __nv_bfloat16* __restrict__ k_cache,
                             const __nv_bfloat16* __restrict__ v_cache, int keys,
                             __nv_bfloat16* __restrict__ out, int nh, int nkv, int capacity,
                             float scale) {
  constexpr int WARPS = ATTN_THREADS / 32;
  constexpr int CHUNKS = HD / 8;
  const int warps = blockDim.x >> 5;
  __shared__ float s_q[HD];
  __shared__ float s_m[WARPS], s_l[WARPS];
  __shared__ float s_acc[WARPS][HD];
  const float neg_inf = __int_as_float(0xff800000);
  const int bh = blockIdx.x;
  const int b = bh / nh, h = bh - b * nh;
  const int g = h / (nh / nkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = threadIdx.x; i < HD; i += blockDim.x)
    s_q[i] = __bfloat162float(q[(size_t)bh * HD + i]) * scale;
  __syncthreads();
  const size_t head_base = ((size_t)b * nkv + g) * capacity * HD;
  const __nv_bfloat16* kh = k_cache + head_base;
  const __nv_bfloat16* vh = v_cache + head_base;
  float acc[HD];
#pragma unroll
  for (int d = 0; d < HD; ++d) acc[d] = 0.f;
  float m = neg_inf, l = 0.f;
  for (int base = warp * 32; base < keys; base += warps * 32) {
    const int j = base + lane;
    const bool live = j < keys;
    uint4 kr[CHUNKS], vr[CHUNKS];
    const uint4* kp = reinterpret_cast<const uint4*>(kh + (size_t)(live ? j : 0) * HD);
    const uint4* vp = reinterpret_cast<const uint4*>(vh + (size_t)(live ? j : 0) * HD);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      kr[c] = __ldg(kp + c);
      vr[c] = __ldg(vp + c);
    }
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      float f[8];
      bf16x8(kr[c], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) dot += s_q[8 * c + e] * f[e];
    }
    const float s = live ? dot : neg_inf;
    const float m_new = fmaxf(m, warp_max(s));
    const float p = live ? __expf(s - m_new) : 0.f;
    const float c = __expf(m - m_new);
    l = l * c + warp_sum(p);
#pragma unroll
    for (int cc = 0; cc < CHUNKS; ++cc) {
      float f[8];
      bf16x8(vr[cc], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[8 * cc + e] = acc[8 * cc + e] * c + p * f[e];
    }
    m = m_new;
  }
  // Sum the lanes' accumulators; lane d % 32 keeps dimension d.
#pragma unroll
  for (int d = 0; d < HD; ++d) {
    const float v = warp_sum(acc[d]);
    if (lane == (d & 31)) s_acc[warp][d] = v;
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
  __syncthreads();
  // Merge the warps (a warp with no key has m = -inf and weight 0; warp 0 always has key 0).
  float big = neg_inf;
  for (int w = 0; w < warps; ++w) big = fmaxf(big, s_m[w]);
  float weight[WARPS], total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    weight[w] = (w >= warps || s_m[w] == neg_inf) ? 0.f : __expf(s_m[w] - big);
    total += w < warps ? s_l[w] * weight[w] : 0.f;
  }
  const float inv = 1.f / total;
  for (int i = threadIdx.x; i < HD; i += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w)
      if (w < warps) o += s_acc[w][i] * weight[w];
    out[(size_t)bh * HD + i] = __float2bfloat16(o * inv);
  }
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
decode_attention(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                 const __nv_bfloat16* __restrict__ v_cache, const long long* __restrict__ pos_dev,
                 __nv_bfloat16* __restrict__ out, int nh, int nkv, int hd, int capacity,
                 float scale) {
  long long last = *pos_dev;
  if (last >= capacity) last = capacity - 1;
  if (last < 0) last = 0;
  const int keys = (int)last + 1;
  switch (hd) {
    case 32: decode_attention_hd<32>(q, k_cache, v_cache, keys, out, nh, nkv, capacity, scale); break;
    case 64: decode_attention_hd<64>(q, k_cache, v_cache, keys, out, nh, nkv, capacity, scale); break;
    default: decode_attention_hd<128>(q, k_cache, v_cache, keys, out, nh, nkv, capacity, scale); break;
  }
}
