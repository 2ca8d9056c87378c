// Kernels of the Llama / Mistral / Qwen families: RMSNorm (also per-head), rotary embedding, the activations
// and gated forms, grouped-query and sliding-window attention, and decode attention with both. Every cpu::
// op is checked against its ref::, every ref:: backward against central finite differences of a scalar loss.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/activation.h"
#include "kernels/attention.h"
#include "kernels/decode_attention.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::all_close;
using kiln::test::finite_diff;
using kiln::test::randn;

namespace {

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); i++) s += double(a[i]) * b[i];
  return s;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Checks analytic gradient g of loss() w.r.t. x at every index (or every `step`-th one).
void expect_grad(std::vector<float>& x, const std::vector<float>& g, const std::function<double()>& loss,
                 double tol, size_t step = 1, float h = 1e-3f) {
  for (size_t i = 0; i < x.size(); i += step) {
    const double fd = finite_diff(x, i, loss, h);
    EXPECT_NEAR(g[i], fd, tol * (1.0 + std::fabs(fd))) << "index " << i;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------- RMSNorm

// Odd N, C not a multiple of 16, several heads with padding between rows; both gradient modes.
TEST(FamiliesRmsNorm, CpuMatchesReference) {
  struct Case { int64_t N; int C, heads; int64_t ld; };
  for (const Case& c : {Case{7, 37, 1, 0}, Case{5, 24, 3, 3 * 24 + 5}, Case{300, 100, 1, 0}, Case{65, 16, 4, 0}}) {
    const int64_t L = c.ld > 0 ? c.ld : int64_t(c.heads) * c.C;
    const size_t G = size_t(c.N * c.heads);
    const auto x = randn(static_cast<size_t>(c.N * L), 1, 2.0f), w = randn(static_cast<size_t>(c.C), 2), dy = randn(static_cast<size_t>(c.N * L), 3);
    std::vector<float> y_cpu(x.size(), 7.0f), y_ref(x.size(), 7.0f), r_cpu(G), r_ref(G);
    cpu::rmsnorm_forward(y_cpu.data(), r_cpu.data(), x.data(), w.data(), c.N, c.C, 1e-5f, c.heads, c.ld);
    ref::rmsnorm_forward(y_ref.data(), r_ref.data(), x.data(), w.data(), c.N, c.C, 1e-5f, c.heads, c.ld);
    EXPECT_TRUE(all_close(y_cpu, y_ref, 1e-5, 1e-6)) << "C=" << c.C << " heads=" << c.heads;
    EXPECT_TRUE(all_close(r_cpu, r_ref, 1e-5, 0));
    for (bool accumulate : {false, true}) {
      const auto base = randn(x.size(), 4);
      std::vector<float> dx_cpu = base, dx_ref = base, dw_cpu = randn(static_cast<size_t>(c.C), 5), dw_ref = dw_cpu;
      cpu::rmsnorm_backward(dx_cpu.data(), dw_cpu.data(), dy.data(), x.data(), w.data(), r_ref.data(), c.N, c.C,
                            accumulate, c.heads, c.ld);
      ref::rmsnorm_backward(dx_ref.data(), dw_ref.data(), dy.data(), x.data(), w.data(), r_ref.data(), c.N, c.C,
                            accumulate, c.heads, c.ld);
      EXPECT_TRUE(all_close(dx_cpu, dx_ref, 1e-4, 1e-5)) << "accumulate=" << accumulate;
      EXPECT_TRUE(all_close(dw_cpu, dw_ref, 1e-4, 1e-4));
    }
    // Overwriting mode with dinp aliasing dout.
    std::vector<float> alias = dy, dx_ref = dy;  // padding between rows keeps dy's values in both
    cpu::rmsnorm_backward(alias.data(), nullptr, alias.data(), x.data(), w.data(), r_ref.data(), c.N, c.C, false,
                          c.heads, c.ld);
    ref::rmsnorm_backward(dx_ref.data(), nullptr, dy.data(), x.data(), w.data(), r_ref.data(), c.N, c.C, false,
                          c.heads, c.ld);
    EXPECT_TRUE(all_close(alias, dx_ref, 1e-4, 1e-5));
  }
}

TEST(FamiliesRmsNorm, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t N = 3;
  const int C = 7, heads = 2;
  const int64_t ld = 2 * C + 3;
  auto x = randn(static_cast<size_t>(N * ld), 11), w = randn(static_cast<size_t>(C), 12);
  const auto proj = randn(x.size(), 13);  // loss = Σ out·proj over the normalised entries
  std::vector<float> out(x.size()), rstd(static_cast<size_t>(N * heads));
  auto loss = [&] {
    std::fill(out.begin(), out.end(), 0.0f);
    ref::rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f, heads, ld);
    return dot(out, proj);
  };
  loss();
  std::vector<float> dx(x.size(), 0.0f), dw(static_cast<size_t>(C), 0.0f);
  ref::rmsnorm_backward(dx.data(), dw.data(), proj.data(), x.data(), w.data(), rstd.data(), N, C, false, heads, ld);
  // Padding floats between rows are not inputs: their gradient is left as is (0 here) and the fd is 0.
  expect_grad(x, dx, loss, 2e-3);
  expect_grad(w, dw, loss, 2e-3);
}

// One call over heads side by side equals one call per head (the per-head q/k norm of Qwen3).
TEST(FamiliesRmsNorm, HeadsEqualSeparateCalls) {
  const int64_t N = 9;
  const int C = 32, heads = 4;
  const int64_t ld = heads * C + 16;
  const auto x = randn(static_cast<size_t>(N * ld), 21), w = randn(static_cast<size_t>(C), 22), dy = randn(x.size(), 23);
  std::vector<float> y(x.size(), 0.0f), r(static_cast<size_t>(N * heads)), dx(x.size(), 0.0f), dw(static_cast<size_t>(C), 0.0f);
  cpu::rmsnorm_forward(y.data(), r.data(), x.data(), w.data(), N, C, 1e-6f, heads, ld);
  cpu::rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), r.data(), N, C, false, heads, ld);
  std::vector<float> y1(x.size(), 0.0f), dx1(x.size(), 0.0f), dw1(static_cast<size_t>(C), 0.0f), r1(static_cast<size_t>(N));
  for (int g = 0; g < heads; g++) {
    cpu::rmsnorm_forward(y1.data() + g * C, r1.data(), x.data() + g * C, w.data(), N, C, 1e-6f, 1, ld);
    for (int64_t n = 0; n < N; n++) EXPECT_EQ(r1[size_t(n)], r[size_t(n * heads + g)]);
    cpu::rmsnorm_backward(dx1.data() + g * C, dw1.data(), dy.data() + g * C, x.data() + g * C, w.data(), r1.data(),
                          N, C, false, 1, ld);
  }
  EXPECT_TRUE(same_bits(y, y1));
  EXPECT_TRUE(same_bits(dx, dx1));
  EXPECT_TRUE(all_close(dw, dw1, 1e-5, 1e-5));
}

TEST(FamiliesRmsNorm, RejectsBadSizes) {
  float v = 0;
  EXPECT_THROW(cpu::rmsnorm_forward(&v, &v, &v, &v, 1, 0, 1e-5f), Error);
  EXPECT_THROW(ref::rmsnorm_forward(&v, &v, &v, &v, 1, 4, 1e-5f, 0), Error);
}

// ------------------------------------------------------------------------------------------------ RoPE

namespace {
std::vector<float> inv_freq(int rot_dim, double base) {
  std::vector<float> f(static_cast<size_t>(rot_dim / 2));
  for (int i = 0; i < rot_dim / 2; i++) f[size_t(i)] = float(std::pow(base, -2.0 * i / rot_dim));
  return f;
}
}  // namespace

// Partial rotary, several heads, padding between rows; positions up to a few thousand.
TEST(FamiliesRope, CpuMatchesReference) {
  struct Case { int heads, HD, rot; int64_t ld; };
  for (const Case& c : {Case{5, 24, 16, 5 * 24 + 8}, Case{3, 64, 64, 0}, Case{2, 10, 6, 0}}) {
    const int64_t N = 9;
    const int64_t L = c.ld > 0 ? c.ld : int64_t(c.heads) * c.HD;
    const auto f = inv_freq(c.rot, 10000.0);
    RopeParams p;
    p.heads = c.heads; p.HD = c.HD; p.rot_dim = c.rot; p.ld = c.ld; p.inv_freq = f.data();
    std::vector<int32_t> pos(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; n++) pos[size_t(n)] = int32_t((n * 977 + 3) % 4096);
    const auto x = randn(static_cast<size_t>(N * L), 31);
    for (bool backward : {false, true}) {
      std::vector<float> a = x, b = x;
      if (backward) {
        cpu::rope_backward(a.data(), pos.data(), N, p);
        ref::rope_backward(b.data(), pos.data(), N, p);
      } else {
        cpu::rope_forward(a.data(), pos.data(), N, p);
        ref::rope_forward(b.data(), pos.data(), N, p);
      }
      EXPECT_TRUE(all_close(a, b, 1e-5, 1e-5)) << "HD=" << c.HD << " rot=" << c.rot;
      // Dims past rot_dim and the padding are untouched.
      for (int64_t n = 0; n < N; n++)
        for (int64_t e = 0; e < L; e++) {
          const bool rotated = e < int64_t(c.heads) * c.HD && e % c.HD < c.rot;
          if (!rotated) {
            EXPECT_EQ(a[size_t(n * L + e)], x[size_t(n * L + e)]);
          }
        }
    }
  }
}

TEST(FamiliesRope, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t N = 4;
  const auto f = inv_freq(6, 100.0);
  RopeParams p;
  p.heads = 2; p.HD = 8; p.rot_dim = 6; p.inv_freq = f.data();
  const std::vector<int32_t> pos = {0, 1, 7, 33};
  auto x = randn(static_cast<size_t>(N * 16), 41);
  const auto proj = randn(x.size(), 42);
  auto loss = [&] {
    std::vector<float> y = x;
    ref::rope_forward(y.data(), pos.data(), N, p);
    return dot(y, proj);
  };
  std::vector<float> g = proj;
  ref::rope_backward(g.data(), pos.data(), N, p);
  expect_grad(x, g, loss, 2e-3);
}

// ------------------------------------------------------------------------------------------ Activations

namespace {
const Activation kActs[] = {Activation::GeluTanh, Activation::GeluErf, Activation::Relu, Activation::Silu,
                            Activation::Relu2};
}

TEST(FamiliesActivation, CpuMatchesReference) {
  for (int64_t n : {int64_t(1), int64_t(37), int64_t(1000 + 7), int64_t(40000 + 3)}) {  // threaded at the end
    auto x = randn(static_cast<size_t>(n), 51, 3.0f);
    if (n > 10) { x[0] = -12.0f; x[1] = 12.0f; x[2] = 0.0f; x[3] = -30.0f; x[4] = 40.0f; }
    const auto dy = randn(static_cast<size_t>(n), 52);
    for (Activation a : kActs) {
      std::vector<float> y_cpu(static_cast<size_t>(n)), y_ref(static_cast<size_t>(n)), d_cpu(static_cast<size_t>(n)), d_ref(static_cast<size_t>(n));
      cpu::activation_forward(y_cpu.data(), x.data(), n, a);
      ref::activation_forward(y_ref.data(), x.data(), n, a);
      EXPECT_TRUE(all_close(y_cpu, y_ref, 2e-6, 1e-7)) << "activation " << int(a) << " n=" << n;
      cpu::activation_backward(d_cpu.data(), x.data(), dy.data(), n, a);
      ref::activation_backward(d_ref.data(), x.data(), dy.data(), n, a);
      EXPECT_TRUE(all_close(d_cpu, d_ref, 2e-5, 1e-6)) << "activation " << int(a) << " n=" << n;
      // The backward may overwrite dout in place.
      std::vector<float> alias = dy;
      cpu::activation_backward(alias.data(), x.data(), alias.data(), n, a);
      EXPECT_TRUE(same_bits(alias, d_cpu));
    }
  }
}

// GeluTanh is GPT-2's GELU: the very same bits as gelu_forward / gelu_backward.
TEST(FamiliesActivation, GeluTanhIsGptGelu) {
  const int64_t n = 1000 + 9;
  const auto x = randn(static_cast<size_t>(n), 61, 3.0f), dy = randn(static_cast<size_t>(n), 62);
  std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
  cpu::activation_forward(a.data(), x.data(), n, Activation::GeluTanh);
  cpu::gelu_forward(b.data(), x.data(), n);
  EXPECT_TRUE(same_bits(a, b));
  cpu::activation_backward(a.data(), x.data(), dy.data(), n, Activation::GeluTanh);
  cpu::gelu_backward(b.data(), x.data(), dy.data(), n);
  EXPECT_TRUE(same_bits(a, b));
}

TEST(FamiliesActivation, GatedCpuMatchesReference) {
  for (int I : {1, 37, 64, 300}) {
    const int64_t N = I == 300 ? 70 : 5;  // the last threaded
    const auto gu = randn(static_cast<size_t>(N * 2 * I), 71, 2.5f), dy = randn(static_cast<size_t>(N * I), 72);
    for (Activation a : kActs) {
      std::vector<float> y_cpu(static_cast<size_t>(N * I)), y_ref(static_cast<size_t>(N * I)), d_cpu(gu.size()), d_ref(gu.size());
      cpu::gated_forward(y_cpu.data(), gu.data(), N, I, a);
      ref::gated_forward(y_ref.data(), gu.data(), N, I, a);
      EXPECT_TRUE(all_close(y_cpu, y_ref, 2e-6, 1e-7)) << "activation " << int(a) << " I=" << I;
      cpu::gated_backward(d_cpu.data(), gu.data(), dy.data(), N, I, a);
      ref::gated_backward(d_ref.data(), gu.data(), dy.data(), N, I, a);
      EXPECT_TRUE(all_close(d_cpu, d_ref, 2e-5, 1e-6)) << "activation " << int(a) << " I=" << I;
    }
  }
}

TEST(FamiliesActivation, ReferenceBackwardMatchesFiniteDifferences) {
  const int64_t N = 3;
  const int I = 5;
  for (Activation a : kActs) {
    auto x = randn(static_cast<size_t>(N * I), 81, 2.0f);
    for (auto& v : x)
      if (std::fabs(v) < 0.05f) v += 0.1f;  // away from ReLU's kink, where the fd is meaningless
    const auto proj = randn(x.size(), 82);
    std::vector<float> y(x.size()), g(x.size());
    auto loss = [&] {
      ref::activation_forward(y.data(), x.data(), int64_t(x.size()), a);
      return dot(y, proj);
    };
    ref::activation_backward(g.data(), x.data(), proj.data(), int64_t(x.size()), a);
    expect_grad(x, g, loss, 1e-3);

    auto gu = randn(static_cast<size_t>(N * 2 * I), 83, 2.0f);
    for (auto& v : gu)
      if (std::fabs(v) < 0.05f) v += 0.1f;
    std::vector<float> o(static_cast<size_t>(N * I)), dgu(gu.size());
    auto gloss = [&] {
      ref::gated_forward(o.data(), gu.data(), N, I, a);
      return dot(o, proj);
    };
    ref::gated_backward(dgu.data(), gu.data(), proj.data(), N, I, a);
    expect_grad(gu, dgu, gloss, 1e-3);
  }
}

// ------------------------------------------------------------------------------------------- Attention

namespace {

AttentionParams attn(int B, int T, int NH, int NKV, int HD, bool causal, int window = 0) {
  AttentionParams p;
  p.B = B; p.T = T; p.NH = NH; p.NKV = NKV; p.HD = HD; p.causal = causal; p.window = window;
  p.scale = 1.0f / std::sqrt(float(HD));
  return p;
}

int64_t tokens(const AttentionParams& p) { return p.cu_seqlens ? p.cu_seqlens[p.num_seqs] : int64_t(p.B) * p.T; }

struct Result {
  std::vector<float> out, lse, dqkv;
};

template <class Fwd, class Bwd>
Result run(Fwd fwd, Bwd bwd, const std::vector<float>& qkv, const std::vector<float>& dout,
           const AttentionParams& p) {
  const int64_t N = tokens(p), C = int64_t(p.NH) * p.HD;
  Result r{std::vector<float>(static_cast<size_t>(N * C)), std::vector<float>(static_cast<size_t>(p.NH * N)),
           std::vector<float>(static_cast<size_t>(N * qkv_row(p)), 12345.0f)};  // poisoned: must be overwritten
  fwd(r.out.data(), r.lse.data(), qkv.data(), p);
  bwd(r.dqkv.data(), dout.data(), qkv.data(), r.out.data(), r.lse.data(), p);
  return r;
}
Result run_cpu(const std::vector<float>& qkv, const std::vector<float>& dout, const AttentionParams& p) {
  return run(cpu::attention_forward, cpu::attention_backward, qkv, dout, p);
}
Result run_ref(const std::vector<float>& qkv, const std::vector<float>& dout, const AttentionParams& p) {
  return run(ref::attention_forward, ref::attention_backward, qkv, dout, p);
}

void expect_matches_ref(const AttentionParams& p, uint64_t seed, const char* what) {
  const int64_t N = tokens(p);
  const auto qkv = randn(static_cast<size_t>(N * qkv_row(p)), seed, 1.5f), dout = randn(static_cast<size_t>(N * p.NH * p.HD), seed + 1);
  const Result c = run_cpu(qkv, dout, p), r = run_ref(qkv, dout, p);
  EXPECT_TRUE(all_close(c.out, r.out, 1e-4, 1e-5)) << what;
  EXPECT_TRUE(all_close(c.lse, r.lse, 1e-5, 1e-5)) << what;
  EXPECT_TRUE(all_close(c.dqkv, r.dqkv, 2e-3, 1e-4)) << what;
}

// qkv with NKV key/value heads → the same with every kv head repeated for each query head of its group.
std::vector<float> repeat_kv(const std::vector<float>& qkv, int64_t N, int NH, int NKV, int HD) {
  const int G = NH / NKV;
  const int64_t R = int64_t(NH + 2 * NKV) * HD, R3 = int64_t(3 * NH) * HD;
  std::vector<float> full(static_cast<size_t>(N * R3));
  for (int64_t n = 0; n < N; n++) {
    const float* src = qkv.data() + n * R;
    float* dst = full.data() + n * R3;
    std::copy(src, src + int64_t(NH) * HD, dst);
    for (int h = 0; h < NH; h++) {
      std::copy(src + int64_t(NH + h / G) * HD, src + int64_t(NH + h / G + 1) * HD, dst + int64_t(NH + h) * HD);
      std::copy(src + int64_t(NH + NKV + h / G) * HD, src + int64_t(NH + NKV + h / G + 1) * HD,
                dst + int64_t(2 * NH + h) * HD);
    }
  }
  return full;
}

}  // namespace

// Grouped-query attention (MQA, GQA, MHA) against ref, causal and not, with partial tiles and B > 1.
TEST(FamiliesAttention, GqaMatchesReference) {
  uint64_t seed = 100;
  for (int NKV : {1, 2, 8})
    for (bool causal : {true, false})
      for (int HD : {16, 64}) {
        const std::string what = "NKV=" + std::to_string(NKV) + " causal=" + std::to_string(causal) +
                                 " HD=" + std::to_string(HD);
        expect_matches_ref(attn(2, 70, 8, NKV, HD, causal), seed++, what.c_str());
      }
}

// Packed sequences (one of them empty) with GQA and with a window.
TEST(FamiliesAttention, PackedSequencesWithGqaAndWindow) {
  const std::vector<int32_t> cu = {0, 33, 33, 130, 135};
  uint64_t seed = 200;
  for (int NKV : {1, 2, 8})
    for (int window : {0, 3, 17}) {
      AttentionParams p = attn(0, 0, 8, NKV, 32, true, window);
      p.cu_seqlens = cu.data();
      p.num_seqs = 4;
      const std::string what = "NKV=" + std::to_string(NKV) + " window=" + std::to_string(window);
      expect_matches_ref(p, seed++, what.c_str());
    }
  AttentionParams p = attn(0, 0, 8, 2, 32, false);  // and not causal
  p.cu_seqlens = cu.data();
  p.num_seqs = 4;
  expect_matches_ref(p, seed, "non-causal packed");
}

// Sliding windows from one token to more than the sequence, across several key tiles.
TEST(FamiliesAttention, WindowMatchesReference) {
  uint64_t seed = 300;
  for (int window : {1, 3, 17, 64, 65, 200})
    for (int NKV : {2, 8}) {
      const std::string what = "window=" + std::to_string(window) + " NKV=" + std::to_string(NKV);
      expect_matches_ref(attn(2, 150, 8, NKV, 32, true, window), seed++, what.c_str());
    }
}

// A window at least as long as the sequence changes nothing: the same bits as no window.
TEST(FamiliesAttention, WindowLongerThanSequenceIsPlainCausal) {
  const AttentionParams p = attn(1, 100, 4, 2, 32, true), pw = attn(1, 100, 4, 2, 32, true, 100);
  const auto qkv = randn(static_cast<size_t>(100 * qkv_row(p)), 7), dout = randn(static_cast<size_t>(100 * 4 * 32), 8);
  const Result a = run_cpu(qkv, dout, p), b = run_cpu(qkv, dout, pw);
  EXPECT_TRUE(all_close(b.out, a.out, 1e-6, 1e-7));
  EXPECT_TRUE(all_close(b.dqkv, a.dqkv, 1e-5, 1e-6));
}

// GQA equals ordinary attention over K/V heads repeated per query head: out, lse and dQ head by head, and
// dK, dV the sum over the group of the repeated heads' gradients. For both backends.
TEST(FamiliesAttention, GqaEqualsAttentionOnRepeatedKv) {
  const int B = 2, T = 77, NH = 8, HD = 32;
  const int64_t N = B * T, C = NH * HD;
  for (int NKV : {1, 2, 4})
    for (bool use_cpu : {true, false}) {
      const AttentionParams p = attn(B, T, NH, NKV, HD, true, use_cpu ? 20 : 0), pf = attn(B, T, NH, NH, HD, true,
                                                                                            use_cpu ? 20 : 0);
      const auto qkv = randn(static_cast<size_t>(N * qkv_row(p)), 400 + NKV), dout = randn(static_cast<size_t>(N * C), 500 + NKV);
      const auto full = repeat_kv(qkv, N, NH, NKV, HD);
      const Result g = use_cpu ? run_cpu(qkv, dout, p) : run_ref(qkv, dout, p);
      const Result f = use_cpu ? run_cpu(full, dout, pf) : run_ref(full, dout, pf);
      EXPECT_TRUE(all_close(g.out, f.out, 1e-6, 1e-7));
      EXPECT_TRUE(all_close(g.lse, f.lse, 1e-6, 1e-7));
      const int G = NH / NKV;
      const int64_t R = qkv_row(p), R3 = 3 * C;
      std::vector<float> want(g.dqkv.size(), 0.0f);
      for (int64_t n = 0; n < N; n++) {
        for (int64_t e = 0; e < C; e++) want[size_t(n * R + e)] = f.dqkv[size_t(n * R3 + e)];
        for (int h = 0; h < NH; h++)
          for (int d = 0; d < HD; d++) {
            want[size_t(n * R + (NH + h / G) * HD + d)] += f.dqkv[size_t(n * R3 + (NH + h) * HD + d)];
            want[size_t(n * R + (NH + NKV + h / G) * HD + d)] += f.dqkv[size_t(n * R3 + (2 * NH + h) * HD + d)];
          }
      }
      EXPECT_TRUE(all_close(g.dqkv, want, 1e-4, 1e-5)) << "NKV=" << NKV << " cpu=" << use_cpu;
    }
}

// ref:: backward with GQA and a window against central differences of loss = Σ out·proj.
TEST(FamiliesAttention, ReferenceBackwardMatchesFiniteDifferences) {
  for (int window : {0, 2}) {
    AttentionParams p = attn(1, 6, 4, 2, 4, true, window);
    p.scale = 0.7f;
    const int64_t N = 6, C = 16;
    auto qkv = randn(static_cast<size_t>(N * qkv_row(p)), 600);
    const auto proj = randn(static_cast<size_t>(N * C), 601);
    std::vector<float> out(static_cast<size_t>(N * C)), lse(static_cast<size_t>(4 * N));
    auto loss = [&] {
      ref::attention_forward(out.data(), lse.data(), qkv.data(), p);
      return dot(out, proj);
    };
    loss();
    std::vector<float> g(qkv.size());
    ref::attention_backward(g.data(), proj.data(), qkv.data(), out.data(), lse.data(), p);
    expect_grad(qkv, g, loss, 2e-3);
  }
}

// With GQA, several query heads feed each dK, dV row: still the same bits for any thread count.
TEST(FamiliesAttention, GqaBackwardIsDeterministic) {
  const AttentionParams p = attn(3, 90, 8, 2, 32, true, 33);
  const int64_t N = 270;
  const auto qkv = randn(static_cast<size_t>(N * qkv_row(p)), 700), dout = randn(static_cast<size_t>(N * 8 * 32), 701);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Result a = run_cpu(qkv, dout, p);
  omp_set_num_threads(std::max(threads, 3));
  const Result b = run_cpu(qkv, dout, p);
  omp_set_num_threads(threads);
  EXPECT_TRUE(same_bits(a.out, b.out));
  EXPECT_TRUE(same_bits(a.dqkv, b.dqkv));
}

TEST(FamiliesAttention, RejectsBadHeadsAndWindow) {
  std::vector<float> buf(4096);
  AttentionParams p = attn(1, 4, 8, 3, 16, true);
  EXPECT_THROW(cpu::attention_forward(buf.data(), buf.data(), buf.data(), p), Error);
  p = attn(1, 4, 8, 2, 16, false, 3);  // a window needs causal attention
  EXPECT_THROW(ref::attention_forward(buf.data(), buf.data(), buf.data(), p), Error);
}

// ------------------------------------------------------------------------------------ Decode attention

// GQA, per-sequence past, windows; HD 32 (vectorised) and 20 (scalar path); a long cache with few heads
// exercises the split-and-merge path.
TEST(FamiliesDecodeAttention, MatchesReference) {
  struct Case { int B, Tq, NH, NKV, HD, window; std::vector<int32_t> past; };
  const std::vector<Case> cases = {
      {3, 1, 8, 2, 32, 0, {0, 5, 300}},  {3, 4, 8, 1, 32, 7, {0, 5, 300}},   {3, 4, 8, 8, 20, 1, {2, 0, 40}},
      {2, 3, 8, 2, 32, 1000, {10, 17}},  {1, 1, 2, 1, 64, 0, {3000}},        {1, 1, 2, 1, 64, 700, {3000}},
      {2, 2, 4, 2, 32, 300, {1500, 10}},
  };
  uint64_t seed = 800;
  for (const Case& c : cases) {
    int max_pos = 0;
    for (int32_t pp : c.past) max_pos = std::max(max_pos, pp + c.Tq);
    const int64_t KC = int64_t(c.NKV) * c.HD, R = int64_t(c.NH + 2 * c.NKV) * c.HD, C = int64_t(c.NH) * c.HD;
    const auto q = randn(static_cast<size_t>(c.B * c.Tq * R), seed++), k = randn(static_cast<size_t>(c.B) * max_pos * KC, seed++),
               v = randn(static_cast<size_t>(c.B) * max_pos * KC, seed++);
    DecodeAttentionParams p;
    p.B = c.B; p.Tq = c.Tq; p.past_per_seq = c.past.data(); p.NH = c.NH; p.HD = c.HD; p.NKV = c.NKV;
    p.window = c.window; p.scale = 1.0f / std::sqrt(float(c.HD));
    p.q = q.data(); p.q_stride = R;  // queries read from fused rows
    p.k = k.data(); p.v = v.data(); p.kv_stride = KC; p.kv_batch_stride = int64_t(max_pos) * KC;
    std::vector<float> o_cpu(static_cast<size_t>(c.B * c.Tq * C), 9.0f), o_ref = o_cpu;
    p.out = o_cpu.data(); p.out_stride = C;
    cpu::decode_attention(p);
    p.out = o_ref.data();
    ref::decode_attention(p);
    EXPECT_TRUE(all_close(o_cpu, o_ref, 1e-4, 1e-5))
        << "B=" << c.B << " Tq=" << c.Tq << " NKV=" << c.NKV << " HD=" << c.HD << " window=" << c.window;
  }
}

// Decode attention over a cache equals full attention's last rows (a prefill continued token by token),
// with GQA and a window: two independent paths through the same definition.
TEST(FamiliesDecodeAttention, AgreesWithFullAttention) {
  const int T = 40, NH = 4, NKV = 2, HD = 16, window = 9;
  const AttentionParams ap = attn(1, T, NH, NKV, HD, true, window);
  const int64_t R = qkv_row(ap), KC = NKV * HD, C = NH * HD;
  const auto qkv = randn(static_cast<size_t>(T * R), 900);
  std::vector<float> out(static_cast<size_t>(T * C)), lse(static_cast<size_t>(NH * T));
  ref::attention_forward(out.data(), lse.data(), qkv.data(), ap);
  std::vector<float> kc(static_cast<size_t>(T * KC)), vc(static_cast<size_t>(T * KC));
  for (int t = 0; t < T; t++)
    for (int64_t e = 0; e < KC; e++) {
      kc[size_t(t * KC + e)] = qkv[size_t(t * R + C + e)];
      vc[size_t(t * KC + e)] = qkv[size_t(t * R + C + KC + e)];
    }
  const int past = 30, Tq = T - past;
  DecodeAttentionParams p;
  p.B = 1; p.Tq = Tq; p.past = past; p.NH = NH; p.NKV = NKV; p.HD = HD; p.window = window; p.scale = ap.scale;
  p.q = qkv.data() + past * R; p.q_stride = R;
  p.k = kc.data(); p.v = vc.data(); p.kv_stride = KC; p.kv_batch_stride = T * KC;
  std::vector<float> o(static_cast<size_t>(Tq * C));
  p.out = o.data(); p.out_stride = C;
  cpu::decode_attention(p);
  EXPECT_TRUE(all_close(o.data(), out.data() + past * C, o.size(), 1e-4, 1e-5));
}
