// The feed-forward activations, their gated forms and add, threaded and vectorised.
//
// GELU (tanh approximation):
// 0.5·x·(1 + tanh(u)) = x·sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/π)·(x + 0.044715·x³):
// one exp instead of a tanh, and no cancellation in 1 + tanh(u) for very negative x.
// With s = sigmoid(2u): d/dx = s + 2·x·s·(1 - s)·u'(x), u' = sqrt(2/π)·(1 + 3·0.044715·x²).
// activation_forward/backward with GeluTanh call gelu_forward/backward, so GPT-2 keeps the same bits.
//
// GELU (erf): x·Φ(x), Φ(x) = erfc(−x/√2)/2, with erfc from the Chebyshev-fitted t·exp(−z² + P(t)),
// t = 1/(1 + z/2) (relative error ~1.2e-7 over the whole range, so the far negative tail stays accurate);
// d/dx = Φ(x) + x·φ(x). SiLU: x·σ(x), d/dx = σ·(1 + x·(1 − σ)). ReLU², ReLU: by cases.
#include "kernels/activation.h"

#include <cmath>

#include "core/error.h"

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

constexpr float kInvSqrt2 = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

// Value f(x) and derivative f'(x) of each activation, 16 lanes (AVX-512) or one float. `Grad` selects
// whether the derivative is wanted (the compiler drops the unused half).
#ifdef __AVX512F__
using V = __m512;
inline V vset(float x) { return _mm512_set1_ps(x); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
inline V vexp(V x) { return vmath::exp16(x); }
inline V vabs(V x) { return _mm512_abs_ps(x); }
inline V vpos(V x, V a) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ), a); }
inline V vsel_neg(V x, V if_neg, V otherwise) {  // x < 0 ? if_neg : otherwise
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_neg);
}
#else
using V = float;
inline V vset(float x) { return x; }
inline V vmul(V a, V b) { return a * b; }
inline V vadd(V a, V b) { return a + b; }
inline V vsub(V a, V b) { return a - b; }
inline V vfma(V a, V b, V c) { return a * b + c; }
inline V vdiv(V a, V b) { return a / b; }
inline V vexp(V x) { return vmath::exp_scalar(x); }
inline V vabs(V x) { return std::fabs(x); }
inline V vpos(V x, V a) { return x > 0.0f ? a : 0.0f; }
inline V vsel_neg(V x, V if_neg, V otherwise) { return x < 0.0f ? if_neg : otherwise; }
#endif

// Φ(x) = erfc(−x/√2) / 2.
inline V phi_cdf(V x) {
  const V z = vmul(x, vset(-kInvSqrt2)), az = vabs(z);
  const V t = vdiv(vset(1.0f), vfma(az, vset(0.5f), vset(1.0f)));
  V poly = vset(0.17087277f);
  for (float c : {-0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f, 0.37409196f,
                  1.00002368f, -1.26551223f})
    poly = vfma(poly, t, vset(c));
  const V e = vmul(t, vexp(vsub(poly, vmul(az, az))));  // erfc(|z|)
  const V erfc = vsel_neg(z, vsub(vset(2.0f), e), e);
  return vmul(erfc, vset(0.5f));
}

template <Activation A, bool Grad>
inline void act(V x, V& f, V& df) {
  if constexpr (A == Activation::GeluTanh) {
#ifdef __AVX512F__
    f = gelu16(x);
    if constexpr (Grad) df = gelu_grad16(x);
#else
    const float s = sigmoid_2u(x);
    f = x * s;
    if constexpr (Grad) df = s + 2.0f * x * s * (1.0f - s) * kGeluK * (1.0f + 3.0f * kGeluC * x * x);
#endif
  } else if constexpr (A == Activation::GeluErf) {
    const V c = phi_cdf(x);
    f = vmul(x, c);
    if constexpr (Grad) df = vfma(vmul(x, vset(kInvSqrt2Pi)), vexp(vmul(vmul(x, x), vset(-0.5f))), c);
  } else if constexpr (A == Activation::Relu) {
    f = vpos(x, x);
    if constexpr (Grad) df = vpos(x, vset(1.0f));
  } else if constexpr (A == Activation::Silu) {
    const V s = vdiv(vset(1.0f), vadd(vset(1.0f), vexp(vsub(vset(0.0f), x))));
    f = vmul(x, s);
    if constexpr (Grad) df = vmul(s, vfma(x, vsub(vset(1.0f), s), vset(1.0f)));
  } else {  // Relu2
    f = vpos(x, vmul(x, x));
    if constexpr (Grad) df = vpos(x, vadd(x, x));
  }
}

// Runs body(i, mask) over [b, e) in steps of 16 lanes (the last step masked), or one element at a time
// without AVX-512.
template <class Body>
inline void lanes(int64_t b, int64_t e, Body&& body) {
#ifdef __AVX512F__
  int64_t i = b;
  for (; i + 16 <= e; i += 16) body(i, __mmask16(0xFFFF));
  if (i < e) body(i, vmath::tail_mask(e - i));
#else
  for (int64_t i = b; i < e; i++) body(i, 0);
#endif
}

#ifdef __AVX512F__
inline V vload(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline void vstore(float* p, __mmask16 k, V v) { _mm512_mask_storeu_ps(p, k, v); }
#else
inline V vload(const float* p, int) { return *p; }
inline void vstore(float* p, int, V v) { *p = v; }
#endif

template <Activation A>
void forward_impl(float* out, const float* inp, int64_t n) {
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    lanes(b, e, [&](int64_t i, auto k) {
      V f, df;
      act<A, false>(vload(inp + i, k), f, df);
      vstore(out + i, k, f);
    });
  });
}

template <Activation A>
void backward_impl(float* dinp, const float* inp, const float* dout, int64_t n) {
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    lanes(b, e, [&](int64_t i, auto k) {
      V f, df;
      act<A, true>(vload(inp + i, k), f, df);
      vstore(dinp + i, k, vmul(df, vload(dout + i, k)));
    });
  });
}

template <Activation A>
void gated_forward_impl(float* out, const float* gate_up, int64_t N, int I) {
#pragma omp parallel for schedule(static) if (N * I >= kSerialBelow)
  for (int64_t n = 0; n < N; n++) {
    const float* g = gate_up + n * 2 * I;
    const float* u = g + I;
    float* o = out + n * I;
    lanes(0, I, [&](int64_t i, auto k) {
      V f, df;
      act<A, false>(vload(g + i, k), f, df);
      vstore(o + i, k, vmul(f, vload(u + i, k)));
    });
  }
}

template <Activation A>
void gated_backward_impl(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I) {
#pragma omp parallel for schedule(static) if (N * I >= kSerialBelow)
  for (int64_t n = 0; n < N; n++) {
    const float* g = gate_up + n * 2 * I;
    const float* u = g + I;
    const float* dy = dout + n * I;
    float* dg = dgate_up + n * 2 * I;
    float* du = dg + I;
    lanes(0, I, [&](int64_t i, auto k) {
      V f, df;
      act<A, true>(vload(g + i, k), f, df);
      const V d = vload(dy + i, k);
      vstore(dg + i, k, vmul(vmul(df, vload(u + i, k)), d));
      vstore(du + i, k, vmul(f, d));
    });
  }
}

// Calls fn.template operator()<A>() for the runtime activation a.
template <class Fn>
void dispatch(Activation a, Fn&& fn) {
  switch (a) {
    case Activation::GeluTanh: return fn.template operator()<Activation::GeluTanh>();
    case Activation::GeluErf: return fn.template operator()<Activation::GeluErf>();
    case Activation::Relu: return fn.template operator()<Activation::Relu>();
    case Activation::Silu: return fn.template operator()<Activation::Silu>();
    case Activation::Relu2: return fn.template operator()<Activation::Relu2>();
  }
  fail("activation: unknown Activation ", int(a));
}
}  // namespace

void activation_forward(float* out, const float* inp, int64_t n, Activation a) {
  if (a == Activation::GeluTanh) return gelu_forward(out, inp, n);  // the very same bits as GPT-2's path
  dispatch(a, [&]<Activation A>() { forward_impl<A>(out, inp, n); });
}

void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a) {
  if (a == Activation::GeluTanh) return gelu_backward(dinp, inp, dout, n);
  dispatch(a, [&]<Activation A>() { backward_impl<A>(dinp, inp, dout, n); });
}

void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a) {
  KILN_CHECK(N >= 0 && I >= 0, "gated_forward: N (", N, ") and I (", I, ") must be non-negative");
  dispatch(a, [&]<Activation A>() { gated_forward_impl<A>(out, gate_up, N, I); });
}

void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a) {
  KILN_CHECK(N >= 0 && I >= 0, "gated_backward: N (", N, ") and I (", I, ") must be non-negative");
  dispatch(a, [&]<Activation A>() { gated_backward_impl<A>(dgate_up, gate_up, dout, N, I); });
}

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
