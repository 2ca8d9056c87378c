// GEMM and Linear layers through OpenBLAS (OpenMP build, sharing our thread pool).
// forward: out = bias (broadcast) then sgemm with beta = 1, so the bias costs no extra pass over out.
// backward: dinp = dout·Wᵀ (overwritten), dweight += inpᵀ·dout (beta = 1), dbias += column sums of dout.
#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cctype>
#include <cstring>
#include <string>

#include "core/error.h"

extern "C" char* openblas_get_corename(void);

namespace kiln::cpu {

const char* blas_core() { return openblas_get_corename(); }

const char* blas_core_for_this_cpu() {
  std::string core = blas_core();
  std::transform(core.begin(), core.end(), core.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  static const char* kFallbacks[] = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai",
                                     "coppermine", "northwood", "banias", "unknown"};
  if (std::find_if(std::begin(kFallbacks), std::end(kFallbacks), [&](const char* f) { return core == f; }) ==
      std::end(kFallbacks))
    return nullptr;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return nullptr;
}

namespace {
// cblas takes 32-bit sizes: refuse anything larger rather than silently truncating.
int blas_int(int64_t v, const char* what) {
  KILN_CHECK(v >= 0 && v <= INT_MAX, "gemm: ", what, " = ", v, " does not fit a 32-bit BLAS integer");
  return int(v);
}
}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              blas_int(M, "M"), blas_int(N, "N"), blas_int(K, "K"), alpha, A, blas_int(lda, "lda"), B,
              blas_int(ldb, "ldb"), beta, C, blas_int(ldc, "ldc"));
}

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int C,
                    int OC) {
  if (bias) {
#pragma omp parallel for schedule(static) if (N * OC > 16384)
    for (int64_t n = 0; n < N; n++) std::memcpy(out + n * OC, bias, sizeof(float) * OC);
  }
  gemm(false, false, N, OC, C, 1.0f, inp, C, weight, OC, bias ? 1.0f : 0.0f, out, OC);
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC) {
  if (dinp) gemm(false, true, N, C, OC, 1.0f, dout, OC, weight, OC, 0.0f, dinp, C);
  if (dweight) gemm(true, false, C, OC, N, 1.0f, inp, C, dout, OC, 1.0f, dweight, OC);
  if (dbias) {
    // Column sums over blocks of columns: each block's accumulators stay in L1 while we walk the rows,
    // and threads own disjoint blocks, so the result does not depend on the thread count.
    constexpr int kBlock = 256;
    const int nblocks = (OC + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (N * OC > 16384)
    for (int b = 0; b < nblocks; b++) {
      const int o0 = b * kBlock, len = std::min(kBlock, OC - o0);
      float acc[kBlock] = {};
      for (int64_t n = 0; n < N; n++) {
        const float* row = dout + n * OC + o0;
#pragma omp simd
        for (int j = 0; j < len; j++) acc[j] += row[j];
      }
      for (int j = 0; j < len; j++) dbias[o0 + j] += acc[j];
    }
  }
}

}  // namespace kiln::cpu
