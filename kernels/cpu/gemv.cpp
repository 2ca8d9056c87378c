// The decoding batch's products on the CPU (see kernels/gemv.h). No sum is ever split: the threads own disjoint
// outputs (columns of W, rows of A), and each output is accumulated in the same order for any R, so rows do not
// depend on each other.
//   vecmat_batch: for each block of 8-32 rows of W (k_block), the thread walks its columns in tiles of 64; over a
//   tile, each group of up to 6 rows of x carries its 6×4 partial sums through the block in registers (y holds
//   them between blocks). The tile is read from memory by the first group and from L1 by the others.
//   matvec_batch: each tile is 6 rows of A (one at one row of x) against up to 4 rows of x, one 16-lane
//   accumulator per pair over k, then a fixed tree reduction; the 6 rows of A stay in L1 while the groups of x
//   rows pass over them (6 rows measured 12% faster than 4 on the LM head at 16 rows, and than 8 rows × 2; a
//   software prefetch of W's next block gained nothing there). Tiles of 16 sums reduce them together
//   (vec_reduce.h), in the same order as one.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>

#include "kernels/cpu/vec_reduce.h"
#include "kernels/gemv.h"

namespace kiln::cpu {
namespace {

// Below this many matrix elements a product runs on the calling thread.
constexpr int64_t kSerialBelow = 1 << 16;

// ---- Batch forms ----

constexpr int kGroupRows = 6;       // rows of x per vecmat register tile (6 × 4 accumulators)
constexpr int64_t kTileCols = 64;   // columns per vecmat register tile
// Rows of W per pass over the partial sums. Each row of a block is a stream of its own (a tile reads 256 bytes of
// each), which the hardware prefetcher follows poorly, so the tile's first group of x rows prefetches W's rows 16
// ahead into L2 (GPT-2 124M f32 decoding on 1 thread: 11.6 -> 20.6 GB/s, 0.47 -> 0.71 of the streaming read,
// build/decode_bandwidth_bench). 8 rows a block below 4 rows of x, 16 below 8, then 32, as more x rows share each
// tile (the 32M bench target on a Zen 4 host, build/verify_pass_bench --formats f32, a pass against a step: 2 and
// 3 rows 1.32-1.52 -> 1.03-1.08, 5 rows 1.52-1.64 -> 1.21-1.24, 9 rows 1.71-1.80 -> 1.44-1.54 against 32 rows a
// block without the prefetch). Blocks only move where the partial sums wait, never their order.
inline int64_t k_block(int64_t R) { return R < 4 ? 8 : R < 8 ? 16 : 32; }
constexpr int64_t kPrefetchRows = 16;

// Columns [c0, c1) of G rows of y over rows [k0, k1) of W. y holds the partial sums between blocks; `zero`:
// start from 0 instead (the first block without accumulate); bias (or null) is added after the last block.
template <int G>
void vecmat_group(float* y, int64_t ldy, const float* x, int64_t ldx, const float* W, int64_t N, int64_t k0,
                  int64_t k1, int64_t c0, int64_t c1, bool zero, const float* bias, bool prefetch) {
  int64_t c = c0;
  for (; c + kTileCols <= c1; c += kTileCols) {
    f32x16 acc[G][4];
    for (int g = 0; g < G; g++)
      for (int j = 0; j < 4; j++) acc[g][j] = zero ? f32x16{} : load16(y + g * ldy + c + 16 * j);
    for (int64_t k = k0; k < k1; k++) {
      const float* w = W + k * N + c;
      if (prefetch)  // the tile's first group: W's row kPrefetchRows ahead into L2 (a prefetch past W is dropped)
        for (int j = 0; j < 4; j++) _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchRows * N + 16 * j), _MM_HINT_T1);
      const f32x16 w0 = load16(w), w1 = load16(w + 16), w2 = load16(w + 32), w3 = load16(w + 48);
      for (int g = 0; g < G; g++) {
        const float xv = x[g * ldx + k];
        acc[g][0] += w0 * xv;
        acc[g][1] += w1 * xv;
        acc[g][2] += w2 * xv;
        acc[g][3] += w3 * xv;
      }
    }
    for (int g = 0; g < G; g++)
      for (int j = 0; j < 4; j++) store16(y + g * ldy + c + 16 * j, bias ? acc[g][j] + load16(bias + c + 16 * j) : acc[g][j]);
  }
  for (; c + 16 <= c1; c += 16) {
    f32x16 acc[G];
    for (int g = 0; g < G; g++) acc[g] = zero ? f32x16{} : load16(y + g * ldy + c);
    for (int64_t k = k0; k < k1; k++) {
      const f32x16 w = load16(W + k * N + c);
      for (int g = 0; g < G; g++) acc[g] += w * x[g * ldx + k];
    }
    for (int g = 0; g < G; g++) store16(y + g * ldy + c, bias ? acc[g] + load16(bias + c) : acc[g]);
  }
  for (; c < c1; c++)
    for (int g = 0; g < G; g++) {
      float a = zero ? 0.0f : y[g * ldy + c];
      for (int64_t k = k0; k < k1; k++) a += x[g * ldx + k] * W[k * N + c];
      y[g * ldy + c] = bias ? a + bias[c] : a;
    }
}

void vecmat_group_n(int G, float* y, int64_t ldy, const float* x, int64_t ldx, const float* W, int64_t N,
                    int64_t k0, int64_t k1, int64_t c0, int64_t c1, bool zero, const float* bias, bool prefetch) {
  switch (G) {
    case 1: return vecmat_group<1>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
    case 2: return vecmat_group<2>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
    case 3: return vecmat_group<3>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
    case 4: return vecmat_group<4>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
    case 5: return vecmat_group<5>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
    default: return vecmat_group<6>(y, ldy, x, ldx, W, N, k0, k1, c0, c1, zero, bias, prefetch);
  }
}

constexpr int kMatvecPrefetch = 4096;  // bytes ahead in each row of A (one row of x)

// y[j·ldy + m + i] for MR rows of A from m and NR rows of x.
template <int MR, int NR>
void matvec_tile(float* y, int64_t ldy, const float* x, int64_t ldx, const float* A, int64_t K, int64_t m,
                 bool accumulate, const float* bias) {
  f32x16 acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) acc[i][j] = f32x16{};
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    if constexpr (NR == 1) {
      // One row of x: each row of A streams straight into its accumulator (no row held for other x rows, which
      // without AVX-512's 32 registers spilled), fetched into L2 kMatvecPrefetch bytes ahead.
      const f32x16 xv = load16(x + k);
      for (int i = 0; i < MR; i++) {
        const float* a = A + (m + i) * K + k;
        if ((k & 16) == 0) _mm_prefetch(reinterpret_cast<const char*>(a) + kMatvecPrefetch, _MM_HINT_T1);
        acc[i][0] += load16(a) * xv;
      }
    } else {
      f32x16 a[MR];
      for (int i = 0; i < MR; i++) a[i] = load16(A + (m + i) * K + k);
      for (int j = 0; j < NR; j++) {
        const f32x16 xv = load16(x + j * ldx + k);
        for (int i = 0; i < MR; i++) acc[i][j] += a[i] * xv;
      }
    }
  }
  alignas(64) float sums[MR * NR];
  if constexpr (MR * NR == 16) {
    f32x16 p[16];
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) p[i * NR + j] = acc[i][j];
    store16(sums, vred::hsum16x16(p));
  } else {
    for (int i = 0; i < MR; i++)
      for (int j = 0; j < NR; j++) sums[i * NR + j] = vred::hsum(acc[i][j]);
  }
  for (int i = 0; i < MR; i++)
    for (int j = 0; j < NR; j++) {
      float s = sums[i * NR + j];
      for (int64_t k = K16; k < K; k++) s += A[(m + i) * K + k] * x[j * ldx + k];
      float& out = y[j * ldy + m + i];
      out = (accumulate ? out + s : s) + (bias ? bias[m + i] : 0.0f);
    }
}

template <int MR, int NG>
void matvec_rows_of_x(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* A, int64_t K,
                      int64_t m, bool accumulate, const float* bias) {
  int64_t r = 0;
  for (; r + NG <= R; r += NG) matvec_tile<MR, NG>(y + r * ldy, ldy, x + r * ldx, ldx, A, K, m, accumulate, bias);
  switch (R - r) {
    case 3: return matvec_tile<MR, 3>(y + r * ldy, ldy, x + r * ldx, ldx, A, K, m, accumulate, bias);
    case 2: return matvec_tile<MR, 2>(y + r * ldy, ldy, x + r * ldx, ldx, A, K, m, accumulate, bias);
    case 1: return matvec_tile<MR, 1>(y + r * ldy, ldy, x + r * ldx, ldx, A, K, m, accumulate, bias);
    default: return;
  }
}

// The team's slice of [0, n) in multiples of `align` (thread t of T).
inline void team_slice(int64_t n, int64_t align, int T, int t, int64_t& b, int64_t& e) {
  const int64_t per = ((n + T - 1) / T + align - 1) / align * align;
  b = std::min(n, per * t);
  e = std::min(n, b + per);
}

}  // namespace

void vecmat_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* W, const float* bias,
                  int64_t K, int64_t N, bool accumulate) {
  if (R <= 0 || N <= 0) return;
  if (K == 0) {  // no sum: the old y (or 0) and the bias
    for (int64_t r = 0; r < R; r++)
      for (int64_t n = 0; n < N; n++) y[r * ldy + n] = (accumulate ? y[r * ldy + n] : 0.0f) + (bias ? bias[n] : 0.0f);
    return;
  }
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), int((N + kTileCols - 1) / kTileCols)));
#pragma omp parallel num_threads(nt) if (nt > 1 && R * K * N >= kSerialBelow)
  {
    int64_t c0, c1;
    team_slice(N, kTileCols, omp_get_num_threads(), omp_get_thread_num(), c0, c1);
    const int64_t kb = k_block(R);
    for (int64_t k0 = 0; k0 < K && c0 < c1; k0 += kb) {
      const int64_t k1 = std::min(K, k0 + kb);
      for (int64_t c = c0; c < c1; c += kTileCols)  // the groups in turn over one tile of W (in L1)
        for (int64_t r = 0; r < R; r += kGroupRows)
          vecmat_group_n(int(std::min<int64_t>(kGroupRows, R - r)), y + r * ldy, ldy, x + r * ldx, ldx, W, N, k0,
                         k1, c, std::min(c1, c + kTileCols), k0 == 0 && !accumulate, k1 == K ? bias : nullptr,
                         r == 0);
    }
  }
}

void matvec_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* A, const float* bias,
                  int64_t M, int64_t K, bool accumulate) {
  if (R <= 0 || M <= 0) return;
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), int((M + 3) / 4)));
#pragma omp parallel num_threads(nt) if (nt > 1 && R * K * M >= kSerialBelow)
  {
    int64_t m0, m1;
    team_slice(M, 4, omp_get_num_threads(), omp_get_thread_num(), m0, m1);
    int64_t m = m0;
    if (R == 1) {
      // A row after row, one sequential stream: six rows at once are six short streams, which a Zen 4 core follows
      // poorly (the 154 MB LM head of GPT-2 124M: 15 -> 22 GB/s at 1 thread, build/batch_gemv_bench --rows 1;
      // f32 decoding 0.72 -> 0.80 of the read at 1 thread, 0.78 -> 0.82 at 2, decode_bandwidth_bench).
      // A row's sum is the same either way.
      for (; m < m1; m++) matvec_tile<1, 1>(y, ldy, x, ldx, A, K, m, accumulate, bias);
    } else {
      for (; m + 6 <= m1; m += 6) matvec_rows_of_x<6, 4>(y, ldy, x, ldx, R, A, K, m, accumulate, bias);
      for (; m + 4 <= m1; m += 4) matvec_rows_of_x<4, 4>(y, ldy, x, ldx, R, A, K, m, accumulate, bias);
      for (; m < m1; m++) matvec_rows_of_x<1, 4>(y, ldy, x, ldx, R, A, K, m, accumulate, bias);
    }
  }
}

}  // namespace kiln::cpu
