// Naive narrow-weight products (kernels/narrow_gemv.h): every weight widened on its own, double sums; q8_0
// quantizes x per block exactly as the CPU kernel does and sums d·dx·Σ qw·qx per block.
#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/narrow_gemv.h"

namespace kiln::ref {

void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate) {
  KILN_CHECK(A.fmt != WeightFormat::F32, "ref::narrow_gemm: an f32 matrix");
  const int64_t nb = A.ld / kQ8Block;
  std::vector<float> dx(static_cast<size_t>(nb));
  std::vector<int8_t> qx(static_cast<size_t>(A.ld));
  for (int64_t n = 0; n < N; n++) {
    const float* xr = x + n * ldx;
    if (A.fmt == WeightFormat::Q8_0)
      for (int64_t b = 0; b < nb; b++)
        quantize_q8_block(xr + b * kQ8Block, int(std::min<int64_t>(kQ8Block, A.K - b * kQ8Block)), &dx[size_t(b)],
                          &qx[size_t(b * kQ8Block)]);
    for (int64_t m = 0; m < A.M; m++) {
      double s = 0;
      if (A.fmt == WeightFormat::Q8_0) {
        const uint8_t* w = static_cast<const uint8_t*>(A.q) + m * A.ld;  // q + 128
        for (int64_t b = 0; b < nb; b++) {
          int64_t t = 0;
          for (int i = 0; i < kQ8Block; i++) t += (int64_t(w[b * kQ8Block + i]) - 128) * qx[size_t(b * kQ8Block + i)];
          s += double(f16_to_f32(A.d[m * nb + b])) * double(dx[size_t(b)]) * double(t);
        }
      } else {
        for (int64_t k = 0; k < A.K; k++) s += double(narrow_at(A, m, k)) * double(xr[k]);
      }
      if (bias) s += bias[m];
      float& out = y[n * ldy + m];
      out = accumulate ? float(double(out) + s) : float(s);
    }
  }
}

}  // namespace kiln::ref
