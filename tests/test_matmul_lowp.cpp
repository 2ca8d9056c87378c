// 16-bit-operand products (kernels/matmul_lowp.h): conversions bit-exact against the scalar reference
// (itself checked against values worked out by hand from the formats and against the F16C / AVX512-BF16
// conversion instructions), and products against ref:: versions that round each operand with the scalar
// conversion and sum in double. The only difference allowed there is fp32 accumulation error.
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/memory.h"
#include "core/rng.h"
#include "kernels/matmul.h"
#include "kernels/matmul_lowp.h"
#include "test_util.h"

using namespace kiln;

namespace {

uint32_t bits(float x) { return std::bit_cast<uint32_t>(x); }
float from_bits(uint32_t b) { return std::bit_cast<float>(b); }

// Special values, ties, subnormals and a spread of random bit patterns and random normals.
std::vector<float> conversion_inputs() {
  std::vector<uint32_t> b = {
      0x00000000, 0x80000000, 0x7f800000, 0xff800000,  // zeros, infinities
      0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fa12345, 0x7fbfffff,  // quiet / signalling NaNs
      0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,  // near FLT_MAX (bf16 rounds to inf or not)
      0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff,  // bf16 ties (to even) and near-ties
      0x3f801000, 0x3f803000, 0x3f801001, 0x3f800fff,  // fp16 ties and near-ties around 1
      0x00000001, 0x807fffff, 0x00008000, 0x00018000, 0x00400000, 0x00007fff,  // fp32 subnormals
      0x00800000, 0x80800000,                                                  // smallest normals
      0x477fe000, 0x477fefff, 0x477ff000, 0x47800000, 0xc77ff000,  // fp16 65504, its tie to inf, 65536
      0x33000000, 0x33000001, 0x33400000, 0x33800000, 0x387fc000, 0x387fe000, 0x38800000, 0x337fffff,
  };
  Rng r(7);
  for (int i = 0; i < 50000; i++) b.push_back(r.next_u32());
  std::vector<float> v;
  for (uint32_t x : b) v.push_back(from_bits(x));
  for (int i = 0; i < 50000; i++) v.push_back(r.normal() * std::ldexp(1.0f, int(r.next_u32() % 40) - 20));
  return v;
}

void expect_convert_matches_reference(LowpType t, const std::vector<float>& in) {
  // An odd length exercises the tails; the size above 16384 exercises the threaded split.
  std::vector<uint16_t> got(in.size(), 0xdead);
  cpu::to_lowp(got.data(), in.data(), int64_t(in.size()), t);
  int bad = 0;
  for (size_t i = 0; i < in.size() && bad < 5; i++) {
    const uint16_t want = ref::round_to_lowp(in[i], t);
    if (got[i] != want) {
      bad++;
      ADD_FAILURE() << lowp_type_name(t) << " input 0x" << std::hex << bits(in[i]) << ": got 0x" << got[i]
                    << ", want 0x" << want;
    }
  }
}

}  // namespace

TEST(MatmulLowpConvert, ScalarBf16ReferenceMatchesHandWorkedValues) {
  EXPECT_EQ(ref::round_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x3f808000)), 0x3f80);  // tie, kept part even: down
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x3f818000)), 0x3f82);  // tie, kept part odd: up
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x3f808001)), 0x3f81);  // above the tie: up
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x7f7fffff)), 0x7f80);  // FLT_MAX rounds to inf
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x00018000)), 0x0002);  // subnormal tie, odd: up (not flushed)
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x807fffff)), 0x8080);  // largest subnormal rounds to min normal
  EXPECT_EQ(ref::round_to_bf16(from_bits(0x7f800001)), 0x7fc0);  // NaN with low payload stays NaN
  EXPECT_EQ(ref::round_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
}

TEST(MatmulLowpConvert, ScalarFp16ReferenceMatchesHandWorkedValues) {
  EXPECT_EQ(ref::round_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(ref::round_to_fp16(65504.0f), 0x7bff);               // largest fp16
  EXPECT_EQ(ref::round_to_fp16(65519.99f), 0x7bff);              // below the tie to 65536
  EXPECT_EQ(ref::round_to_fp16(65520.0f), 0x7c00);               // tie: rounds to even = inf
  EXPECT_EQ(ref::round_to_fp16(-1e6f), 0xfc00);                  // overflow saturates to -inf
  EXPECT_EQ(ref::round_to_fp16(1.0f + 0x1p-11f), 0x3c00);        // tie, even: down
  EXPECT_EQ(ref::round_to_fp16(1.0f + 0x3p-11f), 0x3c02);        // tie, odd: up
  EXPECT_EQ(ref::round_to_fp16(0x1p-24f), 0x0001);               // smallest subnormal
  EXPECT_EQ(ref::round_to_fp16(0x1p-25f), 0x0000);               // half of it: tie to even zero
  EXPECT_EQ(ref::round_to_fp16(0x1.8p-25f), 0x0001);             // above the half: up
  EXPECT_EQ(ref::round_to_fp16(0x3p-24f), 0x0003);               // exact subnormal
  EXPECT_EQ(ref::round_to_fp16(0x1.ff8p-15f), 0x03ff);           // largest subnormal, exact
  EXPECT_EQ(ref::round_to_fp16(0x1.ffcp-15f), 0x0400);           // tie, odd: carries into the smallest normal
  EXPECT_EQ(ref::round_to_fp16(-0x1p-14f), 0x8400);              // smallest normal, negative
  EXPECT_EQ(ref::round_to_fp16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(ref::round_to_fp16(from_bits(0x7fa12345)) & 0x7e00, 0x7e00);  // NaN stays a quiet NaN
}

// The scalar reference against the conversion instructions (independent implementations): F16C for
// fp16 on every input; vcvtneps2bf16 for bf16 on inputs it handles exactly (it flushes subnormals).
TEST(MatmulLowpConvert, ScalarReferenceAgreesWithConversionInstructions) {
  auto in = conversion_inputs();
  for (uint32_t b = 0; b < 0xffffff00u; b += 65521) in.push_back(from_bits(b));  // a sweep of all exponents
  for (float x : in) {
    const uint16_t hw16 = uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    ASSERT_EQ(ref::round_to_fp16(x), hw16) << std::hex << "input 0x" << bits(x);
#if defined(__AVX512BF16__)
    const uint32_t ax = bits(x) & 0x7fffffffu;
    if (ax >= 0x00800000u || ax == 0) {
      const uint16_t hwbf = uint16_t(_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(x))));
      ASSERT_EQ(ref::round_to_bf16(x), hwbf) << std::hex << "input 0x" << bits(x);
    }
#endif
  }
}

TEST(MatmulLowpConvert, VectorBf16BitExact) { expect_convert_matches_reference(LowpType::BF16, conversion_inputs()); }
TEST(MatmulLowpConvert, VectorFp16BitExact) { expect_convert_matches_reference(LowpType::FP16, conversion_inputs()); }

TEST(MatmulLowpConvert, WideningIsExactForEveryBitPattern) {
  for (LowpType t : {LowpType::BF16, LowpType::FP16}) {
    std::vector<uint16_t> all(65536);
    for (int i = 0; i < 65536; i++) all[i] = uint16_t(i);
    std::vector<float> got(65536);
    cpu::from_lowp(got.data(), all.data(), 65536, t);
    for (int i = 0; i < 65536; i++) {
      const float want = ref::lowp_to_float(uint16_t(i), t);
      ASSERT_EQ(bits(got[i]), bits(want)) << lowp_type_name(t) << " 0x" << std::hex << i;
      if (!std::isnan(want)) {
        ASSERT_EQ(ref::round_to_lowp(want, t), uint16_t(i));  // round trip is exact
      }
    }
  }
  // Known values of the widening, from the formats.
  EXPECT_EQ(ref::lowp_to_float(0x3c00, LowpType::FP16), 1.0f);
  EXPECT_EQ(ref::lowp_to_float(0x7bff, LowpType::FP16), 65504.0f);
  EXPECT_EQ(ref::lowp_to_float(0x0001, LowpType::FP16), 0x1p-24f);
  EXPECT_EQ(ref::lowp_to_float(0xc000, LowpType::BF16), -2.0f);
}

namespace {

struct Operands {
  std::vector<float> f32;
  std::vector<uint16_t> lowp;
  LowpOperand op(bool as_lowp, int64_t ld) const { return as_lowp ? lowp_operand(lowp.data(), ld) : f32_operand(f32.data(), ld); }
};

Operands make_operand(size_t n, uint64_t seed, LowpType t) {
  Operands o{test::randn(n, seed), {}};
  o.lowp.resize(n);
  ref::to_lowp(o.lowp.data(), o.f32.data(), int64_t(n), t);
  return o;
}

// Σ_k |op(A)[i,k]|·|op(B)[k,j]| of the rounded operands, the scale of the fp32 accumulation error.
std::vector<float> abs_product(LowpType t, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const Operands& A,
                               const Operands& B) {
  std::vector<float> a(A.f32.size()), b(B.f32.size()), s(size_t(M * N));
  for (size_t i = 0; i < a.size(); i++) a[i] = std::fabs(ref::lowp_to_float(A.lowp[i], t));
  for (size_t i = 0; i < b.size(); i++) b[i] = std::fabs(ref::lowp_to_float(B.lowp[i], t));
  ref::gemm(ta, tb, M, N, K, 1.0f, a.data(), ta ? M : K, b.data(), tb ? K : N, 0.0f, s.data(), N);
  return s;
}

// |got - want| <= rel · (|alpha|·S + |beta·C0|) + tiny, elementwise.
::testing::AssertionResult within_accumulation_error(const std::vector<float>& got, const std::vector<float>& want,
                                                     const std::vector<float>& S, float alpha, float beta,
                                                     const std::vector<float>& C0, double rel) {
  for (size_t i = 0; i < got.size(); i++) {
    const double scale = std::fabs(alpha) * S[i] + (beta == 0.0f ? 0.0 : std::fabs(beta * C0[i]));
    const double err = std::fabs(double(got[i]) - want[i]);
    if (!(err <= rel * scale + 1e-30))
      return ::testing::AssertionFailure() << "element " << i << ": " << got[i] << " vs " << want[i] << " (scale "
                                           << scale << ")";
  }
  return ::testing::AssertionSuccess();
}

struct GemmCase {
  int64_t M, N, K;
};

void check_gemm(LowpType t, bool ta, bool tb, GemmCase c, bool a_lowp, bool b_lowp, float alpha, float beta,
                bool emulated) {
  const auto A = make_operand(size_t(c.M * c.K), 11, t), B = make_operand(size_t(c.K * c.N), 12, t);
  const int64_t lda = ta ? c.M : c.K, ldb = tb ? c.K : c.N;
  auto C0 = beta == 0.0f ? std::vector<float>(size_t(c.M * c.N), std::nanf("")) : test::randn(size_t(c.M * c.N), 13);
  auto got = C0, want = C0;
  Buffer scratch(kLowpScratchBytes);
  auto run = emulated ? cpu::gemm_lowp_sgemm : cpu::gemm_lowp;
  run(t, ta, tb, c.M, c.N, c.K, alpha, A.op(a_lowp, lda), B.op(b_lowp, ldb), beta, got.data(), c.N, scratch.data());
  ref::gemm_lowp(t, ta, tb, c.M, c.N, c.K, alpha, A.op(a_lowp, lda), B.op(b_lowp, ldb), beta, want.data(), c.N);
  const auto S = abs_product(t, ta, tb, c.M, c.N, c.K, A, B);
  EXPECT_TRUE(within_accumulation_error(got, want, S, alpha, beta, C0, 1e-5))
      << lowp_type_name(t) << " ta=" << ta << " tb=" << tb << " " << c.M << "x" << c.N << "x" << c.K
      << " a_lowp=" << a_lowp << " b_lowp=" << b_lowp << (emulated ? " emulated" : "");
}

}  // namespace

TEST(MatmulLowpGemm, MatchesRoundedReferenceForAllTransposesAndOperandKinds) {
  for (LowpType t : {LowpType::BF16, LowpType::FP16})
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (int kinds = 0; kinds < 3; kinds++) {  // f32·lowp (activation·weight), f32·f32, lowp·lowp
          const bool a_lowp = kinds == 2, b_lowp = kinds != 1;
          check_gemm(t, ta, tb, {37, 100, 48}, a_lowp, b_lowp, 1.0f, 0.0f, false);  // C starts as NaN
          check_gemm(t, ta, tb, {13, 70, 33}, a_lowp, b_lowp, -0.75f, 0.5f, false);  // odd depth, beta
          check_gemm(t, ta, tb, {301, 70, 41}, a_lowp, b_lowp, 1.0f, 1.0f, false);   // threads split M
        }
}

TEST(MatmulLowpGemm, EmulatedPathMatchesRoundedReference) {
  // What FP16 always runs, and BF16 on CPUs without AVX512-BF16.
  for (LowpType t : {LowpType::BF16, LowpType::FP16})
    for (bool ta : {false, true})
      for (bool tb : {false, true}) check_gemm(t, ta, tb, {37, 100, 48}, false, true, 1.5f, 0.25f, true);
}

TEST(MatmulLowpGemm, LargerThanOneBlockInEveryDimension) {
  // Crosses the packed bf16 kernel's blocks (384 rows, 1008 columns, 512 depths) and the emulated
  // path's (1024 rows or columns, 512 depths); the reference is the double-accumulating fp32 ref::gemm
  // on the operands rounded by the scalar conversion, which is what ref::gemm_lowp computes.
  struct Case {
    LowpType t;
    int64_t M, N, K;
  };
  for (Case c : {Case{LowpType::BF16, 390, 1010, 516}, Case{LowpType::FP16, 1030, 40, 530},
                 Case{LowpType::FP16, 20, 1030, 530}}) {
    const auto A = make_operand(size_t(c.M * c.K), 21, c.t), B = make_operand(size_t(c.K * c.N), 22, c.t);
    std::vector<float> ar(A.f32.size()), br(B.f32.size());
    for (size_t i = 0; i < ar.size(); i++) ar[i] = ref::lowp_to_float(A.lowp[i], c.t);
    for (size_t i = 0; i < br.size(); i++) br[i] = ref::lowp_to_float(B.lowp[i], c.t);
    for (bool tb : {false, true}) {
      const int64_t ldb = tb ? c.K : c.N;
      std::vector<float> got(size_t(c.M * c.N), std::nanf("")), want(got.size());
      Buffer scratch(kLowpScratchBytes);
      cpu::gemm_lowp(c.t, false, tb, c.M, c.N, c.K, 1.0f, f32_operand(A.f32.data(), c.K),
                     lowp_operand(B.lowp.data(), ldb), 0.0f, got.data(), c.N, scratch.data());
      ref::gemm(false, tb, c.M, c.N, c.K, 1.0f, ar.data(), c.K, br.data(), ldb, 0.0f, want.data(), c.N);
      const auto S = abs_product(c.t, false, tb, c.M, c.N, c.K, A, B);
      EXPECT_TRUE(within_accumulation_error(got, want, S, 1.0f, 0.0f, got, 1e-5))
          << lowp_type_name(c.t) << " " << c.M << "x" << c.N << "x" << c.K << " tb=" << tb;
    }
  }
}

TEST(MatmulLowpGemm, RoundingErrorHasTheSizeOfTheFormat) {
  // Against the unrounded fp32 product, the error must be of the order of the format's unit roundoff u
  // (2^-8 for bf16, 2^-11 for fp16): at most about 2u·S (each product of two rounded operands is off by
  // at most ~2u relative), and far above fp32's 2^-24, which shows the operands really were rounded.
  const int64_t M = 64, N = 96, K = 128;
  for (LowpType t : {LowpType::BF16, LowpType::FP16}) {
    const double u = t == LowpType::BF16 ? 0x1p-8 : 0x1p-11;
    const auto A = make_operand(size_t(M * K), 31, t), B = make_operand(size_t(K * N), 32, t);
    std::vector<float> got(size_t(M * N)), exact(got.size());
    Buffer scratch(kLowpScratchBytes);
    cpu::gemm_lowp(t, false, false, M, N, K, 1.0f, f32_operand(A.f32.data(), K), f32_operand(B.f32.data(), N), 0.0f,
                   got.data(), N, scratch.data());
    ref::gemm(false, false, M, N, K, 1.0f, A.f32.data(), K, B.f32.data(), N, 0.0f, exact.data(), N);
    const auto S = abs_product(t, false, false, M, N, K, A, B);
    double worst = 0, sum_rel = 0;
    for (size_t i = 0; i < got.size(); i++) {
      const double rel = std::fabs(double(got[i]) - exact[i]) / S[i];
      worst = std::max(worst, rel);
      sum_rel += rel;
    }
    const double mean = sum_rel / double(got.size());
    EXPECT_LE(worst, 2.0 * u + 1e-5) << lowp_type_name(t);
    // Random rounding errors of ~u/3 per operand add up like a random walk: mean error / S is about
    // u / sqrt(K) / 3 ~ u / 34 here. Require at least u / 200 (fp32 alone would give ~2^-24).
    EXPECT_GE(mean, u / 200) << lowp_type_name(t);
  }
}

TEST(MatmulLowpGemm, EmptySizesAndBadArguments) {
  Buffer scratch(kLowpScratchBytes);
  std::vector<float> C(6, std::nanf("")), one(1, 1.0f);
  cpu::gemm_lowp(LowpType::BF16, false, false, 2, 3, 0, 1.0f, f32_operand(one.data(), 1), f32_operand(one.data(), 3),
                 0.0f, C.data(), 3, scratch.data());
  for (float c : C) EXPECT_EQ(c, 0.0f);  // empty sum, beta 0
  cpu::gemm_lowp(LowpType::BF16, false, false, 0, 3, 4, 1.0f, f32_operand(one.data(), 4), f32_operand(one.data(), 3),
                 0.0f, C.data(), 3, scratch.data());  // nothing to do, nothing read
  EXPECT_THROW(cpu::gemm_lowp(LowpType::BF16, false, false, 2, 3, 4, 1.0f, LowpOperand{}, f32_operand(one.data(), 3),
                              0.0f, C.data(), 3, scratch.data()),
               Error);
  EXPECT_THROW(cpu::gemm_lowp(LowpType::BF16, false, false, 2, 3, 4, 1.0f, f32_operand(one.data(), 3),
                              f32_operand(one.data(), 3), 0.0f, C.data(), 3, scratch.data()),
               Error);  // lda 3 < K 4
  EXPECT_THROW(cpu::gemm_lowp(LowpType::FP16, false, false, 2, 3, 4, 1.0f, f32_operand(one.data(), 4),
                              f32_operand(one.data(), 3), 0.0f, C.data(), 3, nullptr),
               Error);  // no scratch
}

TEST(MatmulLowpLinear, ForwardAndBackwardMatchRoundedReference) {
  const int64_t N = 37;
  const int C = 100, OC = 48;
  Buffer scratch(kLowpScratchBytes);
  for (LowpType t : {LowpType::BF16, LowpType::FP16}) {
    const auto inp = test::randn(size_t(N * C), 41), dout = test::randn(size_t(N * OC), 42);
    const auto w32 = test::randn(size_t(C) * OC, 43, 0.1f), bias = test::randn(size_t(OC), 44);
    std::vector<uint16_t> w(w32.size());
    cpu::to_lowp(w.data(), w32.data(), int64_t(w.size()), t);
    for (bool with_bias : {true, false}) {
      std::vector<float> out(size_t(N * OC), std::nanf("")), out_ref(out.size());
      cpu::matmul_forward_lowp(out.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, N, C, OC, t,
                               scratch.data());
      ref::matmul_forward_lowp(out_ref.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, N, C, OC, t);
      EXPECT_TRUE(test::all_close(out, out_ref, 1e-5, 1e-5)) << lowp_type_name(t);
    }
    // dinp starts as NaN (overwritten), dweight and dbias start non-zero (accumulated into).
    std::vector<float> dinp(size_t(N * C), std::nanf("")), dinp_ref(dinp.size());
    auto dw = test::randn(w32.size(), 45), dw_ref = dw;
    auto db = test::randn(size_t(OC), 46), db_ref = db;
    cpu::matmul_backward_lowp(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, C, OC, t,
                              scratch.data());
    ref::matmul_backward_lowp(dinp_ref.data(), dw_ref.data(), db_ref.data(), dout.data(), inp.data(), w.data(), N, C,
                              OC, t);
    EXPECT_TRUE(test::all_close(dinp, dinp_ref, 1e-5, 1e-5)) << lowp_type_name(t);
    EXPECT_TRUE(test::all_close(dw, dw_ref, 1e-5, 1e-4)) << lowp_type_name(t);
    EXPECT_TRUE(test::all_close(db, db_ref, 1e-5, 1e-5)) << lowp_type_name(t);
    // Null gradients are skipped: only dweight computed, from the same start.
    auto dw2 = dw_ref;
    cpu::matmul_backward_lowp(nullptr, dw2.data(), nullptr, dout.data(), inp.data(), w.data(), N, C, OC, t,
                              scratch.data());
    ref::matmul_backward_lowp(nullptr, dw_ref.data(), nullptr, dout.data(), inp.data(), w.data(), N, C, OC, t);
    EXPECT_TRUE(test::all_close(dw2, dw_ref, 1e-5, 1e-4)) << lowp_type_name(t);
  }
}
