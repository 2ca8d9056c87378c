// Rotary embedding on the CPU, in place, threaded over tokens. cos and sin depend only on the token's
// position, so they are computed once per token and reused by every head of the row; the rotation itself
// is an `omp simd` loop over the pairs.
#include "kernels/rope.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace kiln {

void check_rope_params(const RopeParams& p) {
  KILN_CHECK(p.heads >= 1 && p.HD >= 1, "rope: heads (", p.heads, ") and HD (", p.HD, ") must be positive");
  KILN_CHECK(p.rot_dim >= 0 && p.rot_dim % 2 == 0 && p.rot_dim <= p.HD, "rope: rot_dim (", p.rot_dim,
             ") must be even and <= HD (", p.HD, ")");
  KILN_CHECK(p.inv_freq != nullptr || p.rot_dim == 0, "rope: inv_freq is null");
}

}  // namespace kiln

namespace kiln::cpu {

namespace {
// sign = +1: rotate by the angle (forward); −1: by its negative (backward, the transposed rotation).
void rotate(float* x, const int32_t* pos, int64_t N, const RopeParams& p, float sign) {
  check_rope_params(p);
  const int64_t L = p.ld > 0 ? p.ld : int64_t(p.heads) * p.HD;
  const int half = p.rot_dim / 2;
  if (half == 0 || N == 0) return;
#pragma omp parallel if (N * p.heads * p.rot_dim > 16384)
  {
    std::vector<float> cs(size_t(2 * half));
    float* cv = cs.data();
    float* sv = cv + half;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      for (int i = 0; i < half; i++) {
        const float angle = float(pos[n]) * p.inv_freq[i];
        cv[i] = p.factor * std::cos(angle);
        sv[i] = p.factor * sign * std::sin(angle);
      }
      for (int h = 0; h < p.heads; h++) {
        float* a = x + n * L + int64_t(h) * p.HD;
        if (p.interleaved) {
          for (int i = 0; i < half; i++) {
            const float xa = a[2 * i], xb = a[2 * i + 1];
            a[2 * i] = xa * cv[i] - xb * sv[i];
            a[2 * i + 1] = xb * cv[i] + xa * sv[i];
          }
          continue;
        }
        float* b = a + half;
#pragma omp simd
        for (int i = 0; i < half; i++) {
          const float xa = a[i], xb = b[i];
          a[i] = xa * cv[i] - xb * sv[i];
          b[i] = xb * cv[i] + xa * sv[i];
        }
      }
    }
  }
}
}  // namespace

void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p) { rotate(x, pos, N, p, 1.0f); }
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p) { rotate(dx, pos, N, p, -1.0f); }

}  // namespace kiln::cpu
