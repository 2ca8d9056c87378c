// cuda:: matrix products (kernels/cuda/matmul.cu), what the op table (tests/ops/: gemm in all layouts, the
// forward with bias and GELU epilogues, the backward) does not check: the bf16 bias equals the rounded fp32
// one bit for bit, the residual add in place and apart, repeated accumulation and null gradients, the tied LM
// head, bad leading dimensions. Against the fp32 reference kernels run on the same bf16-rounded inputs.
// Tolerances per element: fp32 outputs 1e-4 relative plus 1e-5 of the sum of |terms| (the products are
// exact, only the fp32 sums differ); bf16 outputs 8e-3 relative (bf16 rounding).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "core/gpu.h"
#include "kernels/activation.h"
#include "kernels/matmul.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {
using test::DeviceVec;
using test::from_bf16;
using test::round_bf16;
using test::to_bf16;

std::vector<float> absv(std::vector<float> v) {
  for (auto& x : v) x = std::fabs(x);
  return v;
}

// |got - want| <= tol for each element; reports the worst one.
::testing::AssertionResult within(const std::vector<float>& got, const std::vector<float>& want,
                                  const std::vector<double>& tol) {
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < want.size(); i++) {
    if (!std::isfinite(got[i])) return ::testing::AssertionFailure() << "non-finite at " << i;
    double r = std::fabs(double(got[i]) - want[i]) / tol[i];
    if (r > worst) worst = r, wi = i;
  }
  if (worst <= 1) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "index " << wi << ": " << got[wi] << " vs " << want[wi]
                                       << " (ratio to tolerance " << worst << ")";
}

struct Linear {
  int64_t N;
  int C, OC;
  std::vector<float> inp, w, bias;  // inp and w already bf16-exact
  Linear(int64_t n, int c, int oc, uint64_t seed) : N(n), C(c), OC(oc) {
    inp = round_bf16(test::randn(N * C, seed));
    w = round_bf16(test::randn(int64_t(C) * OC, seed + 1, 0.2f));
    bias = test::randn(OC, seed + 2, 0.5f);
  }
  // Sum of |terms| of each output, the scale of fp32 summation error.
  std::vector<float> magnitude(bool with_bias) const {
    std::vector<float> m(N * OC);
    auto ab = absv(bias);
    ref::matmul_forward(m.data(), absv(inp).data(), absv(w).data(), with_bias ? ab.data() : nullptr, N, C, OC);
    return m;
  }
};

// A bias already in bf16 (the model's bf16 parameter copy) gives exactly what the fp32 bias gives, since that
// one is rounded to bf16 first (cuBLASLt's bias type is the output's), with and without the GELU epilogue.
TEST(MatmulGpu, Bf16BiasEqualsRoundedFp32Bias) {
  KILN_REQUIRE_GPU();
  for (int OC : {200, 36}) {
    Linear L(19, 40, OC, 31);
    DeviceVec<uint16_t> dinp(to_bf16(L.inp)), dw(to_bf16(L.w)), b16(to_bf16(L.bias));
    DeviceVec<float> db(L.bias);
    DeviceVec<uint16_t> o1(19 * OC), o2(19 * OC), p1(19 * OC), p2(19 * OC);
    cuda::matmul_forward(o1.get(), dinp.get(), dw.get(), db.get(), 19, 40, OC, gpu::stream(), p1.get());
    cuda::matmul_forward_bf16_bias(o2.get(), dinp.get(), dw.get(), b16.get(), 19, 40, OC, gpu::stream(), p2.get());
    EXPECT_EQ(o1.download(), o2.download()) << "OC " << OC;
    EXPECT_EQ(p1.download(), p2.download()) << "OC " << OC;
    cuda::matmul_forward(o1.get(), dinp.get(), dw.get(), db.get(), 19, 40, OC, gpu::stream());
    cuda::matmul_forward_bf16_bias(o2.get(), dinp.get(), dw.get(), b16.get(), 19, 40, OC, gpu::stream());
    EXPECT_EQ(o1.download(), o2.download()) << "OC " << OC << " without GELU";
  }
}

TEST(MatmulGpu, ForwardResidualInPlaceAndApart) {
  KILN_REQUIRE_GPU();
  const int64_t N = 37;
  const int C = 72, OC = 200;
  Linear L(N, C, OC, 31);
  auto residual = test::randn(N * OC, 34);
  std::vector<float> want(N * OC);
  ref::matmul_forward(want.data(), L.inp.data(), L.w.data(), L.bias.data(), N, C, OC);
  auto mag = L.magnitude(true);
  std::vector<double> tol(want.size());
  for (size_t i = 0; i < want.size(); i++) {
    want[i] += residual[i];
    tol[i] = 1e-4 * std::fabs(want[i]) + 1e-5 * (mag[i] + std::fabs(residual[i]));
  }
  DeviceVec<uint16_t> dinp(to_bf16(L.inp)), dw(to_bf16(L.w));
  DeviceVec<float> db(L.bias), dres(residual), dout(N * OC);
  cuda::matmul_forward_residual(dout.get(), dres.get(), dinp.get(), dw.get(), db.get(), N, C, OC, gpu::stream());
  EXPECT_TRUE(within(dout.download(), want, tol)) << "out apart from residual";
  EXPECT_EQ(dres.download(), residual) << "residual changed";
  cuda::matmul_forward_residual(dres.get(), dres.get(), dinp.get(), dw.get(), db.get(), N, C, OC, gpu::stream());
  EXPECT_TRUE(within(dres.download(), want, tol)) << "out == residual";
  // Without bias.
  ref::matmul_forward(want.data(), L.inp.data(), L.w.data(), nullptr, N, C, OC);
  for (size_t i = 0; i < want.size(); i++) want[i] += residual[i];
  dres.upload(residual);
  cuda::matmul_forward_residual(dres.get(), dres.get(), dinp.get(), dw.get(), nullptr, N, C, OC, gpu::stream());
  EXPECT_TRUE(within(dres.download(), want, tol)) << "no bias";
}

TEST(MatmulGpu, BackwardOverwritesDinpAndAccumulatesDweightDbias) {
  KILN_REQUIRE_GPU();
  const int64_t N = 37;
  const int C = 72, OC = 200;
  Linear L(N, C, OC, 41);
  auto dout = round_bf16(test::randn(N * OC, 44));
  auto dw0 = test::randn(int64_t(C) * OC, 45), db0 = test::randn(OC, 46);
  // Reference: the fp32 backward on the same values, accumulating into copies of the pre-filled gradients.
  std::vector<float> want_dinp(N * C), want_dw = dw0, want_db = db0;
  ref::matmul_backward(want_dinp.data(), want_dw.data(), want_db.data(), dout.data(), L.inp.data(), L.w.data(), N, C,
                       OC);
  std::vector<float> mag_dinp(N * C), mag_dw(int64_t(C) * OC, 0.0f), mag_db(OC, 0.0f);
  ref::matmul_backward(mag_dinp.data(), mag_dw.data(), mag_db.data(), absv(dout).data(), absv(L.inp).data(),
                       absv(L.w).data(), N, C, OC);

  DeviceVec<uint16_t> ddout(to_bf16(dout)), dinp_in(to_bf16(L.inp)), dwt(to_bf16(L.w)),
      ddinp(to_bf16(test::randn(N * C, 47)));  // garbage: dinp is overwritten
  DeviceVec<float> ddw(dw0), ddb(db0);
  cuda::matmul_backward(ddinp.get(), ddw.get(), ddb.get(), ddout.get(), dinp_in.get(), dwt.get(), N, C, OC,
                        gpu::stream());
  std::vector<double> tol_dinp(N * C), tol_dw(want_dw.size()), tol_db(OC);
  for (size_t i = 0; i < tol_dinp.size(); i++) tol_dinp[i] = 8e-3 * std::fabs(want_dinp[i]) + 1e-5 * mag_dinp[i];
  for (size_t i = 0; i < tol_dw.size(); i++)
    tol_dw[i] = 1e-4 * std::fabs(want_dw[i]) + 1e-5 * (mag_dw[i] + std::fabs(dw0[i]));
  for (int i = 0; i < OC; i++) tol_db[i] = 1e-4 * std::fabs(want_db[i]) + 1e-5 * (mag_db[i] + std::fabs(db0[i]));
  EXPECT_TRUE(within(from_bf16(ddinp.download()), want_dinp, tol_dinp)) << "dinp";
  EXPECT_TRUE(within(ddw.download(), want_dw, tol_dw)) << "dweight";
  EXPECT_TRUE(within(ddb.download(), want_db, tol_db)) << "dbias";

  // A second micro-batch accumulates again; null dinp/dbias are skipped.
  cuda::matmul_backward(nullptr, ddw.get(), nullptr, ddout.get(), dinp_in.get(), dwt.get(), N, C, OC, gpu::stream());
  std::vector<float> want_dw2 = want_dw;
  ref::matmul_backward(nullptr, want_dw2.data(), nullptr, dout.data(), L.inp.data(), L.w.data(), N, C, OC);
  for (size_t i = 0; i < tol_dw.size(); i++) tol_dw[i] += 1e-5 * mag_dw[i] + 1e-4 * std::fabs(want_dw2[i]);
  EXPECT_TRUE(within(ddw.download(), want_dw2, tol_dw)) << "dweight, second accumulation";
  EXPECT_TRUE(within(ddb.download(), want_db, tol_db)) << "dbias untouched when null";
}

// The tied LM head as GPT-2 runs it: logits[N, V] = x · wte^T with a padded vocabulary stride Vp, then
// dx = dlogits · wte and dwte += dlogits^T · x (fp32, accumulating).
TEST(MatmulGpu, TiedLmHeadForwardAndBackward) {
  KILN_REQUIRE_GPU();
  const int64_t N = 11, C = 24, V = 50, Vp = 64;
  auto x = round_bf16(test::randn(N * C, 51));
  auto wte = round_bf16(test::randn(Vp * C, 52, 0.3f));  // padded rows exist but are not used
  DeviceVec<uint16_t> dx_in(to_bf16(x)), dwte(to_bf16(wte)), dlogits(N * Vp);
  cuda::gemm(false, true, N, V, C, 1.0f, dx_in.get(), C, dwte.get(), C, 0.0f, dlogits.get(), Vp, gpu::stream());
  std::vector<float> want(N * Vp, 0.0f), mag(N * Vp, 0.0f);
  ref::gemm(false, true, N, V, C, 1.0f, x.data(), C, wte.data(), C, 0.0f, want.data(), Vp);
  ref::gemm(false, true, N, V, C, 1.0f, absv(x).data(), C, absv(wte).data(), C, 0.0f, mag.data(), Vp);
  auto logits = from_bf16(dlogits.download());
  for (int64_t n = 0; n < N; n++)
    for (int64_t v = 0; v < V; v++) {
      float w = want[n * Vp + v], g = logits[n * Vp + v];
      EXPECT_LE(std::fabs(g - w), 8e-3 * std::fabs(w) + 1e-5 * mag[n * Vp + v]) << "logit " << n << "," << v;
    }

  auto dl = round_bf16(test::randn(N * Vp, 53));
  auto dwte0 = test::randn(Vp * C, 54);
  DeviceVec<uint16_t> ddl(to_bf16(dl)), ddx(N * C);
  DeviceVec<float> ddwte(dwte0);
  cuda::gemm(false, false, N, C, V, 1.0f, ddl.get(), Vp, dwte.get(), C, 0.0f, ddx.get(), C, gpu::stream());
  cuda::gemm(true, false, V, C, N, 1.0f, ddl.get(), Vp, dx_in.get(), C, 1.0f, ddwte.get(), C, gpu::stream());
  std::vector<float> want_dx(N * C), mag_dx(N * C), want_dw = dwte0, mag_dw = absv(dwte0);
  ref::gemm(false, false, N, C, V, 1.0f, dl.data(), Vp, wte.data(), C, 0.0f, want_dx.data(), C);
  ref::gemm(false, false, N, C, V, 1.0f, absv(dl).data(), Vp, absv(wte).data(), C, 0.0f, mag_dx.data(), C);
  ref::gemm(true, false, V, C, N, 1.0f, dl.data(), Vp, x.data(), C, 1.0f, want_dw.data(), C);
  ref::gemm(true, false, V, C, N, 1.0f, absv(dl).data(), Vp, absv(x).data(), C, 1.0f, mag_dw.data(), C);
  std::vector<double> tol_dx(N * C), tol_dw(Vp * C);
  for (size_t i = 0; i < tol_dx.size(); i++) tol_dx[i] = 8e-3 * std::fabs(want_dx[i]) + 1e-5 * mag_dx[i];
  for (size_t i = 0; i < tol_dw.size(); i++) tol_dw[i] = 1e-4 * std::fabs(want_dw[i]) + 1e-5 * mag_dw[i];
  EXPECT_TRUE(within(from_bf16(ddx.download()), want_dx, tol_dx)) << "dx";
  EXPECT_TRUE(within(ddwte.download(), want_dw, tol_dw)) << "dwte (rows past V keep their value)";
}

TEST(MatmulGpu, BadLeadingDimensionFailsNamingTheCall) {
  KILN_REQUIRE_GPU();
  DeviceVec<uint16_t> a(64), b(64), c(64);
  try {
    cuda::gemm(false, false, 4, 4, 4, 1.0f, a.get(), 3, b.get(), 4, 0.0f, c.get(), 4, gpu::stream());
    FAIL() << "no error for lda < K";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("gemm"), std::string::npos) << m;
    EXPECT_NE(m.find("leading dimension"), std::string::npos) << m;
  }
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

// cuda::linear_forward / linear_backward in both weight layouts (Conv1D [C, OC] and nn.Linear [OC, C]) against
// plain double-precision loops on the same bf16 values: the bias fused, a padded output stride, the fp32 form
// with a residual (apart and in place), and the backward's overwrite / accumulate conventions.
void linear_layout_case(bool oc_c) {
  const int64_t N = 13;
  const int C = 40, OC = 24;
  const int64_t ld = OC + 8;
  auto x = round_bf16(test::randn(N * C, 61));
  auto w = round_bf16(test::randn(int64_t(C) * OC, 62, 0.3f));
  auto bias = test::randn(OC, 63, 0.5f);
  auto W = [&](int c, int o) { return double(oc_c ? w[size_t(o) * C + c] : w[size_t(c) * OC + o]); };
  std::vector<double> y(N * OC), mag(N * OC);
  for (int64_t n = 0; n < N; n++)
    for (int o = 0; o < OC; o++) {
      double s = bias[o], m = std::fabs(bias[o]);
      for (int c = 0; c < C; c++) s += x[n * C + c] * W(c, o), m += std::fabs(x[n * C + c] * W(c, o));
      y[n * OC + o] = s, mag[n * OC + o] = m;
    }
  DeviceVec<uint16_t> dx(to_bf16(x)), dw(to_bf16(w)), dy16(N * ld);
  DeviceVec<float> db(bias);
  const std::string what = oc_c ? "[OC, C]" : "[C, OC]";
  // bf16 output with a padded stride.
  cuda::linear_forward(dy16.get(), ld, dx.get(), dw.get(), oc_c, db.get(), N, C, OC, gpu::stream());
  auto got16 = from_bf16(dy16.download());
  for (int64_t n = 0; n < N; n++)
    for (int o = 0; o < OC; o++)
      ASSERT_NEAR(got16[n * ld + o], y[n * OC + o], 8e-3 * std::fabs(y[n * OC + o]) + 4e-3 * std::fabs(bias[o]) +
                                                        1e-5 * mag[n * OC + o])
          << what << " bf16 (" << n << ", " << o << ")";
  // fp32 output plus a residual, apart and in place.
  auto res = test::randn(N * OC, 64);
  DeviceVec<float> dres(res), dout(N * OC);
  cuda::linear_forward(dout.get(), OC, dres.get(), dx.get(), dw.get(), oc_c, db.get(), N, C, OC, gpu::stream());
  cuda::linear_forward(dres.get(), OC, dres.get(), dx.get(), dw.get(), oc_c, db.get(), N, C, OC, gpu::stream());
  for (const auto& got : {dout.download(), dres.download()})
    for (int64_t i = 0; i < N * OC; i++)
      ASSERT_NEAR(got[size_t(i)], y[size_t(i)] + res[size_t(i)], 1e-4 * std::fabs(y[size_t(i)]) + 1e-5 * mag[size_t(i)] + 1e-6)
          << what << " fp32 " << i;

  // Backward from dy (stride OC): dx overwritten, dW (in W's layout) and db accumulated onto what was there.
  auto dyv = round_bf16(test::randn(N * OC, 65));
  auto dw0 = test::randn(int64_t(C) * OC, 66), db0 = test::randn(OC, 67);
  DeviceVec<uint16_t> ddy(to_bf16(dyv)), ddx(to_bf16(test::randn(N * C, 68)));
  DeviceVec<float> ddw(dw0), ddb(db0);
  cuda::linear_backward(ddx.get(), ddw.get(), ddb.get(), ddy.get(), OC, dx.get(), dw.get(), oc_c, N, C, OC,
                        gpu::stream());
  auto gx = from_bf16(ddx.download());
  auto gw = ddw.download(), gb = ddb.download();
  for (int64_t n = 0; n < N; n++)
    for (int c = 0; c < C; c++) {
      double s = 0, m = 0;
      for (int o = 0; o < OC; o++) s += dyv[n * OC + o] * W(c, o), m += std::fabs(dyv[n * OC + o] * W(c, o));
      ASSERT_NEAR(gx[n * C + c], s, 8e-3 * std::fabs(s) + 1e-5 * m + 1e-6) << what << " dx";
    }
  for (int c = 0; c < C; c++)
    for (int o = 0; o < OC; o++) {
      double s = 0, m = 0;
      for (int64_t n = 0; n < N; n++) s += x[n * C + c] * dyv[n * OC + o], m += std::fabs(x[n * C + c] * dyv[n * OC + o]);
      const size_t at = oc_c ? size_t(o) * C + c : size_t(c) * OC + o;
      ASSERT_NEAR(gw[at], dw0[at] + s, 1e-4 * std::fabs(s) + 1e-5 * (m + std::fabs(dw0[at]))) << what << " dW";
    }
  for (int o = 0; o < OC; o++) {
    double s = db0[o];
    for (int64_t n = 0; n < N; n++) s += dyv[n * OC + o];
    ASSERT_NEAR(gb[o], s, 1e-4 * std::fabs(s) + 1e-5 * N) << what << " db";
  }
}

TEST(MatmulGpu, LinearBothWeightLayouts) {
  KILN_REQUIRE_GPU();
  linear_layout_case(false);
  linear_layout_case(true);
}

}  // namespace
}  // namespace kiln
