// Rotary embeddings (HF's rotate-half layout) fused with the head split of the stacked q/k/v
// projection: one pass reads each token's row of the one qkv GEMM and writes q and k rotated
// and v, head-major as attention takes them; the backward is the inverse rotation, writing
// the gradient of the qkv row in one pass. fp32 arithmetic, bf16 in and out.
//
// qkv, dqkv: [B * T, (nh + 2 nkv) hd] row-major (q heads, then k heads, then v heads).
// q, dq: [B, nh, T, hd]; k, v, dk, dv: [B, nkv, T, hd], contiguous.
// cos, sin: [max_seq, hd] f32 (kernels/src/fused/rope.rs): cos over both halves, and sin with
// its first half negated, so the rotation of a pair (x1 = x[i], x2 = x[i + hd/2]) at position
// p is y1 = x1 c - x2 s, y2 = x2 c + x1 s with c = cos[p][i], s = sin[p][i + hd/2].
// One block per token row (grid B * T), ROPE_THREADS threads striding over its pairs.
#include "common.cuh"

// Where pair (head, i) of token (b, t) lives in the head-major output, and whether it rotates.
struct HeadSlot {
  __nv_bfloat16* base;
  bool rotate;
};

DEV HeadSlot head_slot(int head, int nh, int nkv, int b, int t, int t_len, int hd,
                       __nv_bfloat16* q, __nv_bfloat16* k, __nv_bfloat16* v) {
  __nv_bfloat16* out;
  int hh, nheads;
  if (head < nh) {
    out = q; hh = head; nheads = nh;
  } else if (head < nh + nkv) {
    out = k; hh = head - nh; nheads = nkv;
  } else {
    out = v; hh = head - nh - nkv; nheads = nkv;
  }
  HeadSlot s;
  s.base = out + (((size_t)b * nheads + hh) * t_len + t) * hd;
  s.rotate = head < nh + nkv;
  return s;
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qkv_fwd(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
             const float* __restrict__ sin, __nv_bfloat16* __restrict__ q,
             __nv_bfloat16* __restrict__ k, __nv_bfloat16* __restrict__ v, int t_len, int nh,
             int nkv, int hd, int pos0) {
  const int row = blockIdx.x;
  const int b = row / t_len, t = row - b * t_len;
  const int half = hd / 2;
  const int heads = nh + 2 * nkv;
  const float* c_row = cos + (size_t)(pos0 + t) * hd;
  const float* s_row = sin + (size_t)(pos0 + t) * hd + half;
  const __nv_bfloat16* in = qkv + (size_t)row * heads * hd;
  for (int p = threadIdx.x; p < heads * half; p += ROPE_THREADS) {
    const int head = p / half, i = p - head * half;
    const __nv_bfloat16* x = in + head * hd;
    HeadSlot o = head_slot(head, nh, nkv, b, t, t_len, hd, q, k, v);
    if (o.rotate) {
      const float x1 = __bfloat162float(x[i]), x2 = __bfloat162float(x[i + half]);
      const float c = c_row[i], s = s_row[i];
      o.base[i] = __float2bfloat16(x1 * c - x2 * s);
      o.base[i + half] = __float2bfloat16(x2 * c + x1 * s);
    } else {
      o.base[i] = x[i];
      o.base[i + half] = x[i + half];
    }
  }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qkv_bwd(const __nv_bfloat16* __restrict__ dq, const __nv_bfloat16* __restrict__ dk,
             const __nv_bfloat16* __restrict__ dv, const float* __restrict__ cos,
             const float* __restrict__ sin, __nv_bfloat16* __restrict__ dqkv, int t_len, int nh,
             int nkv, int hd, int pos0) {
  const int row = blockIdx.x;
  const int b = row / t_len, t = row - b * t_len;
  const int half = hd / 2;
  const int heads = nh + 2 * nkv;
  const float* c_row = cos + (size_t)(pos0 + t) * hd;
  const float* s_row = sin + (size_t)(pos0 + t) * hd + half;
  __nv_bfloat16* out = dqkv + (size_t)row * heads * hd;
  for (int p = threadIdx.x; p < heads * half; p += ROPE_THREADS) {
    const int head = p / half, i = p - head * half;
    __nv_bfloat16* dx = out + head * hd;
    // The const inputs, addressed as the forward's outputs were.
    HeadSlot g = head_slot(head, nh, nkv, b, t, t_len, hd, const_cast<__nv_bfloat16*>(dq),
                           const_cast<__nv_bfloat16*>(dk), const_cast<__nv_bfloat16*>(dv));
    if (g.rotate) {
      const float g1 = __bfloat162float(g.base[i]), g2 = __bfloat162float(g.base[i + half]);
      const float c = c_row[i], s = s_row[i];
      dx[i] = __float2bfloat16(g1 * c + g2 * s);
      dx[i + half] = __float2bfloat16(g2 * c - g1 * s);
    } else {
      dx[i] = g.base[i];
      dx[i + half] = g.base[i + half];
    }
  }
}

// The inference form: q rotated into q [B, nh, T, hd]; k rotated and v copied straight into
// the KV cache k_cache, v_cache [B, nkv, capacity, hd] at positions pos..pos + T, where pos is
// read on the device (*pos_dev), so one captured decode step serves every position. Rows
// whose position is past the tables or the cache write nothing (the caller bounds the length).
// Grid (B * T, chunks): block y takes pairs y * ROPE_THREADS + i, striding by the grid's
// width, so a decode step's single row is spread over several SMs.
extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qkv_cache(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
               const float* __restrict__ sin, __nv_bfloat16* __restrict__ q,
               __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache,
               const long long* __restrict__ pos_dev, int t_len, int nh, int nkv, int hd,
               int capacity, int positions) {
  const int row = blockIdx.x;
  const int b = row / t_len, t = row - b * t_len;
  const long long pos = *pos_dev + t;
  if (pos < 0 || pos >= capacity || pos >= positions) return;
  const int half = hd / 2;
  const int heads = nh + 2 * nkv;
  const float* c_row = cos + (size_t)pos * hd;
  const float* s_row = sin + (size_t)pos * hd + half;
  const __nv_bfloat16* in = qkv + (size_t)row * heads * hd;
  for (int p = blockIdx.y * ROPE_THREADS + threadIdx.x; p < heads * half;
       p += ROPE_THREADS * gridDim.y) {
    const int head = p / half, i = p - head * half;
    const __nv_bfloat16* x = in + head * hd;
    __nv_bfloat16* out;
    if (head < nh) {
      out = q + (((size_t)b * nh + head) * t_len + t) * hd;
    } else if (head < nh + nkv) {
      out = k_cache + (((size_t)b * nkv + (head - nh)) * capacity + pos) * hd;
    } else {
      out = v_cache + (((size_t)b * nkv + (head - nh - nkv)) * capacity + pos) * hd;
    }
    if (head < nh + nkv) {
      const float x1 = __bfloat162float(x[i]), x2 = __bfloat162float(x[i + half]);
      const float c = c_row[i], s = s_row[i];
      out[i] = __float2bfloat16(x1 * c - x2 * s);
      out[i + half] = __float2bfloat16(x2 * c + x1 * s);
    } else {
      out[i] = x[i];
      out[i + half] = x[i + half];
    }
  }
}
