// Fused softmax + cross-entropy, threaded over rows. Per row (a GPT-2 row of 50257 floats is 200 KB and
// stays in L2 between the sweeps):
//   1. max of the row;
//   2. e = exp(x - max) summed; when a gradient is wanted, e is stored over the logits as it goes
//      (after x[target] has been saved for the loss), so exp runs once per element;
//   3. loss = log(sum) + max - x[target]; gradient = e·(grad_scale/sum), minus grad_scale at the target.
// With grad_scale == 0 the row is only read.
#include "kernels/crossentropy.h"

#include <cmath>
#include <limits>

#include "core/error.h"
#include "kernels/cpu/vec_math.h"

namespace kiln::cpu {

namespace {

#ifdef __AVX512F__
float row_max(const float* x, int V) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int i = 0;
  for (; i + 16 <= V; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  if (i < V) m = _mm512_mask_max_ps(m, vmath::tail_mask(V - i), m, _mm512_maskz_loadu_ps(vmath::tail_mask(V - i), x + i));
  return _mm512_reduce_max_ps(m);
}

// Sum of exp(x - mx); with store, x is overwritten by those exponentials.
template <bool kStore>
float row_sum_exp(float* x, int V, float mx) {
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= V; i += 32) {
    __m512 e0 = vmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
    __m512 e1 = vmath::exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm));
    if (kStore) {
      _mm512_storeu_ps(x + i, e0);
      _mm512_storeu_ps(x + i + 16, e1);
    }
    s0 = _mm512_add_ps(s0, e0);
    s1 = _mm512_add_ps(s1, e1);
  }
  for (; i < V; i += 16) {
    const __mmask16 k = V - i >= 16 ? __mmask16(0xffff) : vmath::tail_mask(V - i);
    __m512 e = vmath::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm));
    if (kStore) _mm512_mask_storeu_ps(x + i, k, e);
    s0 = _mm512_mask_add_ps(s0, k, s0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

void row_scale(float* x, int V, float scale) {
  const __m512 vs = _mm512_set1_ps(scale);
  int i = 0;
  for (; i + 16 <= V; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), vs));
  if (i < V) {
    const __mmask16 k = vmath::tail_mask(V - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vs));
  }
}
#else
float row_max(const float* x, int V) {
  float m = x[0];
  for (int i = 1; i < V; i++) m = x[i] > m ? x[i] : m;
  return m;
}
template <bool kStore>
float row_sum_exp(float* x, int V, float mx) {
  float s = 0.0f;
  for (int i = 0; i < V; i++) {
    const float e = std::exp(x[i] - mx);
    if (kStore) x[i] = e;
    s += e;
  }
  return s;
}
void row_scale(float* x, int V, float scale) {
  for (int i = 0; i < V; i++) x[i] *= scale;
}
#endif

}  // namespace

void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale) {
  KILN_CHECK(V > 0 && ld >= V, "softmax_crossentropy: vocabulary size ", V, " with row stride ", ld);
  // Validate before the parallel region (an exception must not escape an OpenMP thread).
  for (int64_t n = 0; n < N; n++)
    KILN_CHECK(targets[n] < V, "softmax_crossentropy: target ", targets[n], " at row ", n,
               " is outside the vocabulary of ", V);
  const bool grad = grad_scale != 0.0f;
#pragma omp parallel for schedule(static) if (N * int64_t(V) > 16384)
  for (int64_t n = 0; n < N; n++) {
    float* x = logits + n * ld;
    const int t = targets[n];
    if (t < 0) {  // ignored row
      losses[n] = 0.0f;
      if (grad)
        for (int i = 0; i < V; i++) x[i] = 0.0f;
      continue;
    }
    const float xt = x[t];
    const float mx = row_max(x, V);
    const float sum = grad ? row_sum_exp<true>(x, V, mx) : row_sum_exp<false>(x, V, mx);
    losses[n] = std::log(sum) + mx - xt;
    if (grad) {
      row_scale(x, V, grad_scale / sum);
      x[t] -= grad_scale;
    }
  }
}

}  // namespace kiln::cpu
