// Naive reference for the 16-bit-operand products: bit-level scalar conversions written from the IEEE
// formats, every operand rounded on its own, sums in double. Used only by tests.
#include <bit>
#include <cstring>

#include "kernels/matmul_lowp.h"

namespace kiln {

const char* lowp_type_name(LowpType t) { return t == LowpType::BF16 ? "bf16" : "fp16"; }

namespace ref {

namespace {
uint32_t bits_of(float x) { return std::bit_cast<uint32_t>(x); }
float float_of(uint32_t b) { return std::bit_cast<float>(b); }
}  // namespace

// bf16 is the top half of an fp32: add just under half an ulp, plus one if the kept part is odd (ties
// to even), and truncate. A carry out of the mantissa correctly bumps the exponent (up to inf).
uint16_t round_to_bf16(float x) {
  const uint32_t b = bits_of(x);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x0040u);  // NaN: make it quiet
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

uint16_t round_to_fp16(float x) {
  const uint32_t b = bits_of(x);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t ax = b & 0x7fffffffu;
  const uint32_t exp = ax >> 23, mant = ax & 0x7fffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u | (mant >> 13));  // NaN: quiet, top payload
  if (exp >= 143) return uint16_t(sign | 0x7c00u);                        // >= 2^16 (or inf): inf
  if (exp >= 113) {                                                       // fp16 normal range
    uint32_t h = ((exp - 112) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;  // carry may reach 0x7c00 = inf: right
    return uint16_t(sign | h);
  }
  // fp16 subnormal (or zero): count in units of 2^-24. The value is m · 2^(e - 150) with the implicit bit
  // in m for normal inputs; dividing by 2^-24 shifts m right by 126 - e.
  const uint32_t e = exp == 0 ? 1 : exp;
  const uint32_t m = exp == 0 ? mant : (mant | 0x800000u);
  const uint32_t shift = 126 - e;  // >= 14
  if (shift > 24) return sign;     // below a quarter of the smallest subnormal: rounds to zero
  uint32_t h = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) h++;  // may carry into the smallest normal: right
  return uint16_t(sign | h);
}

uint16_t round_to_lowp(float x, LowpType t) { return t == LowpType::BF16 ? round_to_bf16(x) : round_to_fp16(x); }

float lowp_to_float(uint16_t h, LowpType t) {
  if (t == LowpType::BF16) return float_of(uint32_t(h) << 16);
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) {  // inf, or NaN: quiet, as the conversion instruction returns it
    return float_of(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  }
  if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (mant << 13));
  // Subnormal: mant · 2^-24, exact in fp32.
  const float v = float(mant) * (1.0f / 16777216.0f);
  return sign ? -v : v;
}

void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t) {
  for (int64_t i = 0; i < n; i++) dst[i] = round_to_lowp(src[i], t);
}

namespace {
// Element (r, c) of a stored matrix, rounded to the 16-bit type and widened back.
double rounded(const LowpOperand& m, int64_t r, int64_t c, LowpType t) {
  const int64_t at = r * m.ld + c;
  return m.lowp ? lowp_to_float(m.lowp[at], t) : lowp_to_float(round_to_lowp(m.f32[at], t), t);
}
}  // namespace

void gemm_lowp(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      double s = 0;
      for (int64_t k = 0; k < K; k++) {
        const double a = trans_a ? rounded(A, k, i, t) : rounded(A, i, k, t);
        const double b = trans_b ? rounded(B, j, k, t) : rounded(B, k, j, t);
        s += a * b;
      }
      const double c = beta == 0.0f ? 0.0 : double(beta) * C[i * ldc + j];  // beta 0: C not read
      C[i * ldc + j] = float(double(alpha) * s + c);
    }
  }
}

void matmul_forward_lowp(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int C, int OC, LowpType t) {
  for (int64_t n = 0; n < N; n++) {
    for (int o = 0; o < OC; o++) {
      double s = bias ? bias[o] : 0.0;
      for (int c = 0; c < C; c++)
        s += double(lowp_to_float(round_to_lowp(inp[n * C + c], t), t)) *
             lowp_to_float(weight[int64_t(c) * OC + o], t);
      out[n * OC + o] = float(s);
    }
  }
}

void matmul_backward_lowp(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int C, int OC, LowpType t) {
  auto r = [t](float x) { return double(lowp_to_float(round_to_lowp(x, t), t)); };
  if (dinp) {
    for (int64_t n = 0; n < N; n++) {
      for (int c = 0; c < C; c++) {
        double s = 0;
        for (int o = 0; o < OC; o++) s += r(dout[n * OC + o]) * lowp_to_float(weight[int64_t(c) * OC + o], t);
        dinp[n * C + c] = float(s);
      }
    }
  }
  if (dweight) {
    for (int c = 0; c < C; c++) {
      for (int o = 0; o < OC; o++) {
        double s = 0;
        for (int64_t n = 0; n < N; n++) s += r(inp[n * C + c]) * r(dout[n * OC + o]);
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

}  // namespace ref
}  // namespace kiln
