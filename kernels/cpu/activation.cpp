// GELU (tanh approximation) and add, threaded and vectorised.
// 0.5·x·(1 + tanh(u)) = x·sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/π)·(x + 0.044715·x³):
// one exp instead of a tanh, and no cancellation in 1 + tanh(u) for very negative x.
// With s = sigmoid(2u): d/dx = s + 2·x·s·(1 - s)·u'(x), u' = sqrt(2/π)·(1 + 3·0.044715·x²).
#include "kernels/activation.h"

#include <cmath>

#include "kernels/cpu/parallel.h"
#include "kernels/cpu/vec_math.h"

namespace kiln::cpu {

namespace {
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2/π)
constexpr float kGeluC = 0.044715f;

#ifdef __AVX512F__
inline __m512 sigmoid_2u(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 u = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(kGeluK)),
                                 _mm512_fmadd_ps(x2, _mm512_set1_ps(kGeluC), _mm512_set1_ps(1.0f)));
  const __m512 e = vmath::exp16(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
  return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}
inline __m512 gelu16(__m512 x) { return _mm512_mul_ps(x, sigmoid_2u(x)); }
inline __m512 gelu_grad16(__m512 x) {
  const __m512 s = sigmoid_2u(x);
  const __m512 du = _mm512_mul_ps(_mm512_set1_ps(kGeluK),
                                  _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(3.0f * kGeluC),
                                                  _mm512_set1_ps(1.0f)));
  // s + 2·x·s·(1-s)·du
  const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(x, x), s), _mm512_sub_ps(_mm512_set1_ps(1.0f), s));
  return _mm512_fmadd_ps(t, du, s);
}
#else
inline float sigmoid_2u(float x) {
  const float u = kGeluK * x * (1.0f + kGeluC * x * x);
  return 1.0f / (1.0f + std::exp(-2.0f * u));
}
#endif
}  // namespace

void gelu_forward(float* out, const float* inp, int64_t n) {
  parallel_ranges(n, [&](int64_t b, int64_t e) {
#ifdef __AVX512F__
    int64_t i = b;
    for (; i + 16 <= e; i += 16) _mm512_storeu_ps(out + i, gelu16(_mm512_loadu_ps(inp + i)));
    if (i < e) {
      const __mmask16 k = vmath::tail_mask(e - i);
      _mm512_mask_storeu_ps(out + i, k, gelu16(_mm512_maskz_loadu_ps(k, inp + i)));
    }
#else
    for (int64_t i = b; i < e; i++) out[i] = inp[i] * sigmoid_2u(inp[i]);
#endif
  });
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
  parallel_ranges(n, [&](int64_t b, int64_t e) {
#ifdef __AVX512F__
    int64_t i = b;
    for (; i + 16 <= e; i += 16)
      _mm512_storeu_ps(dinp + i, _mm512_mul_ps(gelu_grad16(_mm512_loadu_ps(inp + i)), _mm512_loadu_ps(dout + i)));
    if (i < e) {
      const __mmask16 k = vmath::tail_mask(e - i);
      const __m512 g = gelu_grad16(_mm512_maskz_loadu_ps(k, inp + i));
      _mm512_mask_storeu_ps(dinp + i, k, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(k, dout + i)));
    }
#else
    for (int64_t i = b; i < e; i++) {
      const float x = inp[i], s = sigmoid_2u(x);
      const float du = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
      dinp[i] = (s + 2.0f * x * s * (1.0f - s) * du) * dout[i];
    }
#endif
  });
}

void add(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= kSerialBelow)
  for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

}  // namespace kiln::cpu
