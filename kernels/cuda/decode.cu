// Products of a decode step: a few token rows (N <= DECODE_MAX_TOKENS) against whole weight
// matrices. At these sizes a step is bound by reading the weights once, and the tiled GEMMs
// (cuBLAS's, TwELL's gate) reach a fraction of the card's bandwidth; these kernels stream each
// weight row once with 16-byte loads, DECODE_WARP_ROWS rows a warp and all their loads in
// flight, and keep the token rows in L1.
//
//   decode_linear_t{1,2,4,8}   y[t, o] = bf16(x[t] . W[o])                        (any O)
//   decode_gate_up_t{1,2,4,8}  h[t, j] = bf16(relu(x[t] . Wg[j])) * (x[t] . Wu[j]), f32; the up
//                              row is read only for units that fire for some token
//   decode_down                y[t] = bf16(sum over j with h[t, j] != 0 of h[t, j] WdT[j])
//
// Together the last two are the sparse FFN of a decode step (the TwELL path's values: the gate
// rounded to bf16, the products in f32), in two launches and no packed format: the gate's
// reads are the bytes that bound it, and the down product gathers only the rows of the units
// that fire. t{T}: the token rows a launch takes, T >= N (rows t >= N are neither read nor
// written). Shapes: x [N, D] bf16, W/Wg/Wu/WdT [*, D] bf16 row-major, D % 8 == 0, pointers
// 16-byte aligned; h [N, ldh] f32, ldh % 4 == 0, ldh >= H (columns >= H not written); y
// bf16 row-major. Every sum is over a fixed order: results do not depend on timing.
#include "common.cuh"

namespace dk {
constexpr int THREADS = DECODE_THREADS, WARPS = THREADS / 32, ROWS = DECODE_WARP_ROWS;
// Granules a lane loads per row before the first product: 8 covers D = 2048 in one pass.
constexpr int UNR = 8;
}  // namespace dk

// acc + the dot product of the eight bf16 of w with the eight of x.
DEV float dot8(uint4 w, uint4 x, float acc) {
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w}, xx[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc = fmaf(bf_lo(ww[j]), bf_lo(xx[j]), acc);
    acc = fmaf(bf_hi(ww[j]), bf_hi(xx[j]), acc);
  }
  return acc;
}

// acc[r][t] = W row r . x[t] for the warp's ROWS rows (`w[r]`, read when ok[r]; G8 granules)
// and tokens t < N; the sums in every lane.
template <int T>
DEV void warp_rows_dot(const uint4* __restrict__ x, const uint4* const (&w)[dk::ROWS], const bool (&ok)[dk::ROWS],
                       int N, int G8, int lane, float (&acc)[dk::ROWS][T]) {
  using namespace dk;
  zero_fill(acc);
  for (int g0 = lane; g0 < G8; g0 += 32 * UNR) {
    uint4 wv[ROWS][UNR];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int u = 0; u < UNR; ++u) {
        const int gi = g0 + 32 * u;
        wv[r][u] = (ok[r] && gi < G8) ? __ldg(w[r] + gi) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < UNR; ++u) {
      const int gi = g0 + 32 * u;
      if (gi >= G8) break;
#pragma unroll
      for (int t = 0; t < T; ++t) {
        if (t >= N) break;
        const uint4 xv = __ldg(x + (size_t)t * G8 + gi);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][t] = dot8(wv[r][u], xv, acc[r][t]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t) acc[r][t] = warp_sum(acc[r][t]);
}

// The warp's first weight row (ROWS a warp, WARPS warps a block), its row pointers and which
// of them exist (< rows).
DEV int warp_first_row(int rows) { return (blockIdx.x * dk::WARPS + (threadIdx.x >> 5)) * dk::ROWS; }
DEV void row_pointers(const __nv_bfloat16* W, int r0, int rows, int G8, const uint4* (&w)[dk::ROWS],
                      bool (&ok)[dk::ROWS]) {
#pragma unroll
  for (int r = 0; r < dk::ROWS; ++r) {
    ok[r] = r0 + r < rows;
    w[r] = reinterpret_cast<const uint4*>(W) + (size_t)(ok[r] ? r0 + r : r0) * G8;
  }
}

template <int T>
DEV void linear_body(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ W,
                     __nv_bfloat16* __restrict__ y, int N, int D, int O) {
  using namespace dk;
  static_assert(ROWS * T <= 32, "one lane per output");
  const int lane = threadIdx.x & 31, o0 = warp_first_row(O), G8 = D / 8;
  if (o0 >= O) return;  // whole warps; no block-wide synchronisation below
  const uint4* w[ROWS];
  bool ok[ROWS];
  row_pointers(W, o0, O, G8, w, ok);
  float acc[ROWS][T];
  warp_rows_dot<T>(reinterpret_cast<const uint4*>(x), w, ok, N, G8, lane, acc);
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t)
      if (lane == r * T + t && ok[r] && t < N) y[(size_t)t * O + o0 + r] = __float2bfloat16_rn(acc[r][t]);
}

template <int T>
DEV void gate_up_body(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ Wg,
                      const __nv_bfloat16* __restrict__ Wu, float* __restrict__ h, int N, int D, int H, int ldh) {
  using namespace dk;
  static_assert(ROWS * T <= 32, "one lane per output");
  const int lane = threadIdx.x & 31, j0 = warp_first_row(H), G8 = D / 8;
  if (j0 >= H) return;
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  const uint4* w[ROWS];
  bool ok[ROWS];
  row_pointers(Wg, j0, H, G8, w, ok);
  float g[ROWS][T];
  warp_rows_dot<T>(xr, w, ok, N, G8, lane, g);
  // The gate as TwELL stores it (bf16); a unit's up row is read when it fires for any token.
  bool fires[ROWS];
  bool any = false;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    fires[r] = false;
#pragma unroll
    for (int t = 0; t < T; ++t) {
      g[r][t] = __bfloat162float(__float2bfloat16_rn(fmaxf(g[r][t], 0.f)));
      fires[r] |= t < N && g[r][t] > 0.f;
    }
    fires[r] &= ok[r];
    any |= fires[r];
  }
  float u[ROWS][T];
  zero_fill(u);
  if (any) {  // the same in every lane: the sums are the warp's
    row_pointers(Wu, j0, H, G8, w, ok);
    warp_rows_dot<T>(xr, w, fires, N, G8, lane, u);
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < T; ++t)
      if (lane == r * T + t && ok[r] && t < N) h[(size_t)t * ldh + j0 + r] = g[r][t] > 0.f ? g[r][t] * u[r][t] : 0.f;
}

// MINB: blocks an SM is compiled for, so that a 1.5b step's launches (704 to 768 blocks) are
// resident in one wave on 132 SMs at one and two tokens (80 registers a thread).
#define DECODE_ENTRIES(T, MINB)                                                                                  \
  extern "C" __global__ void __launch_bounds__(dk::THREADS, MINB) decode_linear_t##T(                         \
      const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ W, __nv_bfloat16* __restrict__ y, \
      int N, int D, int O) {                                                                                   \
    linear_body<T>(x, W, y, N, D, O);                                                                          \
  }                                                                                                            \
  extern "C" __global__ void __launch_bounds__(dk::THREADS, MINB) decode_gate_up_t##T(                        \
      const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ Wg,                              \
      const __nv_bfloat16* __restrict__ Wu, float* __restrict__ h, int N, int D, int H, int ldh) {            \
    gate_up_body<T>(x, Wg, Wu, h, N, D, H, ldh);                                                              \
  }
DECODE_ENTRIES(1, 6)
DECODE_ENTRIES(2, 6)
DECODE_ENTRIES(4, 4)
DECODE_ENTRIES(8, 3)

// ------------------------------------------------------------------------------------------
// Down product: one block per (token, DECODE_DOWN_GRANULES granules of y). Each round the block
// lists the units of h[t] that fire in unit order (a block-wide scan of per-thread counts),
// then its warps split the list (warp w takes entries w, w + WARPS, ...; lane = granule), four
// gathered rows in flight, and at the end the warps' sums are added in warp order.
namespace dd {
constexpr int THREADS = DECODE_DOWN_THREADS, WARPS = THREADS / 32, GRAN = DECODE_DOWN_GRANULES;
constexpr int ROUND = DECODE_DOWN_ROUND, UPT = ROUND / THREADS;
static_assert(GRAN == 32 && UPT % 4 == 0, "a lane per granule; float4 reads of h");
}  // namespace dd

extern "C" __global__ void __launch_bounds__(dd::THREADS) decode_down(const float* __restrict__ h,
                                                                      const __nv_bfloat16* __restrict__ WdT,
                                                                      __nv_bfloat16* __restrict__ y, int N, int D,
                                                                      int H, int ldh) {
  using namespace dd;
  __shared__ uint16_t lj[ROUND];
  __shared__ float lv[ROUND];
  __shared__ int wtot[WARPS];
  __shared__ float red[WARPS][8][32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t = blockIdx.y, G8 = D / 8, gi = blockIdx.x * GRAN + lane;
  const float* hrow = h + (size_t)t * ldh;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int base = 0; base < H; base += ROUND) {
    const int j0 = base + tid * UPT;
    float v[UPT];
    if (j0 + UPT <= H) {
#pragma unroll
      for (int q = 0; q < UPT / 4; ++q) {
        const float4 f = __ldcg(reinterpret_cast<const float4*>(hrow + j0) + q);
        v[4 * q] = f.x; v[4 * q + 1] = f.y; v[4 * q + 2] = f.z; v[4 * q + 3] = f.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < UPT; ++i) v[i] = j0 + i < H ? __ldcg(hrow + j0 + i) : 0.f;
    }
    int c = 0;
#pragma unroll
    for (int i = 0; i < UPT; ++i) c += v[i] != 0.f;
    const int incl = warp_inclusive_scan(c, lane);
    if (lane == 31) wtot[warp] = incl;
    __syncthreads();
    int off = incl - c, L = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      off += w < warp ? wtot[w] : 0;
      L += wtot[w];
    }
#pragma unroll
    for (int i = 0; i < UPT; ++i)
      if (v[i] != 0.f) {
        lj[off] = (uint16_t)(j0 + i - base);
        lv[off] = v[i];
        ++off;
      }
    __syncthreads();
    if (gi < G8) {
      const uint4* wd = reinterpret_cast<const uint4*>(WdT + (size_t)base * D) + gi;
      int idx = warp;
      for (; idx + 3 * WARPS < L; idx += 4 * WARPS) {
        uint4 wr[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) wr[k] = __ldg(wd + (size_t)lj[idx + k * WARPS] * G8);
#pragma unroll
        for (int k = 0; k < 4; ++k) axpy8(acc, lv[idx + k * WARPS], wr[k]);
      }
      for (; idx < L; idx += WARPS) axpy8(acc, lv[idx], __ldg(wd + (size_t)lj[idx] * G8));
    }
    __syncthreads();  // the list and wtot are rewritten by the next round
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) red[warp][k][lane] = acc[k];
  __syncthreads();
  if (warp == 0 && gi < G8) {
    float s[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      s[k] = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) s[k] += red[w][k][lane];
    }
    store_bf16x8(y + (size_t)t * D, gi, s);
  }
}
