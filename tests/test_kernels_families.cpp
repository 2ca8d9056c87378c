// Kernels of the Llama / Mistral / Qwen families, what the op table (tests/ops/) does not check: identities
// between calls (per-head = separate calls, GeluTanh = GPT-2's GELU, GQA = repeated K/V, a long window = none,
// decode = full attention's last rows), determinism, and bad sizes. cpu:: against ref:: and ref:: backward
// against finite differences are the table's.
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
using kiln::test::randn;

namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- RMSNorm

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

// ------------------------------------------------------------------------------------------ Activations

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
