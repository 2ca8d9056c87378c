// Narrow-weight products (kernels/narrow_gemv.h): the conversion against the formats' definitions (bf16/f16
// exactly the scalar rounding; q8_0 within half a step of its block's scale, and the scale amax/127), the CPU
// kernels (each level this CPU has: AVX-512, AVX2, portable) against ref::, and a row's result independent of how
// many rows a call takes.
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/memory.h"
#include "kernels/narrow_gemv.h"
#include "test_util.h"

using namespace kiln;

namespace {

struct Narrow {
  std::vector<uint8_t> storage;
  NarrowMatrix A;
  Narrow(WeightFormat f, const std::vector<float>& w, int64_t M, int64_t K, bool transposed)
      : storage(narrow_bytes(f, M, K) + 64) {
    A = narrow_convert(storage.data(), f, w.data(), M, K, transposed);
  }
};

const WeightFormat kFormats[] = {WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0};
const cpu::NarrowIsa kLevels[] = {cpu::NarrowIsa::Avx512, cpu::NarrowIsa::Avx2, cpu::NarrowIsa::Portable};
const char* level_name(cpu::NarrowIsa l) {
  return l == cpu::NarrowIsa::Avx512 ? "avx512" : l == cpu::NarrowIsa::Avx2 ? "avx2" : "portable";
}

// Caps the kernels at a level for a scope (a level the CPU lacks runs the best one below it).
struct LimitIsa {
  explicit LimitIsa(cpu::NarrowIsa l) { cpu::narrow_limit_isa(l); }
  ~LimitIsa() { cpu::narrow_limit_isa(cpu::NarrowIsa::Avx512); }
};

TEST(NarrowGemv, FormatNames) {
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0})
    EXPECT_EQ(parse_weight_format(weight_format_name(f)), f);
  EXPECT_FALSE(parse_weight_format("q4_0"));
}

TEST(NarrowGemv, ConversionFollowsTheFormats) {
  const int64_t M = 137, K = 83;  // K: two whole q8 blocks and a partial one
  std::vector<float> w = test::randn(size_t(M * K), 3, 0.05f);
  w[5] = 0.0f;
  for (int64_t k = 0; k < 32; k++) w[size_t(2 * K + k)] = 0.0f;  // an all-zero block: scale 0
  for (WeightFormat f : kFormats)
    for (bool tr : {false, true}) {
      // The transposed source holds the same matrix as [K, M].
      std::vector<float> src(w.size());
      for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) src[size_t(tr ? k * M + m : m * K + k)] = w[size_t(m * K + k)];
      Narrow n(f, src, M, K, tr);
      for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
          const float v = w[size_t(m * K + k)], got = narrow_at(n.A, m, k);
          if (f == WeightFormat::BF16) {
            ASSERT_EQ(got, bf16_to_f32(f32_to_bf16(v)));
          }
          if (f == WeightFormat::F16) {
            ASSERT_EQ(got, f16_to_f32(f32_to_f16(v)));
          }
          if (f == WeightFormat::Q8_0) {
            const int64_t b = k / 32;
            float amax = 0;
            for (int64_t i = b * 32; i < std::min(K, b * 32 + 32); i++) amax = std::max(amax, std::fabs(w[size_t(m * K + i)]));
            const float d = f16_to_f32(n.A.d[m * (n.A.ld / 32) + b]);
            ASSERT_EQ(d, f16_to_f32(f32_to_f16(amax / 127.0f)));
            ASSERT_LE(std::fabs(got - v), 0.5f * d * 1.0001f + 1e-12f) << m << "," << k;
          }
        }
      if (f == WeightFormat::Q8_0) {
        EXPECT_EQ(n.A.ld, 96);
        for (int64_t k = K; k < n.A.ld; k++) EXPECT_EQ(static_cast<const uint8_t*>(n.A.q)[k], 128);  // padding: q = 0
      }
    }
}

void expect_matches_ref(WeightFormat f, int64_t M, int64_t K, int64_t N, bool bias, bool acc, cpu::NarrowIsa level) {
  SCOPED_TRACE(std::string(weight_format_name(f)) + " M" + std::to_string(M) + " K" + std::to_string(K) + " N" +
               std::to_string(N) + (bias ? " bias" : "") + (acc ? " acc" : "") + " " + level_name(level));
  const std::vector<float> w = test::randn(size_t(M * K), 11, 0.1f);
  const std::vector<float> b = test::randn(size_t(M), 12, 0.5f);
  const int64_t ldx = K + 3, ldy = M + 5;
  const std::vector<float> x = test::randn(size_t(N * ldx), 13);
  const std::vector<float> y0 = test::randn(size_t(N * ldy), 14);
  Narrow n(f, w, M, K, false);
  std::vector<float> got = y0, want = y0;
  {
    LimitIsa limit(level);
    cpu::narrow_gemm(got.data(), ldy, x.data(), ldx, N, n.A, bias ? b.data() : nullptr, acc);
  }
  const bool wide = N > kNarrowDirectRows;
  if (!wide) {
    ref::narrow_gemm(want.data(), ldy, x.data(), ldx, N, n.A, bias ? b.data() : nullptr, acc);
  } else {
    // Many rows widen the matrix and keep x in fp32: a double sum of the widened weights times x.
    for (int64_t r = 0; r < N; r++)
      for (int64_t m = 0; m < M; m++) {
        double s = bias ? b[size_t(m)] : 0.0;
        for (int64_t k = 0; k < K; k++) s += double(narrow_at(n.A, m, k)) * x[size_t(r * ldx + k)];
        float& o = want[size_t(r * ldy + m)];
        o = acc ? float(o + s) : float(s);
      }
  }
  // fp32 sums of K products of magnitude ~0.1·1.
  const double atol = 3e-6 * std::sqrt(double(K));
  for (int64_t r = 0; r < N; r++)
    for (int64_t m = M; m < ldy; m++)  // columns past M: untouched
      ASSERT_EQ(got[size_t(r * ldy + m)], y0[size_t(r * ldy + m)]);
  EXPECT_TRUE(test::all_close(got, want, 1e-5, atol));
}

TEST(NarrowGemv, MatchesReference) {
  for (WeightFormat f : kFormats)
    for (int64_t K : {16, 29, 64, 96, 200, 768})
      for (int64_t N : {int64_t(1), int64_t(3), int64_t(8), int64_t(9), int64_t(16), int64_t(17), int64_t(40),
                        int64_t(kNarrowDirectRows + 1)})
        for (cpu::NarrowIsa level : kLevels) {
          if (N > 9 && K != 96 && K != 768) continue;
          expect_matches_ref(f, 70, K, N, N % 2 == 1, N == 3 || N == 17, level);
        }
  // Enough rows for the threads to split the matrix.
  for (WeightFormat f : kFormats)
    for (cpu::NarrowIsa level : kLevels) expect_matches_ref(f, 1000, 512, 2, true, true, level);
}

TEST(NarrowGemv, RowResultIndependentOfRowCount) {
  const int64_t M = 300, K = 168, N = kNarrowDirectRows;  // K: the 16-bit kernels' 16- and 8-wide steps and a tail
  const std::vector<float> w = test::randn(size_t(M * K), 21, 0.1f), x = test::randn(size_t(N * K), 22);
  for (cpu::NarrowIsa level : kLevels) {
    LimitIsa limit(level);
    for (WeightFormat f : kFormats) {
      Narrow n(f, w, M, K, false);
      std::vector<float> all(size_t(N * M));
      cpu::narrow_gemm(all.data(), M, x.data(), K, N, n.A, nullptr, false);
      for (int64_t r = 0; r < N; r++) {
        std::vector<float> one(static_cast<size_t>(M));
        cpu::narrow_gemm(one.data(), M, x.data() + r * K, K, 1, n.A, nullptr, false);
        for (int64_t m = 0; m < M; m++)
          ASSERT_EQ(one[size_t(m)], all[size_t(r * M + m)]) << weight_format_name(f) << " " << level_name(level)
                                                             << " row " << r;
      }
    }
  }
}

TEST(NarrowGemv, KernelNames) {
  // This machine's kernels (the names say which path the speed numbers come from).
  for (WeightFormat f : kFormats) EXPECT_NE(std::string(cpu::narrow_kernel_name(f)), "");
  {
    LimitIsa limit(cpu::NarrowIsa::Portable);
    EXPECT_STREQ(cpu::narrow_kernel_name(WeightFormat::Q8_0), "portable");
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    LimitIsa limit(cpu::NarrowIsa::Avx2);
    for (WeightFormat f : kFormats) EXPECT_STREQ(cpu::narrow_kernel_name(f), "avx2");
  }
}

}  // namespace
