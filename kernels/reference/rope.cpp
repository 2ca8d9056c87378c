// Naive reference rotary embedding: the angle in fp32 as the header specifies, the rotation in double; tests only.
#include "kernels/rope.h"

#include <cmath>

#include "core/error.h"

namespace kiln::ref {

namespace {
// sign = +1 rotates by the angle (forward), −1 by its negative (the backward: the transposed rotation).
void rotate(float* x, const int32_t* pos, int64_t N, const RopeParams& p, double sign) {
  check_rope_params(p);
  const int64_t L = p.ld > 0 ? p.ld : int64_t(p.heads) * p.HD;
  const int half = p.rot_dim / 2;
  for (int64_t n = 0; n < N; n++)
    for (int h = 0; h < p.heads; h++) {
      float* r = x + n * L + int64_t(h) * p.HD;
      for (int i = 0; i < half; i++) {
        const float angle = float(pos[n]) * p.inv_freq[i];
        const double c = p.factor * std::cos(double(angle)), s = p.factor * sign * std::sin(double(angle));
        float* ra = r + rope_first(p, i);
        float* rb = ra + rope_partner(p);
        const double a = *ra, b = *rb;
        *ra = float(a * c - b * s);
        *rb = float(b * c + a * s);
      }
    }
}
}  // namespace

void rope_forward(float* x, const int32_t* pos, int64_t N, const RopeParams& p) { rotate(x, pos, N, p, 1.0); }
void rope_backward(float* dx, const int32_t* pos, int64_t N, const RopeParams& p) { rotate(dx, pos, N, p, -1.0); }

}  // namespace kiln::ref
