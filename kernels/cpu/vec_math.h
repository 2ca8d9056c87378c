// Vectorised exp for the CPU kernels (softmax, cross-entropy, GELU), accurate to a couple of ulp of std::exp.
//
// exp(x) = 2^n · exp(r) with n = round(x·log2 e) and r = x - n·ln 2 (Cody-Waite: ln 2 split in a high
// part with trailing zero bits and a low correction, so n·ln2_hi is exact), |r| <= ln2/2; exp(r) is
// 1 + r + r²·P(r) with the degree-5 polynomial of Cephes' expf. The scaling by 2^n uses vscalefps,
// which rounds correctly into the subnormal range and saturates to 0 / inf. x is clamped first so that
// n stays finite (exp(-105) is below the smallest subnormal, exp(89) above FLT_MAX); NaN passes through.
#pragma once
#include <cmath>

#ifdef __AVX512F__
// GCC 12's _mm512_undefined_ps() reads itself on purpose, which -Wmaybe-uninitialized flags in every caller.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace kiln::cpu::vmath {

inline constexpr float kExpLo = -105.0f, kExpHi = 89.0f;
inline constexpr float kLog2e = 1.44269504088896341f;
inline constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
inline constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                       kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

// Scalar version of the same algorithm (for builds without AVX-512, and so tests can check both).
inline float exp_scalar(float x) {
  if (std::isnan(x)) return x;
  x = std::fmin(std::fmax(x, kExpLo), kExpHi);
  float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = kP0;
  p = std::fma(p, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  p = std::fma(p, r * r, r) + 1.0f;
  return std::ldexp(p, int(n));
}

#ifdef __AVX512F__
inline __m512 exp16(__m512 x) {
  // max/min return their second operand when either is NaN, so a NaN x survives the clamp.
  x = _mm512_max_ps(_mm512_set1_ps(kExpLo), x);
  x = _mm512_min_ps(_mm512_set1_ps(kExpHi), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP5));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Mask selecting the first `rem` (< 16) lanes, for loop tails.
inline __mmask16 tail_mask(int64_t rem) { return __mmask16((1u << rem) - 1u); }
#endif

}  // namespace kiln::cpu::vmath
