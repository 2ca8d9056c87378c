// Reference matrix-vector products: double-precision sums, one output at a time.
#include <vector>

#include "kernels/gemv.h"

namespace kiln::ref {

void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate) {
  for (int64_t n = 0; n < N; n++) {
    double s = accumulate ? double(y[n]) : 0.0;
    for (int64_t k = 0; k < K; k++) s += double(x[k]) * double(W[k * N + n]);
    if (bias) s += double(bias[n]);
    y[n] = float(s);
  }
}

void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; m++) {
    double s = 0;
    for (int64_t k = 0; k < K; k++) s += double(A[m * K + k]) * double(x[k]);
    y[m] = float(s);
  }
}

void vecmat_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* W, const float* bias,
                  int64_t K, int64_t N, bool accumulate) {
  for (int64_t r = 0; r < R; r++) vecmat(y + r * ldy, x + r * ldx, W, bias, K, N, accumulate);
}

void matvec_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* A, const float* bias,
                  int64_t M, int64_t K, bool accumulate) {
  for (int64_t r = 0; r < R; r++)
    for (int64_t m = 0; m < M; m++) {
      double s = accumulate ? double(y[r * ldy + m]) : 0.0;
      for (int64_t k = 0; k < K; k++) s += double(A[m * K + k]) * double(x[r * ldx + k]);
      if (bias) s += double(bias[m]);
      y[r * ldy + m] = float(s);
    }
}

}  // namespace kiln::ref
