// Hybrid training kernels for the sparse gated FFN (forward AND backward), exact on every row.
//
//   g = x Wg^T, P = g > 0, u = x Wu^T at P, h = relu(g) * u, y = h WdT, l1_sum = sum |h|
//   backward (dy, dl1): dh = dy . WdT[j] + dl1 sign(h) at P; du = dh g; dg = dh u;
//   dx = du Wu + dg Wg; dWu[j] = sum_t du_tj x_t; dWg[j] = sum_t dg_tj x_t; dWdT[j] = sum_t h_tj dy_t.
//
// Format. The gate GEMM is twell.cu's (TwELL tiles + exact spill, C = 8). From it the forward
// builds a compact, exact, token-major CSR of the actives (no fixed row width: a row can hold
// all H units) and its unit-major transpose (CSC), both in a pool of `cap` entries:
//   row_ptr [N+1]  entries of token t are e in [row_ptr[t], row_ptr[t+1]), sorted by column
//   ecol [cap] int32 unit j, eg [cap] bf16 relu(g), eu [cap] fp32 u       (saved for backward)
//   unit_ptr [H+1], cpos [cap] int32: entry e's place p in the unit-major order (entries of
//   unit j at p in [unit_ptr[j], unit_ptr[j+1]), sorted by token; deterministic: a counting
//   sort whose rank inside a 32-token block comes from a bitmask, not atomics). The backward
//   writes each entry's gradient record at p, so the weight-gradient kernel reads a unit's
//   records contiguously, with no index to follow first.
//   uspan [H] int4 {j, unit_ptr[j], unit_ptr[j+1], 0}, units heaviest first (the
//   weight-gradient kernel's schedule, with each unit's span so that a block reads it in one
//   load; numerics do not depend on the order).
// If the pool is too small (total actives > cap), hctrl[HC_STATUS] gets ST_NNZ_OVER, every
// later kernel returns without touching memory, and the caller grows the pool and reruns
// (hctrl[HC_NNZ] is the size needed). If the gate's spill buffer was full, ST_GATE_SPILL.
// Nothing is ever dropped: either the result is exact or the status says rerun.
//
// Kernels (extern "C"), launch order:
//   forward : twell gate -> hyb_count -> hyb_segscan -> hyb_unitscan -> hyb_scan -> hyb_fill
//             -> hyb_fwd[_wide] -> hyb_l1
//   backward: hyb_bwd_tok[_wide] (dh, du, dg per entry + dx) -> hyb_bwd_w[_acc] (dWg, dWu, dWdT)
// Shapes: x, dy [N, D]; Wg, Wu, WdT [H, D] row-major bf16; D % 8 == 0, D <= 2048 (<= 8192 with
// the _wide variants); H <= 65536; N >= 1 (any). fp32 accumulation everywhere; deterministic.
#include "common.cuh"

// Indices and status bits of hctrl (int[HCTRL_WORDS], HC_ORDER..+31 scratch), the counting sort
// sizes (HYB_BLK, HYB_SEG) and the block sizes: common.cuh.
#define BLK HYB_BLK
#define SEG HYB_SEG
// Loads in flight per warp in the weight-gradient kernel hyb_bwd_w; -D overrides it to try others.
#ifndef HYB_BWD_W_UNR
#define HYB_BWD_W_UNR 8
#endif
// Blocks per SM the weight-gradient kernel is compiled for (its register budget: 4 leaves 128
// registers a thread, 25 % occupancy); -D overrides it. 6 with UNR 2 (78 registers) ran the
// kernel 8 % faster in bench ffn but the 1.5b trainer 2 % slower (docs/kernel-notes.md).
#ifndef HYB_BWD_W_MINBLOCKS
#define HYB_BWD_W_MINBLOCKS 4
#endif

// ------------------------------------------------------------------------------------------
// TwELL reading (one warp per token). Builds the warp-private prefix of tile counts `pre`
// (ntiles+1 ints, shared) and returns the token's number of actives.
DEV int tw_prefix(const uint32_t* __restrict__ twell, int t, int ntiles, int TW, int* pre, int lane) {
  const auto count = [&](int i) { return (int)__ldg(twell + ((size_t)t * ntiles + i) * TW); };
  const int total = warp_tile_prefix(count, ntiles, pre, lane);
  __syncwarp();
  return total;
}
// a-th active of token t (tile-major, column-sorted inside a tile => column-sorted overall).
DEV uint32_t tw_entry(const uint32_t* __restrict__ twell, const uint32_t* __restrict__ spill, int t, int ntiles,
                      int TW, const int* pre, int a) {
  int lo = 0, hi = ntiles - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (pre[mid] <= a) lo = mid; else hi = mid - 1;
  }
  const int k = a - pre[lo], c = pre[lo + 1] - pre[lo];
  const uint32_t* tw = twell + ((size_t)t * ntiles + lo) * TW;
  if (c <= TW - 1) return __ldg(tw + 1 + k);
  const uint32_t slot = __ldg(tw + 1);
  return slot == SPILL_NONE ? 0u : __ldg(spill + (size_t)slot * TILE_COLS + k);
}

static_assert(HYB_THREADS == 256 && HYB_BLK == 32, "8 warps over a block of 32 tokens (one mask bit each)");
// Marks, for the block's 32 tokens, bit tl of mask[j] for every active (tl, j). Returns nothing;
// row_cnt written when non-null. Block = 256 threads, warp w takes tokens w, w+8, w+16, w+24.
DEV void block_masks(const uint32_t* __restrict__ twell, const uint32_t* __restrict__ spill, int N, int H,
                     int ntiles, int TW, uint32_t* mask, int (*pre)[MAX_TILES + 1], int* row_cnt) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = blockIdx.x * BLK;
  for (int j = tid; j < H; j += blockDim.x) mask[j] = 0;
  __syncthreads();
  for (int tl = warp; tl < BLK; tl += 8) {
    const int t = t0 + tl;
    if (t >= N) break;
    const int total = tw_prefix(twell, t, ntiles, TW, pre[warp], lane);
    if (row_cnt && lane == 0) row_cnt[t] = total;
    for (int a = lane; a < total; a += 32) {
      const uint32_t ent = tw_entry(twell, spill, t, ntiles, TW, pre[warp], a);
      atomicOr(&mask[ent & 0xFFFFu], 1u << tl);
    }
    __syncwarp();
  }
  __syncthreads();
}

// K1: per-token counts and per-(block, unit) counts (uint8, <= 32). Dynamic smem: H * 4 bytes.
extern "C" __global__ void __launch_bounds__(HYB_THREADS) hyb_count(const uint32_t* __restrict__ twell,
                                                            const uint32_t* __restrict__ spill, int N, int H,
                                                            int ntiles, int TW, int* row_cnt, uint8_t* blkcnt) {
  extern __shared__ uint32_t mask[];
  __shared__ int pre[8][MAX_TILES + 1];
  block_masks(twell, spill, N, H, ntiles, TW, mask, pre, row_cnt);
  uint8_t* out = blkcnt + (size_t)blockIdx.x * H;
  for (int j = threadIdx.x; j < H; j += blockDim.x) out[j] = (uint8_t)__popc(mask[j]);
}

// K2a: inside each segment of SEG blocks, exclusive offsets per unit (uint16) and segment totals.
// grid (ceil(H/256), nseg), 256 threads.
extern "C" __global__ void __launch_bounds__(HYB_THREADS) hyb_segscan(const uint8_t* __restrict__ blkcnt, uint16_t* boff,
                                                              int* segtot, int nblk, int H) {
  const int j = blockIdx.x * HYB_THREADS + threadIdx.x, s = blockIdx.y;
  if (j >= H) return;
  const int b0 = s * SEG, b1 = min(nblk, b0 + SEG);
  uint8_t c[SEG];
#pragma unroll
  for (int i = 0; i < SEG; ++i) c[i] = b0 + i < b1 ? blkcnt[(size_t)(b0 + i) * H + j] : 0;
  int run = 0;
#pragma unroll
  for (int i = 0; i < SEG; ++i) {
    if (b0 + i < b1) boff[(size_t)(b0 + i) * H + j] = (uint16_t)run;
    run += c[i];
  }
  segtot[(size_t)s * H + j] = run;
}

// K2b: per unit, exclusive offsets of the segments (in place) and unit totals. Thread per unit.
extern "C" __global__ void __launch_bounds__(HYB_THREADS) hyb_unitscan(int* segoff, int* unit_cnt, int nseg, int H) {
  const int j = blockIdx.x * HYB_THREADS + threadIdx.x;
  if (j >= H) return;
  int run = 0;
  int s = 0;
  for (; s + 8 <= nseg; s += 8) {
    int c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = segoff[(size_t)(s + i) * H + j];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      segoff[(size_t)(s + i) * H + j] = run;
      run += c[i];
    }
  }
  for (; s < nseg; ++s) {
    const int c = segoff[(size_t)s * H + j];
    segoff[(size_t)s * H + j] = run;
    run += c;
  }
  unit_cnt[j] = run;
}

// Exclusive scan of in[0..n) into out[0..n], out[n] = total, by one block of 1024 threads.
DEV int block_scan(const int* in, int* out, int n, int* sh) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int per = (n + nt - 1) / nt;
  const int a0 = min(n, tid * per), a1 = min(n, a0 + per);
  int s = 0;
  for (int i = a0; i < a1; ++i) s += in[i];
  sh[tid] = s;
  __syncthreads();
  for (int off = 1; off < nt; off <<= 1) {
    const int v = tid >= off ? sh[tid - off] : 0;
    __syncthreads();
    sh[tid] += v;
    __syncthreads();
  }
  int run = sh[tid] - s;
  const int total = sh[nt - 1];
  for (int i = a0; i < a1; ++i) {
    const int c = in[i];
    out[i] = run;
    run += c;
  }
  if (tid == 0) out[n] = total;
  __syncthreads();
  return total;
}

// K3: one block of 1024 threads. row_ptr, unit_ptr, capacity check, gate status, unit order
// with the units' spans.
extern "C" __global__ void __launch_bounds__(HYB_SCAN_THREADS) hyb_scan(const int* row_cnt, int* row_ptr, const int* unit_cnt,
                                                            int* unit_ptr, int4* uspan, int N, int H, int cap,
                                                            int* gctrl, int* hctrl) {
  __shared__ int sh[HYB_SCAN_THREADS];
  __shared__ int bcnt[32], bpos[32];
  const int tid = threadIdx.x;
  const int nnz = block_scan(row_cnt, row_ptr, N, sh);
  block_scan(unit_cnt, unit_ptr, H, sh);
  if (tid < 32) bcnt[tid] = 0;
  if (tid == 0) {
    int st = 0;
    if (gctrl[CTRL_STATUS] != 0) st |= ST_GATE_SPILL;
    if (nnz > cap) st |= ST_NNZ_OVER;
    hctrl[HC_STATUS] = st;
    hctrl[HC_NNZ] = nnz;
    hctrl[HC_GSPILL] = gctrl[CTRL_SPILL];
    gctrl[CTRL_SPILL] = 0;  // spill slot counter and status of the gate, for the next forward
    gctrl[CTRL_STATUS] = 0;
  }
  __syncthreads();
  // heaviest first: bucket = 31 - floor(log2(cnt + 1)); placement inside a bucket is by atomics
  // (order of units does not change any result).
  for (int j = tid; j < H; j += blockDim.x) atomicAdd(&bcnt[__clz(unit_cnt[j] + 1)], 1);
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int b = 0; b < 32; ++b) {
      bpos[b] = run;
      run += bcnt[b];
    }
  }
  __syncthreads();
  // unit_ptr was written by this block before the barriers above: visible here.
  for (int j = tid; j < H; j += blockDim.x)
    uspan[atomicAdd(&bpos[__clz(unit_cnt[j] + 1)], 1)] = make_int4(j, unit_ptr[j], unit_ptr[j + 1], 0);
}

// K4: fill CSR (ecol, eg) and the unit-major places (cpos[e] = p). Grid nblk, 256 threads, dynamic smem H * 4.
extern "C" __global__ void __launch_bounds__(HYB_THREADS) hyb_fill(const uint32_t* __restrict__ twell,
                                                           const uint32_t* __restrict__ spill, int N, int H,
                                                           int ntiles, int TW, const int* __restrict__ row_ptr,
                                                           const int* __restrict__ unit_ptr,
                                                           const uint16_t* __restrict__ boff,
                                                           const int* __restrict__ segoff, const int* hctrl,
                                                           int* ecol, uint16_t* eg, int* cpos) {
  extern __shared__ uint32_t mask[];
  __shared__ int pre[8][MAX_TILES + 1];
  if (hctrl[HC_STATUS] & ST_NNZ_OVER) return;
  block_masks(twell, spill, N, H, ntiles, TW, mask, pre, nullptr);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.x, t0 = b * BLK, s = b / SEG;
  for (int tl = warp; tl < BLK; tl += 8) {
    const int t = t0 + tl;
    if (t >= N) break;
    const int total = tw_prefix(twell, t, ntiles, TW, pre[warp], lane);
    const int e0 = row_ptr[t];
    const uint32_t below = (1u << tl) - 1u;
    for (int a = lane; a < total; a += 32) {
      const uint32_t ent = tw_entry(twell, spill, t, ntiles, TW, pre[warp], a);
      const int j = (int)(ent & 0xFFFFu);
      const int e = e0 + a;
      ecol[e] = j;
      eg[e] = (uint16_t)(ent >> 16);
      const int pos = unit_ptr[j] + segoff[(size_t)s * H + j] + (int)boff[(size_t)b * H + j] +
                      __popc(mask[j] & below);
      cpos[e] = pos;
    }
    __syncwarp();
  }
}

// ------------------------------------------------------------------------------------------
// Token-major kernels: one CTA (256 threads) per token; the token's D-vector (x or dy) in shared
// memory; entries in chunks of LCAP; phase 1: one warp per entry, a dot product with a gathered
// weight row; phase 2: each thread owns 8 columns (x GPT) of the output row and streams gathered
// weight rows (coalesced 16-B loads).
namespace tk {
constexpr int THREADS = HYB_THREADS, WARPS = THREADS / 32, LCAP = 64;
}

// Forward: u, h, y, per-token l1. Saves eu.
template <int GPT>
DEV void fwd_body(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ Wu,
                  const __nv_bfloat16* __restrict__ WdT, const int* __restrict__ row_ptr,
                  const int* __restrict__ ecol, const uint16_t* __restrict__ eg, float* eu, __nv_bfloat16* y,
                  float* l1_tok, const int* hctrl, int D) {
  using namespace tk;
  extern __shared__ __align__(16) unsigned char dsm[];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(dsm);
  __shared__ int lcol[LCAP];
  __shared__ float lg[LCAP], lh[LCAP];
  __shared__ float wl1[WARPS];
  if (hctrl[HC_STATUS] & ST_NNZ_OVER) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = blockIdx.x, G8 = D / 8;
  const int p0 = row_ptr[t], p1 = row_ptr[t + 1];
  block_load_row<THREADS>(xs, x + (size_t)t * D, G8, tid);
  float acc[GPT][8];
  zero_fill(acc);
  float l1 = 0.f;
  for (int s0 = p0; s0 < p1; s0 += LCAP) {
    const int L = min(LCAP, p1 - s0);
    if (tid < L) {
      lcol[tid] = __ldg(ecol + s0 + tid);
      lg[tid] = bf16f(__ldg(eg + s0 + tid));
    }
    __syncthreads();
    for (int idx = warp; idx < L; idx += 2 * WARPS) {
      const int idx2 = idx + WARPS;
      float s1, s2;
      const bool two = warp_dot2_gathered<WARPS>(xs, Wu, lcol, idx, L, D, G8, lane, s1, s2);
      if (lane == 0) {
        float h = lg[idx] * s1;
        lh[idx] = h;
        eu[s0 + idx] = s1;
        l1 += fabsf(h);
        if (two) {
          h = lg[idx2] * s2;
          lh[idx2] = h;
          eu[s0 + idx2] = s2;
          l1 += fabsf(h);
        }
      }
    }
    __syncthreads();
    gather_axpy_row<GPT, THREADS>(acc, lh, lcol, L, WdT, D, tid, G8);
    __syncthreads();
  }
  store_row<GPT, THREADS>(y + (size_t)t * D, acc, tid, G8);
  if (lane == 0) wl1[warp] = l1;
  __syncthreads();
  if (tid == 0) {
    float s = 0.f;
    for (int w = 0; w < WARPS; ++w) s += wl1[w];
    l1_tok[t] = s;
  }
}

#define FWD_ARGS                                                                                              \
  const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ Wu,                                  \
      const __nv_bfloat16 *__restrict__ WdT, const int *__restrict__ row_ptr, const int *__restrict__ ecol,     \
      const uint16_t *__restrict__ eg, float *eu, __nv_bfloat16 *y, float *l1_tok, const int *hctrl, int D
#define FWD_PASS x, Wu, WdT, row_ptr, ecol, eg, eu, y, l1_tok, hctrl, D
extern "C" __global__ void __launch_bounds__(tk::THREADS, 4) hyb_fwd(FWD_ARGS) { fwd_body<ROW_GRANULES>(FWD_PASS); }
extern "C" __global__ void __launch_bounds__(tk::THREADS, 2) hyb_fwd_wide(FWD_ARGS) { fwd_body<ROW_GRANULES_WIDE>(FWD_PASS); }

// l1_sum = sum over tokens of l1_tok, fixed order (one block of 1024 threads).
extern "C" __global__ void __launch_bounds__(HYB_SCAN_THREADS) hyb_l1(const float* l1_tok, int N, float* out, const int* hctrl) {
  __shared__ float sh[HYB_SCAN_THREADS];
  const int tid = threadIdx.x;
  float s = 0.f;
  for (int i = tid; i < N; i += HYB_SCAN_THREADS) s += l1_tok[i];
  sh[tid] = s;
  __syncthreads();
  for (int off = HYB_SCAN_THREADS / 2; off; off >>= 1) {
    if (tid < off) sh[tid] += sh[tid + off];
    __syncthreads();
  }
  if (tid == 0) out[0] = (hctrl[HC_STATUS] & ST_NNZ_OVER) ? __int_as_float(0x7fc00000) : sh[0];
}

// Backward, token-major: dh (gathered WdT rows), du, dg, rec[cpos[e]] = {du, dg, h, t}; then
// dx_t = sum du Wu[j] + dg Wg[j] (gathered Wu, Wg rows). dl1: device scalar.
template <int GPT>
DEV void bwd_tok_body(const __nv_bfloat16* __restrict__ dy, const float* __restrict__ dl1p,
                      const __nv_bfloat16* __restrict__ Wg, const __nv_bfloat16* __restrict__ Wu,
                      const __nv_bfloat16* __restrict__ WdT, const int* __restrict__ row_ptr,
                      const int* __restrict__ ecol, const uint16_t* __restrict__ eg, const float* __restrict__ eu,
                      const int* __restrict__ cpos, float4* rec, __nv_bfloat16* dx, const int* hctrl, int D) {
  using namespace tk;
  extern __shared__ __align__(16) unsigned char dsm[];
  __nv_bfloat16* ds = reinterpret_cast<__nv_bfloat16*>(dsm);
  __shared__ int lcol[LCAP], lpos[LCAP];
  __shared__ float lg[LCAP], lu[LCAP], ldu[LCAP], ldg[LCAP];
  if (hctrl[HC_STATUS] & ST_NNZ_OVER) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = blockIdx.x, G8 = D / 8;
  const float dl1 = *dl1p;
  const int p0 = row_ptr[t], p1 = row_ptr[t + 1];
  block_load_row<THREADS>(ds, dy + (size_t)t * D, G8, tid);
  float acc[GPT][8];
  zero_fill(acc);
  for (int s0 = p0; s0 < p1; s0 += LCAP) {
    const int L = min(LCAP, p1 - s0);
    if (tid < L) {
      lcol[tid] = __ldg(ecol + s0 + tid);
      lg[tid] = bf16f(__ldg(eg + s0 + tid));
      lu[tid] = __ldg(eu + s0 + tid);
      lpos[tid] = __ldg(cpos + s0 + tid);
    }
    __syncthreads();
    for (int idx = warp; idx < L; idx += 2 * WARPS) {
      const int idx2 = idx + WARPS;
      float s1, s2;
      const bool two = warp_dot2_gathered<WARPS>(ds, WdT, lcol, idx, L, D, G8, lane, s1, s2);
      if (lane < 2 && (lane == 0 || two)) {
        const int i = lane == 0 ? idx : idx2;
        const float d = lane == 0 ? s1 : s2;
        const float g = lg[i], u = lu[i], h = g * u;
        const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : 0.f);
        const float dh = d + dl1 * sg;
        const float du = dh * g, dgv = dh * u;
        ldu[i] = du;
        ldg[i] = dgv;
        rec[lpos[i]] = make_float4(du, dgv, h, __int_as_float(t));
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < GPT; ++q) {
      const int gi = tid + q * THREADS;
      if (gi < G8) {
        int idx = 0;
        for (; idx + 2 <= L; idx += 2) {
          uint4 a[2], b[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            a[u] = __ldg(reinterpret_cast<const uint4*>(Wu + (size_t)lcol[idx + u] * D) + gi);
            b[u] = __ldg(reinterpret_cast<const uint4*>(Wg + (size_t)lcol[idx + u] * D) + gi);
          }
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            axpy8(acc[q], ldu[idx + u], a[u]);
            axpy8(acc[q], ldg[idx + u], b[u]);
          }
        }
        for (; idx < L; ++idx) {
          axpy8(acc[q], ldu[idx], __ldg(reinterpret_cast<const uint4*>(Wu + (size_t)lcol[idx] * D) + gi));
          axpy8(acc[q], ldg[idx], __ldg(reinterpret_cast<const uint4*>(Wg + (size_t)lcol[idx] * D) + gi));
        }
      }
    }
    __syncthreads();
  }
  store_row<GPT, THREADS>(dx + (size_t)t * D, acc, tid, G8);
}

#define BWT_ARGS                                                                                                 \
  const __nv_bfloat16 *__restrict__ dy, const float *__restrict__ dl1p, const __nv_bfloat16 *__restrict__ Wg,     \
      const __nv_bfloat16 *__restrict__ Wu, const __nv_bfloat16 *__restrict__ WdT, const int *__restrict__ row_ptr, \
      const int *__restrict__ ecol, const uint16_t *__restrict__ eg, const float *__restrict__ eu,                 \
      const int *__restrict__ cpos, float4 *rec, __nv_bfloat16 *dx, const int *hctrl, int D
#define BWT_PASS dy, dl1p, Wg, Wu, WdT, row_ptr, ecol, eg, eu, cpos, rec, dx, hctrl, D
extern "C" __global__ void __launch_bounds__(tk::THREADS, 4) hyb_bwd_tok(BWT_ARGS) { bwd_tok_body<ROW_GRANULES>(BWT_PASS); }
extern "C" __global__ void __launch_bounds__(tk::THREADS, 2) hyb_bwd_tok_wide(BWT_ARGS) {
  bwd_tok_body<ROW_GRANULES_WIDE>(BWT_PASS);
}

// ------------------------------------------------------------------------------------------
// Backward, unit-major weight gradients: dWg[j] = sum dg x_t, dWu[j] = sum du x_t, dWdT[j] =
// sum h dy_t over unit j's entries, per 256-column slice. Grid = nslices * H, slice-major (the
// x and dy columns in use, N x 256 x 2 x 2 B, stay in L2); CTA (unit uspan[i].x, slice), 4
// warps; the unit's entries are dealt round robin (entry k to warp k % 4), a warp fetches the
// records of 32 of its entries at once (one per lane; the records of a unit are contiguous,
// in token order: cpos) and then walks them UNR at a time with
// all their x_t / dy_t loads in flight; lane l owns columns l*8..l*8+7 of the slice (16-B
// loads). Partial sums of the 4 warps are added in warp order (deterministic). The outputs
// are bf16 (`hyb_bwd_w`: every row written, zeros for silent units) or fp32 gradients added
// into in place (`hyb_bwd_w_acc`: the fp32 masters' .grad, no bf16 tensor and no separate add;
// silent units are not touched). (Four light units a block, one warp each, measured slower
// at N >= 8192: docs/kernel-notes.md.)
static_assert(HYB_BWD_W_THREADS == 128 && HYB_BWD_W_SLICE == 256, "4 warps, 8 columns per lane, 2 columns per thread in the reduction");
namespace wk {
constexpr int THREADS = HYB_BWD_W_THREADS, WARPS = THREADS / 32, SLICE = HYB_BWD_W_SLICE, UNR = HYB_BWD_W_UNR;
}

// The result of one gradient element: stored as bf16, or added into an fp32 gradient.
DEV void put1(__nv_bfloat16* out, size_t o, float v) { out[o] = __float2bfloat16_rn(v); }
DEV void put1(float* out, size_t o, float v) { out[o] = v; }
template <typename T>
DEV void bwd_w_body(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ dy,
                    const int4* __restrict__ uspan, const float4* __restrict__ rec, T* dWg, T* dWu, T* dWdT,
                    const int* hctrl, int D, int H) {
  using namespace wk;
  constexpr bool ADD = sizeof(T) == sizeof(float);  // silent units add nothing
  __shared__ float red[WARPS][24][33];
  if (hctrl[HC_STATUS] & ST_NNZ_OVER) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slice = blockIdx.x / H;
  const int4 span = __ldg(uspan + blockIdx.x - slice * H);
  const int j = span.x, p0 = span.y, p1 = span.z;
  if (ADD && p1 == p0) return;
  // The fp32 gradients this thread adds into (columns tid and tid + 128 of the slice, three
  // rows), loaded now so that their latency overlaps the walk instead of following it.
  float prior[2][3] = {{0.f, 0.f, 0.f}, {0.f, 0.f, 0.f}};
  if constexpr (ADD) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int col = slice * SLICE + tid + h2 * 128;
      if (col < D) {
        const size_t o = (size_t)j * D + col;
        prior[h2][0] = (float)dWg[o];
        prior[h2][1] = (float)dWu[o];
        prior[h2][2] = (float)dWdT[o];
      }
    }
  }
  const int c0 = slice * SLICE + lane * 8;
  const int cc = c0 < D ? c0 : 0;  // lanes past D load a valid address and discard
  float au[8], ag[8], ad[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) au[e] = ag[e] = ad[e] = 0.f;
  // warp's entries: p0 + warp + WARPS * i, i = 0, 1, ...
  const int nw = (p1 - p0 - warp + WARPS - 1) / WARPS;  // may be <= 0
  for (int i0 = 0; i0 < nw; i0 += 32) {
    const int n = min(32, nw - i0);
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (lane < n) r = __ldg(rec + p0 + warp + WARPS * (i0 + lane));
    for (int i = 0; i < n; i += UNR) {
      uint4 xv[UNR], dv[UNR];
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int t = __float_as_int(__shfl_sync(0xffffffffu, r.w, (i + u) & 31));
        if (i + u < n) {
          xv[u] = __ldg(reinterpret_cast<const uint4*>(x + (size_t)t * D + cc));
          dv[u] = __ldg(reinterpret_cast<const uint4*>(dy + (size_t)t * D + cc));
        } else {
          xv[u] = make_uint4(0, 0, 0, 0);
          dv[u] = make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const float du = __shfl_sync(0xffffffffu, r.x, (i + u) & 31);
        const float dg = __shfl_sync(0xffffffffu, r.y, (i + u) & 31);
        const float hh = __shfl_sync(0xffffffffu, r.z, (i + u) & 31);
        axpy8(au, du, xv[u]);
        axpy8(ag, dg, xv[u]);
        axpy8(ad, hh, dv[u]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    red[warp][e][lane] = ag[e];
    red[warp][8 + e][lane] = au[e];
    red[warp][16 + e][lane] = ad[e];
  }
  __syncthreads();
  // thread tid -> columns slice*256 + tid and + 128 (lane c/8, element c%8), three rows
#pragma unroll
  for (int h2 = 0; h2 < 2; ++h2) {
    const int c = tid + h2 * 128;
    const int col = slice * SLICE + c;
    if (col < D) {
      const int l = c >> 3, e = c & 7;
      float s[3] = {0.f, 0.f, 0.f};
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        s[0] += red[w][e][l];
        s[1] += red[w][8 + e][l];
        s[2] += red[w][16 + e][l];
      }
      const size_t o = (size_t)j * D + col;
      put1(dWg, o, ADD ? prior[h2][0] + s[0] : s[0]);
      put1(dWu, o, ADD ? prior[h2][1] + s[1] : s[1]);
      put1(dWdT, o, ADD ? prior[h2][2] + s[2] : s[2]);
    }
  }
}

#define BWW_ARGS(T)                                                                                            \
  const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ dy, const int4 *__restrict__ uspan, \
      const float4 *__restrict__ rec, T *dWg, T *dWu, T *dWdT, const int *hctrl, int D, int H
#define BWW_PASS x, dy, uspan, rec, dWg, dWu, dWdT, hctrl, D, H
extern "C" __global__ void __launch_bounds__(wk::THREADS, HYB_BWD_W_MINBLOCKS) hyb_bwd_w(BWW_ARGS(__nv_bfloat16)) {
  bwd_w_body<__nv_bfloat16>(BWW_PASS);
}
extern "C" __global__ void __launch_bounds__(wk::THREADS, HYB_BWD_W_MINBLOCKS)
    hyb_bwd_w_acc(BWW_ARGS(float)) {
  bwd_w_body<float>(BWW_PASS);
}
