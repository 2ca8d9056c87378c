// Naive reference GEMM and Linear forward/backward: plain loops with double accumulators, used only by tests.
#include "kernels/matmul.h"

namespace kiln::ref {

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      double s = 0;
      for (int64_t k = 0; k < K; k++) {
        double a = trans_a ? A[k * lda + i] : A[i * lda + k];
        double b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        s += a * b;
      }
      // BLAS convention: with beta == 0, C is not read (it may hold NaN).
      double c = beta == 0.0f ? 0.0 : double(beta) * C[i * ldc + j];
      C[i * ldc + j] = float(double(alpha) * s + c);
    }
  }
}

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int C,
                    int OC) {
  for (int64_t n = 0; n < N; n++) {
    for (int o = 0; o < OC; o++) {
      double s = bias ? bias[o] : 0.0;
      for (int c = 0; c < C; c++) s += double(inp[n * C + c]) * weight[int64_t(c) * OC + o];
      out[n * OC + o] = float(s);
    }
  }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC) {
  if (dinp) {
    for (int64_t n = 0; n < N; n++) {
      for (int c = 0; c < C; c++) {
        double s = 0;
        for (int o = 0; o < OC; o++) s += double(dout[n * OC + o]) * weight[int64_t(c) * OC + o];
        dinp[n * C + c] = float(s);
      }
    }
  }
  if (dweight) {
    for (int c = 0; c < C; c++) {
      for (int o = 0; o < OC; o++) {
        double s = 0;
        for (int64_t n = 0; n < N; n++) s += double(inp[n * C + c]) * dout[n * OC + o];
        dweight[int64_t(c) * OC + o] += float(s);
      }
    }
  }
  if (dbias) {
    for (int o = 0; o < OC; o++) {
      double s = 0;
      for (int64_t n = 0; n < N; n++) s += dout[n * OC + o];
      dbias[o] += float(s);
    }
  }
}

}  // namespace kiln::ref
