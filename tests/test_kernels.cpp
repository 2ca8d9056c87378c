// CPU kernels other than attention, what the op table (tests/ops/) does not cover: the vectorised exp against
// exp computed in double, the matmul's null gradients, bad ids and targets, overflow, the AdamW step as torch
// orders it. Every cpu:: op against ref:: and every ref:: backward against finite differences is the table's.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/cpu/vec_math.h"
#include "kernels/crossentropy.h"
#include "kernels/embedding.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::all_close;
using kiln::test::randn;

namespace {

std::vector<int32_t> rand_ids(size_t n, int32_t hi, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = int32_t(r.below(uint64_t(hi)));
  return v;
}

// Distance in units in the last place between two finite floats of the same sign (or zeros).
int64_t ulp_distance(float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::llabs(int64_t(ia) - int64_t(ib));
}

}  // namespace

// ---------------------------------------------------------------------------------------------- exp

TEST(KernelsExp, ScalarAndVectorWithinTwoUlpOfExactExp) {
  // A dense sweep over the range whose result is a normal float, plus random points.
  std::vector<float> xs;
  for (double x = -87.3; x <= 88.7; x += 0.000731) xs.push_back(float(x));
  Rng r(5);
  for (int i = 0; i < 20000; i++) xs.push_back(-87.3f + 176.0f * r.uniform());
  for (float x : {0.0f, -0.0f, 1e-8f, -1e-8f, 0.5f, -0.5f, 1.0f, 88.72f, -87.33f}) xs.push_back(x);
  while (xs.size() % 16) xs.push_back(0.25f);
  std::vector<float> vec(xs.size());
#ifdef __AVX512F__
  for (size_t i = 0; i < xs.size(); i += 16)
    _mm512_storeu_ps(vec.data() + i, cpu::vmath::exp16(_mm512_loadu_ps(xs.data() + i)));
#else
  for (size_t i = 0; i < xs.size(); i++) vec[i] = cpu::vmath::exp_scalar(xs[i]);
#endif
  int64_t worst_vec = 0, worst_scalar = 0;
  for (size_t i = 0; i < xs.size(); i++) {
    const float exact = float(std::exp(double(xs[i])));
    worst_vec = std::max(worst_vec, ulp_distance(vec[i], exact));
    worst_scalar = std::max(worst_scalar, ulp_distance(cpu::vmath::exp_scalar(xs[i]), exact));
  }
  EXPECT_LE(worst_vec, 2);
  EXPECT_LE(worst_scalar, 2);
}

TEST(KernelsExp, SaturatesSubnormalsAndPassesNaN) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> xs = {89.0f, 100.0f, 1000.0f, inf, -105.0f, -1000.0f, -inf, nan,
                           -88.0f, -95.0f, -100.0f, -103.0f, -90.5f, -87.5f, 88.0f, -1.0f};
  std::vector<float> vec(16);
#ifdef __AVX512F__
  _mm512_storeu_ps(vec.data(), cpu::vmath::exp16(_mm512_loadu_ps(xs.data())));
#else
  for (int i = 0; i < 16; i++) vec[i] = cpu::vmath::exp_scalar(xs[i]);
#endif
  for (int i = 0; i < 16; i++) {
    for (float got : {vec[i], cpu::vmath::exp_scalar(xs[i])}) {
      const double exact = std::exp(double(xs[i]));
      if (std::isnan(xs[i])) {
        EXPECT_TRUE(std::isnan(got));
      } else if (exact > std::numeric_limits<float>::max()) {
        EXPECT_EQ(got, inf) << xs[i];
      } else {
        // Subnormal results: within two steps of the smallest subnormal.
        EXPECT_NEAR(got, exact, std::max(2.0 * 1.401298464e-45, 2.4e-7 * exact)) << xs[i];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- matmul

TEST(KernelsMatmul, GemmRejectsSizesBeyondBlasInt) {
  EXPECT_THROW(cpu::gemm(false, false, int64_t(1) << 32, 4, 4, 1.0f, nullptr, 4, nullptr, 4, 0.0f, nullptr, 4),
               Error);
}

TEST(KernelsMatmul, BackwardOverwritesDinpAndAccumulatesWeightAndBias) {
  const int64_t N = 37;
  const int C = 48, OC = 1001;  // N·OC above the threading threshold of the bias column sums
  auto inp = randn(N * C, 20), w = randn(size_t(C) * OC, 21, 0.2f), dout = randn(N * OC, 22);
  auto dw0 = randn(size_t(C) * OC, 23), db0 = randn(OC, 24);
  std::vector<float> dic(N * C, 123.0f), dir(N * C, -7.0f);  // garbage: must be overwritten
  auto dwc = dw0, dwr = dw0, dbc = db0, dbr = db0;
  cpu::matmul_backward(dic.data(), dwc.data(), dbc.data(), dout.data(), inp.data(), w.data(), N, C, OC);
  ref::matmul_backward(dir.data(), dwr.data(), dbr.data(), dout.data(), inp.data(), w.data(), N, C, OC);
  EXPECT_TRUE(all_close(dic, dir, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(dwc, dwr, 1e-4, 1e-4));
  EXPECT_TRUE(all_close(dbc, dbr, 1e-4, 1e-4));
  // Null gradients are skipped.
  auto dw_only = dw0;
  cpu::matmul_backward(nullptr, dw_only.data(), nullptr, dout.data(), inp.data(), w.data(), N, C, OC);
  EXPECT_TRUE(all_close(dw_only, dwr, 1e-4, 1e-4));
}

// ---------------------------------------------------------------------------------------- layernorm

// --------------------------------------------------------------------------------------------- gelu

TEST(KernelsGelu, AddMatchesReferenceAndMayAlias) {
  for (int64_t n : {37, 40009}) {
    auto a = randn(n, 74), b = randn(n, 75);
    std::vector<float> oc(n), orf(n);
    cpu::add(oc.data(), a.data(), b.data(), n);
    ref::add(orf.data(), a.data(), b.data(), n);
    EXPECT_EQ(oc, orf);
    cpu::add(a.data(), a.data(), b.data(), n);  // in place
    EXPECT_EQ(a, orf);
  }
}

// ---------------------------------------------------------------------------------------- embedding

TEST(KernelsEmbedding, NegativeIdRaisesError) {
  std::vector<int32_t> tokens = {0, -1}, pos = {0, 1};
  std::vector<float> wte(8), wpe(8), out(8);
  EXPECT_THROW(cpu::embedding_forward(out.data(), tokens.data(), pos.data(), wte.data(), wpe.data(), 2, 4), Error);
  tokens[1] = 1;
  pos[0] = -3;
  EXPECT_THROW(cpu::embedding_backward(wte.data(), wpe.data(), out.data(), tokens.data(), pos.data(), 2, 4), Error);
}

// ------------------------------------------------------------------------------------- crossentropy

namespace {
struct CEProblem {
  int64_t N;
  int V;
  int64_t ld;
  std::vector<float> logits;
  std::vector<int32_t> targets;
};
CEProblem make_ce(int64_t N, int V, int64_t ld, uint64_t seed, float scale = 2.0f) {
  CEProblem p{N, V, ld, randn(N * ld, seed, scale), rand_ids(N, V, seed + 1)};
  for (int64_t n = 0; n < N; n += 5) p.targets[n] = -100;  // ignored rows (the usual ignore_index)
  return p;
}
}  // namespace

TEST(KernelsCrossEntropy, IgnoredTargetsGiveZeroLossAndZeroGradient) {
  auto p = make_ce(37, 1001, 1001, 110);
  std::vector<float> losses(37, 5.0f);
  cpu::softmax_crossentropy(p.logits.data(), losses.data(), p.targets.data(), 37, 1001, 1001, 0.5f);
  for (int64_t n = 0; n < 37; n++) {
    if (p.targets[n] >= 0) continue;
    EXPECT_EQ(losses[n], 0.0f) << n;
    for (int i = 0; i < 1001; i++) ASSERT_EQ(p.logits[n * 1001 + i], 0.0f) << n << "," << i;
  }
}

TEST(KernelsCrossEntropy, ZeroGradScaleLeavesLogitsUntouched) {
  auto p = make_ce(37, 1001, 1001, 130);
  auto l = p.logits;
  std::vector<float> losses(37);
  cpu::softmax_crossentropy(l.data(), losses.data(), p.targets.data(), 37, 1001, 1001, 0.0f);
  EXPECT_EQ(std::memcmp(l.data(), p.logits.data(), l.size() * sizeof(float)), 0);
}

TEST(KernelsCrossEntropy, LargeLogitsDoNotOverflow) {
  const int64_t N = 37;
  const int V = 1001;
  auto p = make_ce(N, V, V, 140, 5.0f);
  for (auto& x : p.logits) x += 1000.0f;  // exp(1000) overflows float (and double)
  for (int i = 0; i < V; i++) p.logits[3 * V + i] = 1000.0f;  // a flat row: loss log V, gradient 1/V - onehot
  auto lc = p.logits, lr = p.logits;
  std::vector<float> losc(N), losr(N);
  cpu::softmax_crossentropy(lc.data(), losc.data(), p.targets.data(), N, V, V, 1.0f);
  ref::softmax_crossentropy(lr.data(), losr.data(), p.targets.data(), N, V, V, 1.0f);
  for (float x : losc) ASSERT_TRUE(std::isfinite(x));
  for (float x : lc) ASSERT_TRUE(std::isfinite(x));
  EXPECT_TRUE(all_close(losc, losr, 1e-5, 1e-5));
  EXPECT_TRUE(all_close(lc, lr, 1e-4, 1e-7));
  EXPECT_NEAR(losc[3], std::log(1001.0), 1e-5);
  const int t = p.targets[3];
  for (int i = 0; i < V; i++) EXPECT_NEAR(lc[3 * V + i], 1.0 / V - (i == t ? 1.0 : 0.0), 1e-7) << i;
}

TEST(KernelsCrossEntropy, TargetOutsideVocabularyRaisesError) {
  std::vector<float> logits(2 * 7, 0.0f), losses(2);
  std::vector<int32_t> targets = {3, 7};
  EXPECT_THROW(cpu::softmax_crossentropy(logits.data(), losses.data(), targets.data(), 2, 7, 7, 1.0f), Error);
}

// -------------------------------------------------------------------------------------------- adamw

namespace {
// One AdamW step written the way torch.optim.AdamW (1.13, single-tensor path) orders it: decay first,
// then the Adam update with step_size = lr / bc1 and denom = sqrt(v) / sqrt(bc2) + eps.
void torch_style_adamw(std::vector<double>& p, const std::vector<float>& grad, std::vector<double>& m,
                       std::vector<double>& v, const AdamWHyper& h) {
  const double bc1 = 1.0 - std::pow(double(h.beta1), double(h.t));
  const double bc2 = 1.0 - std::pow(double(h.beta2), double(h.t));
  for (size_t i = 0; i < p.size(); i++) {
    const double g = double(grad[i]) * h.grad_scale;
    p[i] *= 1.0 - double(h.lr) * h.weight_decay;
    m[i] = m[i] + (g - m[i]) * (1.0 - h.beta1);  // lerp
    v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * g * g;
    const double denom = std::sqrt(v[i]) / std::sqrt(bc2) + h.eps;
    p[i] -= double(h.lr) / bc1 * m[i] / denom;
  }
}
std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }
std::vector<float> to_float(const std::vector<double>& x) { return {x.begin(), x.end()}; }
}  // namespace

TEST(KernelsAdamW, FiveStepsMatchHandWrittenTorchStep) {
  for (int64_t n : {1001, 50001}) {
    auto p0 = randn(n, 150), m0 = randn(n, 151, 0.01f), v0 = randn(n, 152, 0.01f);
    for (auto& x : v0) x = x * x;
    auto pc = p0, mc = m0, vc = v0, pr = p0, mr = m0, vr = v0;
    auto pd = to_double(p0), md = to_double(m0), vd = to_double(v0);
    AdamWHyper h;
    h.lr = 1e-2f;
    h.weight_decay = 0.1f;
    h.grad_scale = 0.5f;
    for (int step = 1; step <= 5; step++) {
      h.t = step;
      auto g = randn(n, 160 + step);
      cpu::adamw_update(pc.data(), g.data(), mc.data(), vc.data(), n, h);
      ref::adamw_update(pr.data(), g.data(), mr.data(), vr.data(), n, h);
      torch_style_adamw(pd, g, md, vd, h);
    }
    EXPECT_TRUE(all_close(pr, to_float(pd), 1e-5, 1e-6)) << "ref vs hand-written, n=" << n;
    EXPECT_TRUE(all_close(mr, to_float(md), 1e-5, 1e-7));
    EXPECT_TRUE(all_close(vr, to_float(vd), 1e-5, 1e-9));
    EXPECT_TRUE(all_close(pc, pr, 1e-5, 1e-6)) << "cpu vs ref, n=" << n;
    EXPECT_TRUE(all_close(mc, mr, 1e-5, 1e-7));
    EXPECT_TRUE(all_close(vc, vr, 1e-5, 1e-9));
  }
}

TEST(KernelsAdamW, DecaysOnlyWhenAsked) {
  const int64_t n = 37;
  auto p0 = randn(n, 170);
  std::vector<float> g(n, 0.0f), m(n, 0.0f), v(n, 0.0f);
  AdamWHyper h;
  h.lr = 0.1f;
  h.weight_decay = 0.0f;
  auto p = p0;
  cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h);
  EXPECT_EQ(p, p0);  // zero gradient and no decay: the parameters do not move
  h.weight_decay = 0.2f;
  cpu::adamw_update(p.data(), g.data(), m.data(), v.data(), n, h);
  for (int64_t i = 0; i < n; i++) EXPECT_NEAR(p[i], p0[i] * (1.0 - 0.1 * 0.2), 1e-6) << i;
}

TEST(KernelsAdamW, SumSquaresMatchesDoubleLoop) {
  for (int64_t n : {0, 1, 37, 1000003}) {
    auto x = randn(n, 180, 3.0f);
    double want = 0;
    for (float f : x) want += double(f) * f;
    EXPECT_NEAR(cpu::sum_squares(x.data(), n), want, 1e-12 * want) << n;
    EXPECT_NEAR(ref::sum_squares(x.data(), n), want, 1e-12 * want) << n;
  }
}

// On a CPU with AVX2, the kiln CLI never multiplies with OpenBLAS's pre-AVX2 fallback kernels: when OpenBLAS does
// not recognise the CPU (virtual machines), kiln names the kernels by feature and re-executes itself.
TEST(Blas, CliRunsOnKernelsTheCpuSupports) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2")) GTEST_SKIP() << "no AVX2 on this CPU";
  FILE* p = ::popen("env -u OPENBLAS_CORETYPE '" KILN_BINARY_DIR "/kiln' version", "r");
  ASSERT_NE(p, nullptr);
  char buf[256] = {};
  std::string out;
  while (std::fgets(buf, sizeof(buf), p)) out += buf;
  ASSERT_EQ(::pclose(p), 0) << out;
  const size_t at = out.find("blas core: ");
  ASSERT_NE(at, std::string::npos) << out;
  std::string core = out.substr(at + 11);
  core = core.substr(0, core.find('\n'));
  for (const char* slow : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom"}) EXPECT_NE(core, slow);
  // The kernels OpenBLAS picked for this test process are either already right or the ones kiln would name.
  const char* pick = cpu::blas_core_for_this_cpu();
  if (pick) EXPECT_TRUE(core == pick) << core << " vs " << pick;
}
