// Shared by every kernel file: the NVRTC prelude, the constants Rust also uses, bf16 helpers and
// warp reductions. nvcc finds it beside the .cu files that include it; for NVRTC the
// crate puts its text in place of that #include line (kernels/src/cuda/image.rs), so both
// compile the same source.
#ifndef SPARSE_TRAIN_COMMON_CUH
#define SPARSE_TRAIN_COMMON_CUH

#include <cuda_bf16.h>
#ifdef __CUDACC_RTC__
// NVRTC (run-time compilation) has no C library headers.
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#define DEV __device__ __forceinline__

// BEGIN SHARED CONSTANTS
// build.rs turns every `#define NAME <integer>` line between these markers into
// `pub const NAME: i64` (crate::cuda::consts), so Rust launches with the same numbers.
//
// TwELL: H is cut into tiles of TILE_COLS columns; the kernels take up to MAX_TILES tiles
// (H <= 65536, the 16-bit column index of an entry).
#define TILE_COLS 256
#define MAX_TILES 256
// The TwELL control words (int[CTRL_WORDS], zeroed once at allocation; twell.cu's header says
// who writes which).
#define CTRL_WORDS 8
#define CTRL_SPILL 0
#define CTRL_STATUS 1
#define CTRL_NEXTRA 2
#define CTRL_NSLOTS 3
#define CTRL_NEXT 4
#define CTRL_LAST_STATUS 5
#define CTRL_LAST_SPILL 6
// ctrl[CTRL_STATUS] bit: the spill buffer was full.
#define STATUS_SPILL_FULL 1
// Token rows per block of the gate GEMMs (mma.sync and wgmma).
#define GATE_ROWS 128
// Block sizes and dynamic shared memory of the TwELL kernels.
#define GEMM_THREADS 256
#define GEMM_SMEM_BYTES 98304
#define WGMMA_THREADS 384
#define WGMMA_SMEM_BYTES 197632
// K columns per stage of the wgmma gate: the inner box of its TMA maps (64 bf16 = one 128-B
// swizzle row).
#define WGMMA_K_TILE 64
#define SKINNY_THREADS 128
#define SKINNY_TOKENS 64
#define SKINNY_UNITS 32
#define PACK_THREADS 256
#define PLAN_THREADS 256
#define UPDOWN_THREADS 256
// The hybrid control words (int[HCTRL_WORDS]) and their status bits.
#define HCTRL_WORDS 16
#define HC_STATUS 0
#define HC_NNZ 1
#define HC_GSPILL 2
#define HC_ORDER 4
#define ST_GATE_SPILL 1
#define ST_NNZ_OVER 2
// Hybrid counting sort: tokens per block (one bit each in a 32-bit mask) and blocks per scan
// segment.
#define HYB_BLK 32
#define HYB_SEG 16
// Block sizes of the hybrid kernels: most take HYB_THREADS, the single-block scans
// HYB_SCAN_THREADS, the weight-gradient kernel HYB_BWD_W_THREADS over HYB_BWD_W_SLICE columns.
#define HYB_THREADS 256
#define HYB_SCAN_THREADS 1024
#define HYB_BWD_W_THREADS 128
#define HYB_BWD_W_SLICE 256
// 16-byte granules (8 bf16) of an output row per thread in the token-row kernels
// (twell_updown_gated, twell_down, hyb_fwd, hyb_bwd_tok) and in their _wide variants, which
// thus take D <= threads * 8 * granules.
#define ROW_GRANULES 1
#define ROW_GRANULES_WIDE 4
// Threads per token row of the RoPE kernels (rope.cu).
#define ROPE_THREADS 256
// The fused residual add + RMSNorm (norm.cu): threads per block, token rows per block, and
// 4-column granules per thread (so D <= NORM_THREADS * 4 * NORM_MAX_GRANULES).
#define NORM_THREADS 256
#define NORM_ROWS 16
#define NORM_MAX_GRANULES 8
// Decode attention (attention.cu): threads per (sequence, head) block.
#define ATTN_THREADS 256
// Cross-entropy over logit rows (cross_entropy.cu): threads per row's block.
#define CE_THREADS 1024
// The dense FFN's gating (gating.cu): threads per block, and token rows per forward block (<= 255:
// the per-block unit counts are bytes).
#define GATING_THREADS 256
#define GATING_ROWS 16
// Decode-sized products (decode.cu): at most DECODE_MAX_TOKENS token rows; the row products take
// DECODE_THREADS threads a block, DECODE_WARP_ROWS weight rows a warp; the FFN's down product
// DECODE_DOWN_THREADS threads over DECODE_DOWN_GRANULES 16-byte granules of the output row, and
// gathers the units that fire from DECODE_DOWN_ROUND units of h at a time.
#define DECODE_MAX_TOKENS 8
#define DECODE_THREADS 128
#define DECODE_WARP_ROWS 2
#define DECODE_DOWN_THREADS 256
#define DECODE_DOWN_GRANULES 32
#define DECODE_DOWN_ROUND 6144
// END SHARED CONSTANTS

// A tile's spill-slot word when the spill buffer was full.
#define SPILL_NONE 0xFFFFFFFFu

// ------------------------------------------------------------------------------------------
// bf16 helpers: the low and high bf16 of a 32-bit word as float, a bf16 from its bits, and two
// floats rounded to a bf16 pair.
DEV float bf_lo(uint32_t w) { return __uint_as_float(w << 16); }
DEV float bf_hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }
DEV float bf16f(uint16_t b) { return __uint_as_float((uint32_t)b << 16); }
DEV uint32_t pack_bf2(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
// Eight floats rounded to bf16 and stored as granule gi (16 bytes) of the row `out`.
DEV void store_bf16x8(__nv_bfloat16* out, int gi, const float* a) {
  uint4 o;
  o.x = pack_bf2(a[0], a[1]);
  o.y = pack_bf2(a[2], a[3]);
  o.z = pack_bf2(a[4], a[5]);
  o.w = pack_bf2(a[6], a[7]);
  reinterpret_cast<uint4*>(out)[gi] = o;
}
// acc[0..8) += a * the eight bf16 of w.
DEV void axpy8(float* acc, float a, uint4 w) {
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[2 * j] = fmaf(a, bf_lo(ww[j]), acc[2 * j]);
    acc[2 * j + 1] = fmaf(a, bf_hi(ww[j]), acc[2 * j + 1]);
  }
}

// acc[0..8) += sum over idx < L of h[idx] * granule gi of row rows[idx] of W ([*, D] bf16,
// row-major), four gathered rows in flight.
DEV void gather_axpy8(float* acc, const float* h, const int* rows, int L, const __nv_bfloat16* __restrict__ W,
                      int D, int gi) {
  int idx = 0;
  for (; idx + 4 <= L; idx += 4) {
    uint4 w[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) w[u] = __ldg(reinterpret_cast<const uint4*>(W + (size_t)rows[idx + u] * D) + gi);
#pragma unroll
    for (int u = 0; u < 4; ++u) axpy8(acc, h[idx + u], w[u]);
  }
  for (; idx < L; ++idx) axpy8(acc, h[idx], __ldg(reinterpret_cast<const uint4*>(W + (size_t)rows[idx] * D) + gi));
}
// The same over a block's output row: thread tid owns granules tid + q*THREADS of acc[GPT][8].
template <int GPT, int THREADS>
DEV void gather_axpy_row(float (&acc)[GPT][8], const float* h, const int* rows, int L,
                         const __nv_bfloat16* __restrict__ W, int D, int tid, int G8) {
#pragma unroll
  for (int q = 0; q < GPT; ++q) {
    const int gi = tid + q * THREADS;
    if (gi < G8) gather_axpy8(acc[q], h, rows, L, W, D, gi);
  }
}
// A block's output row `out` (D bf16) from acc[GPT][8]: thread tid owns granules tid + q*THREADS.
template <int GPT, int THREADS>
DEV void store_row(__nv_bfloat16* out, const float (&acc)[GPT][8], int tid, int G8) {
#pragma unroll
  for (int q = 0; q < GPT; ++q) {
    const int gi = tid + q * THREADS;
    if (gi < G8) store_bf16x8(out, gi, acc[q]);
  }
}

// Copies the bf16 row src (G8 granules of 8) into shared memory dst, the block's THREADS
// threads striding over the granules.
template <int THREADS>
DEV void block_load_row(__nv_bfloat16* dst, const __nv_bfloat16* __restrict__ src, int G8, int tid) {
  const uint4* s = reinterpret_cast<const uint4*>(src);
  for (int i = tid; i < G8; i += THREADS) reinterpret_cast<uint4*>(dst)[i] = __ldg(s + i);
}
// Zeroes a register accumulator (fully unrolled, so it stays in registers).
template <int A, int B>
DEV void zero_fill(float (&a)[A][B]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j) a[i][j] = 0.f;
}
template <int A, int B, int C>
DEV void zero_fill(float (&a)[A][B][C]) {
#pragma unroll
  for (int i = 0; i < A; ++i) zero_fill(a[i]);
}

// ------------------------------------------------------------------------------------------
// Warp reductions and scans (full warp).
DEV int warp_sum(int v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
DEV float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
// Inclusive prefix sum over the lanes.
DEV int warp_inclusive_scan(int v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += y;
  }
  return v;
}
// Exclusive prefix of the tile counts cnt(i), i < ntiles, into pre[0..ntiles] (pre[ntiles] =
// total, written by lane 0), 32 tiles per step; returns the total in every lane.
template <class Count>
DEV int warp_tile_prefix(Count cnt, int ntiles, int* pre, int lane) {
  int carry = 0;
  for (int i0 = 0; i0 < ntiles; i0 += 32) {
    const int i = i0 + lane;
    const int c = i < ntiles ? cnt(i) : 0;
    const int incl = warp_inclusive_scan(c, lane);
    if (i < ntiles) pre[i] = carry + incl - c;
    carry += __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) pre[ntiles] = carry;
  return carry;
}
// Two dot products of the shared bf16 vector vs with the bf16 rows r1, r2 (G8 granules of 8);
// the sums in every lane.
DEV void warp_dot2(const __nv_bfloat16* vs, const __nv_bfloat16* __restrict__ r1,
                   const __nv_bfloat16* __restrict__ r2, int G8, int lane, float& s1, float& s2) {
  const uint4* w1 = reinterpret_cast<const uint4*>(r1);
  const uint4* w2 = reinterpret_cast<const uint4*>(r2);
  s1 = 0.f;
  s2 = 0.f;
#pragma unroll 4
  for (int gi = lane; gi < G8; gi += 32) {
    const uint4 xa = reinterpret_cast<const uint4*>(vs)[gi];
    const uint4 p = __ldg(w1 + gi);
    const uint4 q = __ldg(w2 + gi);
    const uint32_t xw[4] = {xa.x, xa.y, xa.z, xa.w};
    const uint32_t pw[4] = {p.x, p.y, p.z, p.w};
    const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float xl = bf_lo(xw[j]), xh = bf_hi(xw[j]);
      s1 = fmaf(xl, bf_lo(pw[j]), s1);
      s1 = fmaf(xh, bf_hi(pw[j]), s1);
      s2 = fmaf(xl, bf_lo(qw[j]), s2);
      s2 = fmaf(xh, bf_hi(qw[j]), s2);
    }
  }
#pragma unroll
  for (int off = 16; off; off >>= 1) {
    s1 += __shfl_xor_sync(0xffffffffu, s1, off);
    s2 += __shfl_xor_sync(0xffffffffu, s2, off);
  }
}

// warp_dot2 over the gathered rows rows[idx] and rows[idx + WARPS] of W ([*, D] bf16): the
// two entries a warp takes at once. Returns whether the second is real (idx + WARPS < L);
// when it is not, s2 repeats the first row's product and must be ignored.
template <int WARPS>
DEV bool warp_dot2_gathered(const __nv_bfloat16* vs, const __nv_bfloat16* __restrict__ W, const int* rows, int idx,
                            int L, int D, int G8, int lane, float& s1, float& s2) {
  const int idx2 = idx + WARPS;
  const bool two = idx2 < L;
  warp_dot2(vs, W + (size_t)rows[idx] * D, W + (size_t)rows[two ? idx2 : idx] * D, G8, lane, s1, s2);
  return two;
}

#endif  // SPARSE_TRAIN_COMMON_CUH
