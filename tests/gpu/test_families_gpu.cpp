// The CUDA ops the Llama / Mistral / Qwen families add (RMSNorm, rotary embedding, activations and gated
// forms, grouped-query and sliding-window attention and decode attention) against their ref:: kernels on
// the same bf16-rounded inputs. Elementwise and norm results are compared relative to bf16 rounding (one
// rounding of the output: 2^-8 relative, a little slack for fp32 against double math); attention keeps the
// rule of test_attention_gpu.cpp (error against the fp32 reference at most 2× a naive bf16 implementation's).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "core/gpu.h"
#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {
using test::DeviceVec;

constexpr double kBf16Rel = 1.0 / 256;  // 2^-8: one bf16 rounding (2^-9) with room for fp32 math

float rb(float x) { return bf16_to_f32(f32_to_bf16(x)); }

// ---- RMSNorm ----

TEST(RmsnormGpu, ForwardFromTheResidualStream) {
  KILN_REQUIRE_GPU();
  for (int C : {64, 40}) {  // the 16-byte path and the scalar one
    const int64_t N = 5;
    const auto x = test::randn(size_t(N * C), 1 + C);
    auto w = test::randn(size_t(C), 2 + C, 0.2f);
    for (auto& v : w) v += 1.0f;
    std::vector<float> ref(x.size()), ref_rstd(static_cast<size_t>(N));
    ref::rmsnorm_forward(ref.data(), ref_rstd.data(), x.data(), w.data(), N, C, 1e-6f);
    DeviceVec<float> xd(x), wd(w), rstd(static_cast<size_t>(N)), out32(x.size());
    DeviceVec<uint16_t> out16(x.size());
    cuda::rmsnorm_forward(out16.get(), rstd.get(), xd.get(), wd.get(), N, C, 1e-6f, gpu::stream());
    EXPECT_TRUE(test::all_close(test::from_bf16(out16.download()), ref, kBf16Rel, 1e-6)) << "C " << C;
    EXPECT_TRUE(test::all_close(rstd.download(), ref_rstd, 1e-5, 0)) << "C " << C;
    cuda::rmsnorm_forward(out32.get(), nullptr, xd.get(), wd.get(), N, C, 1e-6f, gpu::stream());
    EXPECT_TRUE(test::all_close(out32.download(), ref, 1e-5, 1e-6)) << "C " << C;
  }
}

TEST(RmsnormGpu, BackwardAccumulatesOrOverwritesAndSumsTheWeightGradient) {
  KILN_REQUIRE_GPU();
  for (int C : {64, 40})
    for (bool accumulate : {true, false})
      for (bool bf16_dout : {true, false}) {
        const int64_t N = 20;  // 3 backward blocks: the partials' reduction runs
        const auto x = test::randn(size_t(N * C), 3 + C);
        auto w = test::randn(size_t(C), 4 + C, 0.2f);
        for (auto& v : w) v += 1.0f;
        const auto dy = test::round_bf16(test::randn(size_t(N * C), 5 + C));
        const auto dinp0 = test::randn(size_t(N * C), 6 + C);
        const auto dw0 = test::randn(size_t(C), 7 + C);
        std::vector<float> y(x.size()), rstd(static_cast<size_t>(N)), dinp = dinp0, dw = dw0;
        ref::rmsnorm_forward(y.data(), rstd.data(), x.data(), w.data(), N, C, 1e-6f);
        ref::rmsnorm_backward(dinp.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), N, C, accumulate);
        DeviceVec<float> xd(x), wd(w), rd(rstd), did(dinp0), dwd(dw0), dy32(dy);
        DeviceVec<uint16_t> dy16(test::to_bf16(dy));
        DeviceVec<float> scratch(cuda::rmsnorm_backward_scratch_floats(N, C));
        if (bf16_dout)
          cuda::rmsnorm_backward(did.get(), dwd.get(), dy16.get(), xd.get(), wd.get(), rd.get(), N, C, accumulate,
                                 scratch.get(), gpu::stream());
        else
          cuda::rmsnorm_backward(did.get(), dwd.get(), dy32.get(), xd.get(), wd.get(), rd.get(), N, C, accumulate,
                                 scratch.get(), gpu::stream());
        EXPECT_TRUE(test::all_close(did.download(), dinp, 1e-4, 1e-5)) << "C " << C << " acc " << accumulate;
        EXPECT_TRUE(test::all_close(dwd.download(), dw, 1e-4, 1e-4)) << "C " << C << " acc " << accumulate;
      }
}

// Qwen3's q/k norms: heads of a qkv row normalised in place (bf16), the rest of the row untouched.
TEST(RmsnormGpu, PerHeadInPlaceOnQkvRows) {
  KILN_REQUIRE_GPU();
  const int NH = 2, NKV = 1, HD = 64;
  const int64_t N = 3, ld = int64_t(NH + 2 * NKV) * HD;
  const auto qkv = test::round_bf16(test::randn(size_t(N * ld), 11));
  auto w = test::randn(size_t(HD), 12, 0.2f);
  for (auto& v : w) v += 1.0f;
  // The keys: one head starting NH·HD into the row.
  const int64_t off = int64_t(NH) * HD;
  for (auto [first, heads] : {std::pair<int64_t, int>{0, NH}, std::pair<int64_t, int>{off, NKV}}) {
    std::vector<float> ref = qkv, rstd(size_t(N * heads));
    ref::rmsnorm_forward(ref.data() + first, rstd.data(), qkv.data() + first, w.data(), N, HD, 1e-6f, heads, ld);
    DeviceVec<uint16_t> xd(test::to_bf16(qkv));
    DeviceVec<float> wd(w), rd(size_t(N * heads));
    cuda::rmsnorm_forward(xd.get() + first, rd.get(), xd.get() + first, wd.get(), N, HD, 1e-6f, heads, ld,
                          gpu::stream());
    EXPECT_TRUE(test::all_close(test::from_bf16(xd.download()), ref, kBf16Rel, 1e-6)) << "first " << first;
    EXPECT_TRUE(test::all_close(rd.download(), rstd, 1e-5, 0));

    // Backward, overwriting dout in place; dweight accumulates.
    const auto dy = test::round_bf16(test::randn(size_t(N * ld), 13));
    const auto dw0 = test::randn(size_t(HD), 14);
    std::vector<float> dref = dy, dw = dw0;
    ref::rmsnorm_backward(dref.data() + first, dw.data(), dy.data() + first, qkv.data() + first, w.data(),
                          rstd.data(), N, HD, false, heads, ld);
    DeviceVec<uint16_t> dyd(test::to_bf16(dy)), xin(test::to_bf16(qkv));
    DeviceVec<float> dwd(dw0), rsd(rstd), scratch(cuda::rmsnorm_backward_scratch_floats(N * heads, HD));
    cuda::rmsnorm_backward(dyd.get() + first, dwd.get(), dyd.get() + first, xin.get() + first, wd.get(), rsd.get(), N,
                           HD, false, heads, ld, scratch.get(), gpu::stream());
    EXPECT_TRUE(test::all_close(test::from_bf16(dyd.download()), dref, kBf16Rel, 1e-5)) << "first " << first;
    EXPECT_TRUE(test::all_close(dwd.download(), dw, 1e-4, 1e-4));
  }
}

// ---- Rotary embedding ----

TEST(RopeGpu, RotatesQueriesAndKeysInPlace) {
  KILN_REQUIRE_GPU();
  const int NH = 3, NKV = 1, HD = 64;
  const int64_t N = 7, ld = int64_t(NH + 2 * NKV) * HD;
  const std::vector<int32_t> pos = {0, 1, 5, 100, 4095, 20000, 3};
  for (int rot : {64, 32}) {  // full and partial rotary
    std::vector<float> inv(size_t(rot / 2));
    for (int i = 0; i < rot / 2; i++) inv[size_t(i)] = std::pow(10000.0f, -2.0f * i / rot);
    RopeParams p;
    p.heads = NH + NKV, p.HD = HD, p.rot_dim = rot, p.ld = ld, p.inv_freq = inv.data();
    DeviceVec<float> invd(inv);
    DeviceVec<int32_t> posd(pos);
    RopeParams pd = p;
    pd.inv_freq = invd.get();
    const auto x = test::round_bf16(test::randn(size_t(N * ld), 20 + rot));
    for (bool backward : {false, true}) {
      std::vector<float> ref = x;
      if (backward) ref::rope_backward(ref.data(), pos.data(), N, p);
      else ref::rope_forward(ref.data(), pos.data(), N, p);
      DeviceVec<uint16_t> x16(test::to_bf16(x));
      DeviceVec<float> x32(x);
      if (backward) {
        cuda::rope_backward(x16.get(), posd.get(), N, pd, gpu::stream());
        cuda::rope_backward(x32.get(), posd.get(), N, pd, gpu::stream());
      } else {
        cuda::rope_forward(x16.get(), posd.get(), N, pd, gpu::stream());
        cuda::rope_forward(x32.get(), posd.get(), N, pd, gpu::stream());
      }
      // The values (and the dims past rot_dim) come back bit for bit: ref leaves them alone too.
      EXPECT_TRUE(test::all_close(test::from_bf16(x16.download()), ref, kBf16Rel, 1e-5)) << rot << " " << backward;
      EXPECT_TRUE(test::all_close(x32.download(), ref, 1e-5, 1e-5)) << rot << " " << backward;
    }
  }
}

// ---- Activations ----

const Activation kActs[] = {Activation::GeluTanh, Activation::GeluErf, Activation::Relu, Activation::Silu,
                            Activation::Relu2};

TEST(ActivationGpu, PlainForwardAndBackward) {
  KILN_REQUIRE_GPU();
  const int64_t n = 1003;  // a tail past the 8-element steps
  const auto x = test::round_bf16(test::randn(size_t(n), 31, 2.0f));
  const auto dy = test::round_bf16(test::randn(size_t(n), 32));
  for (Activation a : kActs) {
    std::vector<float> y(static_cast<size_t>(n)), dx(static_cast<size_t>(n));
    ref::activation_forward(y.data(), x.data(), n, a);
    ref::activation_backward(dx.data(), x.data(), dy.data(), n, a);
    DeviceVec<uint16_t> x16(test::to_bf16(x)), dy16(test::to_bf16(dy)), y16(static_cast<size_t>(n));
    DeviceVec<float> x32(x), dy32(dy), y32(static_cast<size_t>(n));
    cuda::activation_forward(y16.get(), x16.get(), n, a, gpu::stream());
    cuda::activation_forward(y32.get(), x32.get(), n, a, gpu::stream());
    EXPECT_TRUE(test::all_close(test::from_bf16(y16.download()), y, kBf16Rel, 1e-6)) << int(a);
    EXPECT_TRUE(test::all_close(y32.download(), y, 1e-5, 1e-6)) << int(a);
    // In place over dout.
    cuda::activation_backward(dy16.get(), x16.get(), dy16.get(), n, a, gpu::stream());
    cuda::activation_backward(dy32.get(), x32.get(), dy32.get(), n, a, gpu::stream());
    EXPECT_TRUE(test::all_close(test::from_bf16(dy16.download()), dx, kBf16Rel, 1e-5)) << int(a);
    EXPECT_TRUE(test::all_close(dy32.download(), dx, 1e-5, 1e-5)) << int(a);
  }
}

TEST(ActivationGpu, GatedForwardAndBackward) {
  KILN_REQUIRE_GPU();
  const int64_t N = 3;
  for (int I : {24, 13})  // the 16-byte path and the scalar one
    for (Activation a : kActs) {
      const auto gu = test::round_bf16(test::randn(size_t(N * 2 * I), 40 + I, 2.0f));
      const auto dy = test::round_bf16(test::randn(size_t(N * I), 41 + I));
      std::vector<float> y(size_t(N * I)), dgu(gu.size());
      ref::gated_forward(y.data(), gu.data(), N, I, a);
      ref::gated_backward(dgu.data(), gu.data(), dy.data(), N, I, a);
      DeviceVec<uint16_t> gu16(test::to_bf16(gu)), dy16(test::to_bf16(dy)), y16(y.size()), dgu16(gu.size());
      DeviceVec<float> gu32(gu), dy32(dy), y32(y.size()), dgu32(gu.size());
      cuda::gated_forward(y16.get(), gu16.get(), N, I, a, gpu::stream());
      cuda::gated_forward(y32.get(), gu32.get(), N, I, a, gpu::stream());
      cuda::gated_backward(dgu16.get(), gu16.get(), dy16.get(), N, I, a, gpu::stream());
      cuda::gated_backward(dgu32.get(), gu32.get(), dy32.get(), N, I, a, gpu::stream());
      EXPECT_TRUE(test::all_close(test::from_bf16(y16.download()), y, kBf16Rel, 1e-5)) << I << " " << int(a);
      EXPECT_TRUE(test::all_close(y32.download(), y, 1e-5, 1e-5)) << I << " " << int(a);
      EXPECT_TRUE(test::all_close(test::from_bf16(dgu16.download()), dgu, kBf16Rel, 1e-5)) << I << " " << int(a);
      EXPECT_TRUE(test::all_close(dgu32.download(), dgu, 1e-5, 1e-5)) << I << " " << int(a);
    }
}

// ---- Attention: grouped-query and sliding window ----

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); i++) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (std::isnan(d)) return INFINITY;
    worst = std::max(worst, d);
  }
  return worst;
}
void expect_within_naive(const std::string& what, double ours, double naive) {
  std::printf("  %-28s max abs error: ours %.3g, naive bf16 %.3g\n", what.c_str(), ours, naive);
  EXPECT_GT(naive, 0.0) << what;
  EXPECT_LE(ours, 2.0 * naive + 1e-6) << what << ": ours " << ours << " vs naive bf16 " << naive;
}

// Visible keys of query i: [lo, hi].
struct Range {
  int lo, hi;
};
Range visible(int i, int T, bool causal, int window) {
  if (!causal) return {0, T - 1};
  return {window > 0 ? std::max(0, i - window + 1) : 0, i};
}

struct Gqa {
  int NH, NKV, HD;
  bool causal;
  int window;
  std::vector<int> lens;  // packed through cu_seqlens when more than one length differs
  bool packed;
  std::vector<int32_t> cu;
  int64_t N;
  Gqa(int nh, int nkv, int hd, bool c, int w, std::vector<int> l, bool pk)
      : NH(nh), NKV(nkv), HD(hd), causal(c), window(w), lens(std::move(l)), packed(pk) {
    cu.push_back(0);
    for (int x : lens) cu.push_back(cu.back() + x);
    N = cu.back();
  }
  int64_t row() const { return int64_t(NH + 2 * NKV) * HD; }
  int64_t C() const { return int64_t(NH) * HD; }
  float scale() const { return 1.0f / std::sqrt(float(HD)); }
  AttentionParams params(const int32_t* cu_ptr) const {
    AttentionParams p;
    p.NH = NH, p.NKV = NKV, p.HD = HD, p.causal = causal, p.window = window, p.scale = scale();
    if (packed) {
      p.cu_seqlens = cu_ptr, p.num_seqs = int(lens.size());
      p.max_seqlen = *std::max_element(lens.begin(), lens.end()), p.total_tokens = N;
    } else {
      p.B = int(lens.size()), p.T = lens[0];
    }
    return p;
  }
  std::string name() const {
    char b[96];
    std::snprintf(b, sizeof b, "NH %d NKV %d HD %d %s w %d", NH, NKV, HD, causal ? "causal" : "full", window);
    return b;
  }
};

// Naive bf16 forward and backward of one sequence (all heads): P (and dS) rounded to bf16 before their
// products, outputs and gradients rounded; dK, dV of a kv head summed over its group in fp32 first.
void naive_sequence(const Gqa& g, const std::vector<float>& qkv, const std::vector<float>& dout, int64_t s0, int T,
                    std::vector<float>& out, std::vector<float>& dqkv, bool backward) {
  const int64_t L = g.row(), C = g.C(), HD = g.HD;
  const int group = g.NH / g.NKV;
  const float scale = g.scale();
  std::vector<float> dk(size_t(T) * g.NKV * HD, 0.0f), dv(dk.size(), 0.0f);
  for (int h = 0; h < g.NH; h++) {
    const int kvh = h / group;
    auto Q = [&](int i, int d) { return qkv[size_t((s0 + i) * L + h * HD + d)]; };
    auto K = [&](int j, int d) { return qkv[size_t((s0 + j) * L + C + kvh * HD + d)]; };
    auto V = [&](int j, int d) { return qkv[size_t((s0 + j) * L + C + (g.NKV + kvh) * HD + d)]; };
    auto dO = [&](int i, int d) { return dout[size_t((s0 + i) * C + h * HD + d)]; };
    std::vector<float> P(size_t(T) * T, 0.0f), dS(size_t(T) * T, 0.0f);
    for (int i = 0; i < T; i++) {
      const Range r = visible(i, T, g.causal, g.window);
      float mx = -INFINITY, sum = 0;
      for (int j = r.lo; j <= r.hi; j++) {
        float dot = 0;
        for (int d = 0; d < HD; d++) dot += Q(i, d) * K(j, d);
        mx = std::max(mx, P[size_t(i) * T + j] = dot * scale);
      }
      for (int j = r.lo; j <= r.hi; j++) sum += (P[size_t(i) * T + j] = std::exp(P[size_t(i) * T + j] - mx));
      for (int j = r.lo; j <= r.hi; j++) P[size_t(i) * T + j] /= sum;
      for (int d = 0; d < HD; d++) {
        float acc = 0;
        for (int j = r.lo; j <= r.hi; j++) acc += rb(P[size_t(i) * T + j]) * V(j, d);
        out[size_t((s0 + i) * C + h * HD + d)] = rb(acc);
      }
    }
    if (!backward) continue;
    for (int i = 0; i < T; i++) {
      const Range r = visible(i, T, g.causal, g.window);
      float D = 0;
      for (int d = 0; d < HD; d++) D += dO(i, d) * out[size_t((s0 + i) * C + h * HD + d)];
      for (int j = r.lo; j <= r.hi; j++) {
        float& p = P[size_t(i) * T + j];
        float dp = 0;
        for (int d = 0; d < HD; d++) dp += dO(i, d) * V(j, d);
        dS[size_t(i) * T + j] = rb(p * (dp - D));
        p = rb(p);
      }
    }
    for (int i = 0; i < T; i++)
      for (int d = 0; d < HD; d++) {
        float gq = 0, gk = 0, gv = 0;
        for (int j = 0; j < T; j++) {
          gq += dS[size_t(i) * T + j] * K(j, d);
          gk += dS[size_t(j) * T + i] * Q(j, d);
          gv += P[size_t(j) * T + i] * dO(j, d);
        }
        dqkv[size_t((s0 + i) * L + h * HD + d)] = rb(gq * scale);
        dk[size_t((i * g.NKV + kvh) * HD + d)] += gk * scale;
        dv[size_t((i * g.NKV + kvh) * HD + d)] += gv;
      }
  }
  if (backward)
    for (int i = 0; i < T; i++)
      for (int64_t c = 0; c < g.NKV * HD; c++) {
        dqkv[size_t((s0 + i) * L + C + c)] = rb(dk[size_t(i * g.NKV * HD + c)]);
        dqkv[size_t((s0 + i) * L + C + g.NKV * HD + c)] = rb(dv[size_t(i * g.NKV * HD + c)]);
      }
}

// Columns [c0, c0 + width) of every row of `L` values.
std::vector<float> columns(const std::vector<float>& x, int64_t L, int64_t c0, int64_t width) {
  std::vector<float> r;
  for (size_t row = 0; row + size_t(L) <= x.size(); row += size_t(L))
    r.insert(r.end(), x.begin() + int64_t(row) + c0, x.begin() + int64_t(row) + c0 + width);
  return r;
}

void check_gqa(const Gqa& g, bool backward, uint64_t seed) {
  const int64_t N = g.N, L = g.row(), C = g.C();
  const auto qkv = test::round_bf16(test::randn(size_t(N * L), seed));
  const auto dout = test::round_bf16(test::randn(size_t(N * C), seed + 1));
  DeviceVec<uint16_t> qkv_d(test::to_bf16(qkv)), dout_d(test::to_bf16(dout)), out_d(size_t(N * C));
  DeviceVec<float> lse_d(size_t(g.NH * N));
  DeviceVec<int32_t> cu_d(g.cu);
  const AttentionParams pd = g.params(cu_d.get());
  cuda::attention_forward(out_d.get(), lse_d.get(), qkv_d.get(), pd, gpu::stream());
  const auto out = test::from_bf16(out_d.download());

  const AttentionParams p = g.params(g.cu.data());
  std::vector<float> ref_out(size_t(N * C)), ref_lse(size_t(g.NH * N)), ref_dqkv(size_t(N * L));
  ref::attention_forward(ref_out.data(), ref_lse.data(), qkv.data(), p);
  std::vector<float> nv_out(size_t(N * C)), nv_dqkv(size_t(N * L));
  for (size_t s = 0; s < g.lens.size(); s++)
    if (g.lens[s] > 0) naive_sequence(g, qkv, dout, g.cu[s], g.lens[s], nv_out, nv_dqkv, backward);
  expect_within_naive(g.name() + " out", max_abs_diff(out, ref_out), max_abs_diff(nv_out, ref_out));
  EXPECT_LE(max_abs_diff(lse_d.download(), ref_lse), 2e-5) << g.name();
  if (!backward) return;

  ref::attention_backward(ref_dqkv.data(), dout.data(), qkv.data(), ref_out.data(), ref_lse.data(), p);
  DeviceVec<uint16_t> dqkv_d(size_t(N * L));
  DeviceVec<char> scratch(cuda::attention_backward_scratch_bytes(pd));
  cuda::attention_backward(dqkv_d.get(), dout_d.get(), qkv_d.get(), out_d.get(), lse_d.get(), pd, scratch.get(),
                           gpu::stream());
  const auto dqkv = test::from_bf16(dqkv_d.download());
  const int64_t KC = int64_t(g.NKV) * g.HD;
  const struct {
    const char* name;
    int64_t c0, width;
  } parts[] = {{" dq", 0, C}, {" dk", C, KC}, {" dv", C + KC, KC}};
  for (const auto& pt : parts)
    expect_within_naive(g.name() + pt.name, max_abs_diff(columns(dqkv, L, pt.c0, pt.width), columns(ref_dqkv, L, pt.c0, pt.width)),
                        max_abs_diff(columns(nv_dqkv, L, pt.c0, pt.width), columns(ref_dqkv, L, pt.c0, pt.width)));
}

TEST(GqaAttentionGpu, ForwardGroupedAndWindowed) {
  KILN_REQUIRE_GPU();
  check_gqa(Gqa(4, 2, 64, true, 0, {150, 150}, false), false, 201);
  check_gqa(Gqa(4, 1, 64, false, 0, {90}, false), false, 202);     // MQA, not causal
  check_gqa(Gqa(4, 2, 64, true, 40, {150, 150}, false), false, 203);  // the window inside the 128-row tile
  check_gqa(Gqa(2, 1, 128, true, 70, {1, 37, 0, 200}, true), false, 204);  // packed, tiles skipped
}

TEST(GqaAttentionGpu, BackwardGroupedAndWindowed) {
  KILN_REQUIRE_GPU();
  check_gqa(Gqa(4, 2, 64, true, 0, {150}, false), true, 211);
  check_gqa(Gqa(4, 1, 64, false, 0, {70}, false), true, 212);
  check_gqa(Gqa(2, 2, 64, true, 30, {200}, false), true, 213);  // window only (NKV = NH)
  check_gqa(Gqa(4, 2, 128, true, 50, {1, 37, 0, 180}, true), true, 214);
}

// ---- Decode attention: grouped-query and sliding window ----

TEST(GqaDecodeAttentionGpu, MatchesReference) {
  KILN_REQUIRE_GPU();
  uint64_t seed = 300;
  for (int NKV : {2, 1})
    for (int window : {0, 50, 130})
      for (int Tq : {1, 3}) {
        const int NH = 4, HD = 64, cap = 320;
        const std::vector<int32_t> past = {0, 300};
        const int B = 2;
        const int64_t L = int64_t(NH + 2 * NKV) * HD, KC = int64_t(NKV) * HD, C = int64_t(NH) * HD;
        const float scale = 1.0f / std::sqrt(float(HD));
        const auto qkv = test::round_bf16(test::randn(size_t(B * Tq * L), seed += 3));
        const auto kc = test::round_bf16(test::randn(size_t(B * cap * KC), seed + 1));
        const auto vc = test::round_bf16(test::randn(size_t(B * cap * KC), seed + 2));
        DecodeAttentionParams rp;
        rp.B = B, rp.Tq = Tq, rp.past_per_seq = past.data(), rp.NH = NH, rp.HD = HD, rp.NKV = NKV;
        rp.window = window, rp.scale = scale, rp.q = qkv.data(), rp.q_stride = L, rp.k = kc.data(), rp.v = vc.data();
        rp.kv_batch_stride = cap * KC, rp.kv_stride = KC;
        std::vector<float> ref(size_t(B * Tq * C)), naive(ref.size());
        rp.out = ref.data(), rp.out_stride = C;
        ref::decode_attention(rp);
        for (int b = 0; b < B; b++)
          for (int i = 0; i < Tq; i++)
            for (int h = 0; h < NH; h++) {
              const int64_t row = b * Tq + i, last = past[size_t(b)] + i;
              const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
              const int64_t kvo = int64_t(h / (NH / NKV)) * HD;
              std::vector<float> s;
              float mx = -INFINITY, sum = 0;
              for (int64_t j = first; j <= last; j++) {
                float dot = 0;
                for (int d = 0; d < HD; d++) dot += qkv[size_t(row * L + h * HD + d)] * kc[size_t((b * cap + j) * KC + kvo + d)];
                s.push_back(dot * scale);
                mx = std::max(mx, s.back());
              }
              for (auto& v : s) sum += (v = std::exp(v - mx));
              for (int d = 0; d < HD; d++) {
                float acc = 0;
                for (int64_t j = first; j <= last; j++)
                  acc += rb(s[size_t(j - first)] / sum) * vc[size_t((b * cap + j) * KC + kvo + d)];
                naive[size_t(row * C + h * HD + d)] = rb(acc);
              }
            }
        DeviceVec<uint16_t> qd(test::to_bf16(qkv)), kd(test::to_bf16(kc)), vd(test::to_bf16(vc)), od(ref.size());
        DeviceVec<int32_t> pastd(past);
        cuda::DecodeAttention p;
        p.B = B, p.Tq = Tq, p.past_per_seq = pastd.get(), p.max_past = cap, p.NH = NH, p.NKV = NKV, p.HD = HD;
        p.window = window, p.scale = scale, p.q = qd.get(), p.q_stride = L, p.k = kd.get(), p.v = vd.get();
        p.kv_batch_stride = cap * KC, p.kv_stride = KC, p.out = od.get(), p.out_stride = C;
        DeviceVec<char> scratch(cuda::decode_attention_scratch_bytes(p));
        cuda::decode_attention(p, scratch.get(), gpu::stream());
        char name[64];
        std::snprintf(name, sizeof name, "decode NKV %d w %d Tq %d", NKV, window, Tq);
        expect_within_naive(name, max_abs_diff(test::from_bf16(od.download()), ref), max_abs_diff(naive, ref));
      }
}

TEST(GqaDecodeAttentionGpu, KvCacheAppendTakesTheKvHeads) {
  KILN_REQUIRE_GPU();
  const int B = 2, Tq = 3, NH = 4, NKV = 2, HD = 64, cap = 16;
  const int64_t L = int64_t(NH + 2 * NKV) * HD, KC = int64_t(NKV) * HD;
  const std::vector<int32_t> past = {3, 10};
  const auto qkv = test::to_bf16(test::randn(size_t(B * Tq * L), 51));
  auto kc = test::to_bf16(test::randn(size_t(B * cap * KC), 52));
  auto vc = test::to_bf16(test::randn(size_t(B * cap * KC), 53));
  DeviceVec<uint16_t> dqkv(qkv), dk(kc), dv(vc);
  DeviceVec<int32_t> dpast(past);
  cuda::kv_cache_append(dk.get(), dv.get(), dqkv.get(), dpast.get(), B, Tq, NH, NKV, HD, cap * KC, gpu::stream());
  for (int b = 0; b < B; b++)
    for (int i = 0; i < Tq; i++)
      for (int64_t c = 0; c < KC; c++) {
        const int64_t row = b * Tq + i, at = (b * cap + past[size_t(b)] + i) * KC + c;
        kc[size_t(at)] = qkv[size_t(row * L + NH * HD + c)];
        vc[size_t(at)] = qkv[size_t(row * L + NH * HD + KC + c)];
      }
  EXPECT_EQ(dk.download(), kc);
  EXPECT_EQ(dv.download(), vc);
}

}  // namespace
}  // namespace kiln
