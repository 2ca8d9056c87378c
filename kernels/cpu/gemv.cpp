// Matrix-vector products that stream the matrix in contiguous per-thread slices (see kernels/gemv.h).
//
// vecmat: thread t sums rows [k0, k1) of W, eight at a time, into its own partial y (N floats, stays in L1/L2);
// then the partials are added together with the old y and the bias. matvec: thread t computes a contiguous
// range of outputs, each a dot product of one row of A with x over four independent 16-float accumulators.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/gemv.h"

namespace kiln::cpu {
namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_u __attribute__((vector_size(64), aligned(4)));

inline f32x16 load16(const float* p) { return *reinterpret_cast<const f32x16_u*>(p); }
inline void store16(float* p, f32x16 v) { *reinterpret_cast<f32x16_u*>(p) = v; }
inline float hsum16(f32x16 v) {
  float s = 0;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

// Below this many matrix elements a product runs on the calling thread.
constexpr int64_t kSerialBelow = 1 << 16;

// acc[0..N) += Σ_{k<R} x[k]·W[k, :] for R consecutive rows: one pass over acc per R rows of W.
template <int R>
inline void vecmat_block(float* acc, const float* x, const float* W, int64_t N) {
  const int64_t N16 = N / 16 * 16;
  f32x16 xs[R];
  for (int j = 0; j < R; j++) xs[j] = f32x16{} + x[j];
  for (int64_t o = 0; o < N16; o += 16) {
    f32x16 a = load16(acc + o);
    for (int j = 0; j < R; j++) a += xs[j] * load16(W + j * N + o);
    store16(acc + o, a);
  }
  for (int64_t o = N16; o < N; o++) {
    float a = acc[o];
    for (int j = 0; j < R; j++) a += x[j] * W[j * N + o];
    acc[o] = a;
  }
}

// Rows of W a thread streams per step; more rows mean fewer passes over its partial sums (8 measured best).
constexpr int kRowBlock = 8;

// acc[0..N) = Σ_{k0<=k<k1} x[k]·W[k, :]
void vecmat_rows(float* acc, const float* x, const float* W, int64_t N, int64_t k0, int64_t k1) {
  std::memset(acc, 0, sizeof(float) * size_t(N));
  int64_t k = k0;
  for (; k + kRowBlock <= k1; k += kRowBlock) vecmat_block<kRowBlock>(acc, x + k, W + k * N, N);
  for (; k < k1; k++) vecmat_block<1>(acc, x + k, W + k * N, N);
}

inline float dot(const float* a, const float* b, int64_t K) {
  f32x16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    s0 += load16(a + k) * load16(b + k);
    s1 += load16(a + k + 16) * load16(b + k + 16);
    s2 += load16(a + k + 32) * load16(b + k + 32);
    s3 += load16(a + k + 48) * load16(b + k + 48);
  }
  for (; k + 16 <= K; k += 16) s0 += load16(a + k) * load16(b + k);
  float s = hsum16((s0 + s1) + (s2 + s3));
  for (; k < K; k++) s += a[k] * b[k];
  return s;
}

}  // namespace

void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate) {
  if (N <= 0) return;
  const int max_nt = std::min<int>(omp_get_max_threads(), int((K + kRowBlock - 1) / kRowBlock));
  const int nt = K * N >= kSerialBelow ? std::max(1, max_nt) : 1;
  thread_local std::vector<float> partial;
  partial.resize(size_t(nt) * size_t(N));
  float* part = partial.data();
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // The team may be smaller than asked (nested inside another parallel region): slice by its real size.
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    // Rows per thread, a multiple of the row block so only the last slice has a tail.
    const int64_t per = ((K + T - 1) / T + kRowBlock - 1) / kRowBlock * kRowBlock;
    const int64_t k0 = std::min(K, per * t), k1 = std::min(K, k0 + per);
    vecmat_rows(part + int64_t(t) * N, x, W, N, k0, k1);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t o = 0; o < N; o++) {
      float s = accumulate ? y[o] : 0.0f;
      for (int i = 0; i < T; i++) s += part[int64_t(i) * N + o];
      y[o] = bias ? s + bias[o] : s;
    }
  }
}

void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K) {
#pragma omp parallel for schedule(static) if (M * K >= kSerialBelow)
  for (int64_t m = 0; m < M; m++) y[m] = dot(A + m * K, x, K);
}

}  // namespace kiln::cpu
