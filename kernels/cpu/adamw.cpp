// AdamW in one fused, threaded pass (see kernels/adamw.h for the formula); the bias corrections are
// computed once, in double. The AVX-512 path is written with intrinsics because GCC will not vectorise
// std::sqrt without -ffast-math (it keeps the errno branch).
#include "kernels/adamw.h"

#include <cmath>

#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vec_math.h"

namespace kiln::cpu {

namespace {
struct AdamWConsts {
  float b1, b2, lr, wd, eps, gs, inv_bc1, inv_bc2;
};

inline void adamw_scalar(float& p, float g, float& m, float& v, const AdamWConsts& k) {
  g *= k.gs;
  m = k.b1 * m + (1.0f - k.b1) * g;
  v = k.b2 * v + (1.0f - k.b2) * (g * g);
  p = p - k.lr * (k.wd * p + (m * k.inv_bc1) / (std::sqrt(v * k.inv_bc2) + k.eps));
}
}  // namespace

void adamw_update(float* param, float* grad, float* m, float* v, int64_t n, const AdamWHyper& h) {
  const AdamWConsts k{h.beta1,
                      h.beta2,
                      h.lr,
                      h.weight_decay,
                      h.eps,
                      h.grad_scale,
                      float(1.0 / (1.0 - std::pow(double(h.beta1), double(h.t)))),
                      float(1.0 / (1.0 - std::pow(double(h.beta2), double(h.t))))};
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    int64_t i = b;
#ifdef __AVX512F__
    const __m512 b1 = _mm512_set1_ps(k.b1), c1 = _mm512_set1_ps(1.0f - k.b1);
    const __m512 b2 = _mm512_set1_ps(k.b2), c2 = _mm512_set1_ps(1.0f - k.b2);
    const __m512 lr = _mm512_set1_ps(k.lr), wd = _mm512_set1_ps(k.wd), eps = _mm512_set1_ps(k.eps);
    const __m512 gs = _mm512_set1_ps(k.gs), ibc1 = _mm512_set1_ps(k.inv_bc1), ibc2 = _mm512_set1_ps(k.inv_bc2);
    for (; i + 16 <= e; i += 16) {
      const __m512 g = _mm512_mul_ps(_mm512_loadu_ps(grad + i), gs);
      if (h.zero_grad) _mm512_storeu_ps(grad + i, _mm512_setzero_ps());
      const __m512 mi = _mm512_add_ps(_mm512_mul_ps(b1, _mm512_loadu_ps(m + i)), _mm512_mul_ps(c1, g));
      const __m512 vi = _mm512_add_ps(_mm512_mul_ps(b2, _mm512_loadu_ps(v + i)), _mm512_mul_ps(c2, _mm512_mul_ps(g, g)));
      const __m512 p = _mm512_loadu_ps(param + i);
      const __m512 denom = _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vi, ibc2)), eps);
      const __m512 upd = _mm512_add_ps(_mm512_mul_ps(wd, p), _mm512_div_ps(_mm512_mul_ps(mi, ibc1), denom));
      _mm512_storeu_ps(m + i, mi);
      _mm512_storeu_ps(v + i, vi);
      _mm512_storeu_ps(param + i, _mm512_sub_ps(p, _mm512_mul_ps(lr, upd)));
    }
#endif
    for (; i < e; i++) {
      adamw_scalar(param[i], grad[i], m[i], v[i], k);
      if (h.zero_grad) grad[i] = 0.0f;
    }
  });
}

double sum_squares(const float* x, int64_t n) {
  double s = 0.0;
#pragma omp parallel for simd schedule(static) reduction(+ : s) if (n >= kSerialBelow)
  for (int64_t i = 0; i < n; i++) s += double(x[i]) * double(x[i]);
  return s;
}

}  // namespace kiln::cpu
