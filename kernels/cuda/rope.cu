// Rotary embeddings (HF's rotate-half layout) fused with the split of the stacked q/k/v
// projection: one pass reads each token's row of the one qkv GEMM and writes q and k rotated
// and v; the backward is the inverse rotation, writing the gradient of the qkv row in one
// pass. fp32 arithmetic, bf16 in and out.
//
// qkv, dqkv: [B * T, (nh + 2 nkv) hd] row-major (q heads, then k heads, then v heads).
// q, dq: [B, T, nh, hd]; k, v, dk, dv: [B, T, nkv, hd], contiguous: token-major, which
// attention takes as [B, heads, T, hd] views (cuDNN's attention then writes its output
// token-major too, as the output projection reads it, and takes its gradient without a copy).
// The inference form below writes q head-major and k, v into the KV cache.
// cos, sin: [max_seq, hd] f32 (kernels/src/fused/rope.rs): cos over both halves, and sin with
// its first half negated, so the rotation of a pair (x1 = x[i], x2 = x[i + hd/2]) at position
// p is y1 = x1 c - x2 s, y2 = x2 c + x1 s with c = cos[p][i], s = sin[p][i + hd/2].
// One block per token row (grid B * T), ROPE_THREADS threads striding over its pairs, four
// at a time (8-byte accesses) when hd % 8 == 0.
#include "common.cuh"

// Where pair (head, i) of token (b, t) lives in the token-major output, and whether it rotates.
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
  s.base = out + (((size_t)b * t_len + t) * nheads + hh) * hd;
  s.rotate = head < nh + nkv;
  return s;
}

// W consecutive bf16 at p as floats, and back (W = 4: one 8-byte access).
template <int W>
DEV void load_bf16(const __nv_bfloat16* p, float* out) {
  if constexpr (W == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    out[0] = bf_lo(u.x); out[1] = bf_hi(u.x); out[2] = bf_lo(u.y); out[3] = bf_hi(u.y);
  } else {
    out[0] = __bfloat162float(p[0]);
  }
}
template <int W>
DEV void store_bf16(__nv_bfloat16* p, const float* v) {
  if constexpr (W == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf2(v[0], v[1]), pack_bf2(v[2], v[3]));
  } else {
    p[0] = __float2bfloat16(v[0]);
  }
}

// Pairs i..i+W of one head, x1 = src[i..], x2 = src[i + half..], into dst: rotated,
// y1 = x1 c - sgn x2 s, y2 = x2 c + sgn x1 s (sgn 1 forward, -1 for the inverse), or copied.
template <int W>
DEV void rotate_pairs(const __nv_bfloat16* src, __nv_bfloat16* dst, int i, int half, bool rotate,
                      const float* c_row, const float* s_row, float sgn) {
  float x1[W], x2[W];
  load_bf16<W>(src + i, x1);
  load_bf16<W>(src + i + half, x2);
  if (rotate) {
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const float c = c_row[i + e], s = sgn * s_row[i + e];
      const float y1 = x1[e] * c - x2[e] * s, y2 = x2[e] * c + x1[e] * s;
      x1[e] = y1;
      x2[e] = y2;
    }
  }
  store_bf16<W>(dst + i, x1);
  store_bf16<W>(dst + i + half, x2);
}

// One token row: the forward (qkv row -> token-major q, k, v) or the inverse (their
// gradients -> the qkv row's), W pairs per step (4 when hd % 8 == 0: 8-byte accesses).
template <int W, bool INVERSE>
DEV void rope_row(const __nv_bfloat16* __restrict__ row_in, __nv_bfloat16* __restrict__ row_out,
                  const float* __restrict__ cos, const float* __restrict__ sin, __nv_bfloat16* q,
                  __nv_bfloat16* k, __nv_bfloat16* v, int t_len, int nh, int nkv, int hd,
                  int pos0) {
  const int row = blockIdx.x;
  const int b = row / t_len, t = row - b * t_len;
  const int half = hd / 2, steps = half / W;
  const int heads = nh + 2 * nkv;
  const float* c_row = cos + (size_t)(pos0 + t) * hd;
  const float* s_row = sin + (size_t)(pos0 + t) * hd + half;
  for (int p = threadIdx.x; p < heads * steps; p += ROPE_THREADS) {
    const int head = p / steps, i = (p - head * steps) * W;
    HeadSlot o = head_slot(head, nh, nkv, b, t, t_len, hd, q, k, v);
    if (INVERSE) {
      rotate_pairs<W>(o.base, row_out + head * hd, i, half, o.rotate, c_row, s_row, -1.f);
    } else {
      rotate_pairs<W>(row_in + head * hd, o.base, i, half, o.rotate, c_row, s_row, 1.f);
    }
  }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qkv_fwd(const __nv_bfloat16* __restrict__ qkv, const float* __restrict__ cos,
             const float* __restrict__ sin, __nv_bfloat16* __restrict__ q,
             __nv_bfloat16* __restrict__ k, __nv_bfloat16* __restrict__ v, int t_len, int nh,
             int nkv, int hd, int pos0) {
  const __nv_bfloat16* in = qkv + (size_t)blockIdx.x * (nh + 2 * nkv) * hd;
  if (hd % 8 == 0) {
    rope_row<4, false>(in, nullptr, cos, sin, q, k, v, t_len, nh, nkv, hd, pos0);
  } else {
    rope_row<1, false>(in, nullptr, cos, sin, q, k, v, t_len, nh, nkv, hd, pos0);
  }
}

extern "C" __global__ void __launch_bounds__(ROPE_THREADS)
rope_qkv_bwd(const __nv_bfloat16* __restrict__ dq, const __nv_bfloat16* __restrict__ dk,
             const __nv_bfloat16* __restrict__ dv, const float* __restrict__ cos,
             const float* __restrict__ sin, __nv_bfloat16* __restrict__ dqkv, int t_len, int nh,
             int nkv, int hd, int pos0) {
  __nv_bfloat16* out = dqkv + (size_t)blockIdx.x * (nh + 2 * nkv) * hd;
  // The const gradients, addressed as the forward's outputs were.
  auto g = [](const __nv_bfloat16* p) { return const_cast<__nv_bfloat16*>(p); };
  if (hd % 8 == 0) {
    rope_row<4, true>(nullptr, out, cos, sin, g(dq), g(dk), g(dv), t_len, nh, nkv, hd, pos0);
  } else {
    rope_row<1, true>(nullptr, out, cos, sin, g(dq), g(dk), g(dv), t_len, nh, nkv, hd, pos0);
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
