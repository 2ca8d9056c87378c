// Generation: the decode-attention kernel (cpu:: against ref::), the KV-cache decoder against the training
// model's full-recompute forward, and the sampler (seeded reproducibility, greedy, top-k / top-p support
// checked against an independent computation by sorting).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <set>
#include <vector>

#include "core/error.h"
#include "tests/gpt2_compat.h"
#include "infer/sampler.h"
#include "infer/text_stream.h"
#include "kernels/decode_attention.h"
#include "kernels/gemv.h"
#include "tests/gpt2_compat.h"
#include "test_util.h"

using namespace kiln;
using kiln::test::all_close;
using kiln::test::randn;

namespace {

// Inputs and both outputs of one decode-attention problem.
struct DecodeCase {
  int B = 1, Tq = 1, NH = 2, HD = 64, max_pos = 64;
  std::vector<int32_t> past;  // per sequence
  float scale_mult = 1.0f;
  int64_t q_stride_mult = 1;  // q rows are q_stride_mult·C apart (3 reads fused QKV rows)
};

void check_decode(const DecodeCase& c, uint64_t seed) {
  const int64_t C = int64_t(c.NH) * c.HD, rows = int64_t(c.B) * c.Tq;
  const auto q = randn(size_t(rows * C * c.q_stride_mult), seed);
  const auto k = randn(size_t(c.B * c.max_pos * C), seed + 1);
  const auto v = randn(size_t(c.B * c.max_pos * C), seed + 2);
  DecodeAttentionParams p;
  p.B = c.B;
  p.Tq = c.Tq;
  p.past_per_seq = c.past.data();
  p.NH = c.NH;
  p.HD = c.HD;
  p.scale = c.scale_mult / std::sqrt(float(c.HD));
  p.q = q.data();
  p.q_stride = C * c.q_stride_mult;
  p.k = k.data();
  p.v = v.data();
  p.kv_batch_stride = int64_t(c.max_pos) * C;
  p.kv_stride = C;
  std::vector<float> out_cpu(size_t(rows * C), 777.0f), out_ref(size_t(rows * C), -777.0f);
  p.out = out_ref.data();
  p.out_stride = C;
  ref::decode_attention(p);
  p.out = out_cpu.data();
  cpu::decode_attention(p);
  EXPECT_TRUE(all_close(out_cpu, out_ref, 1e-4, 2e-5));
}

}  // namespace

// Single queries, short and long caches (the long ones take the split-keys path: 2 heads cannot keep the
// threads busy), head dims with and without a vector tail, peaky scores.
TEST(DecodeAttention, MatchesReference) {
  uint64_t seed = 10;
  for (int HD : {64, 24})
    for (int past : {0, 1, 130, 700})
      for (float sm : {1.0f, 8.0f}) {
        SCOPED_TRACE(::testing::Message() << "HD=" << HD << " past=" << past << " scale x" << sm);
        DecodeCase c;
        c.HD = HD;
        c.max_pos = past + 1;
        c.past = {past};
        c.scale_mult = sm;
        check_decode(c, seed += 3);
      }
}

// Several queries per sequence (causal among themselves), a batch with different cache lengths, and queries
// read from fused QKV rows.
TEST(DecodeAttention, BatchAndSeveralQueries) {
  DecodeCase c;
  c.B = 3;
  c.Tq = 5;
  c.NH = 3;
  c.HD = 32;
  c.max_pos = 600;
  c.past = {0, 17, 590};
  c.q_stride_mult = 3;
  check_decode(c, 99);
  c.Tq = 1;
  c.NH = 1;
  c.past = {599, 3, 300};
  check_decode(c, 199);
}

// Matrix-vector products: cpu:: against ref:: over shapes with and without vector tails, row counts that
// are not multiples of 4, large ones (threaded) and small ones (serial), with and without bias / accumulation.
TEST(Gemv, MatchesReference) {
  uint64_t seed = 500;
  for (auto [K, N] : {std::pair<int, int>{768, 2304}, {3072, 768}, {7, 5}, {37, 83}, {1001, 129}, {2, 4096}}) {
    SCOPED_TRACE(::testing::Message() << "K=" << K << " N=" << N);
    const auto x = randn(size_t(K), seed++), W = randn(size_t(K) * N, seed++), b = randn(size_t(N), seed++);
    const auto y0 = randn(size_t(N), seed++);
    for (bool acc : {false, true})
      for (bool bias : {false, true}) {
        std::vector<float> yc = y0, yr = y0;
        cpu::vecmat_batch(yc.data(), N, x.data(), K, 1, W.data(), bias ? b.data() : nullptr, K, N, acc);
        ref::vecmat(yr.data(), x.data(), W.data(), bias ? b.data() : nullptr, K, N, acc);
        EXPECT_TRUE(all_close(yc, yr, 1e-4, 1e-4 * std::sqrt(double(K)))) << "vecmat acc=" << acc << " bias=" << bias;
      }
    // matvec with the same matrix read as [K rows, N columns].
    const auto xn = randn(size_t(N), seed++);
    std::vector<float> mc(size_t(K), 9.0f), mr(size_t(K), -9.0f);
    cpu::matvec_batch(mc.data(), K, xn.data(), N, 1, W.data(), nullptr, K, N, false);
    ref::matvec(mr.data(), W.data(), xn.data(), K, N);
    EXPECT_TRUE(all_close(mc, mr, 1e-4, 1e-4 * std::sqrt(double(N)))) << "matvec";
  }
}

// The decoding batch's products: each row of an R-row call equals a one-row call bit for bit, with 1 or 2
// threads (the property that makes greedy decoding in a batch exactly greedy decoding alone).
TEST(Gemv, BatchRowsAreIndependent) {
  const int saved_threads = omp_get_max_threads();
  uint64_t seed = 700;
  for (auto [K, N] : {std::pair<int, int>{768, 2304}, {3072, 768}, {37, 83}, {200, 129}}) {
    SCOPED_TRACE(::testing::Message() << "K=" << K << " N=" << N);
    const int64_t R = 16;
    const auto x = randn(size_t(R * K), seed++), W = randn(size_t(K) * N, seed++), b = randn(size_t(N), seed++);
    const auto y0 = randn(size_t(R * N), seed++);
    for (bool out_in : {false, true}) {
      std::vector<float> one_thread;
      for (int threads : {1, 2}) {
        omp_set_num_threads(threads);
        // matvec_batch reads W as A [N rows of K].
        auto run = [&](float* y, const float* xr, int64_t rows) {
          if (out_in)
            cpu::matvec_batch(y, N, xr, K, rows, W.data(), b.data(), N, K, true);
          else
            cpu::vecmat_batch(y, N, xr, K, rows, W.data(), b.data(), K, N, true);
        };
        for (int64_t rows : {int64_t(1), int64_t(5), R}) {
          std::vector<float> batched = y0, single = y0;
          run(batched.data(), x.data(), rows);
          for (int64_t r = 0; r < rows; r++) run(single.data() + r * N, x.data() + r * K, 1);
          EXPECT_EQ(0, std::memcmp(batched.data(), single.data(), sizeof(float) * size_t(rows * N)))
              << (out_in ? "matvec_batch" : "vecmat_batch") << " rows=" << rows << " threads=" << threads;
          if (rows == R && threads == 1) one_thread = batched;
          if (rows == R && threads == 2) {
            EXPECT_EQ(one_thread, batched) << "1 vs 2 threads";
          }
        }
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

namespace {

GPT2Config tiny_config(int n_positions = 64) {
  GPT2Config cfg;
  cfg.n_layer = 2;
  cfg.n_head = 4;
  cfg.n_embd = 64;
  cfg.vocab_size = 97;
  cfg.n_positions = n_positions;
  return cfg;
}

// Random weights at scales that make every part matter: matrices N(0, 0.1), LayerNorm gains 1 ± 0.1, biases.
void fill_weights(GPT2& m, uint64_t seed) {
  Rng r(seed);
  for (const ParamSpec& s : m.table().specs) {
    float* w = m.params() + s.offset;
    const bool gain = s.name.find("ln_") != std::string::npos && s.name.find(".weight") != std::string::npos;
    for (int64_t i = 0; i < s.numel(); i++) w[i] = gain ? 1.0f + 0.1f * r.normal() : 0.1f * r.normal();
  }
}

std::vector<int32_t> random_tokens(size_t n, int V, uint64_t seed) {
  Rng r(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = int32_t(r.below(uint64_t(V)));
  return t;
}

// Logits [B·T, V] of the training model's forward over B rows of T tokens (full recompute, no cache).
std::vector<float> full_logits(GPT2& m, const std::vector<int32_t>& tokens, int B, int T) {
  m.plan(B, T);
  std::vector<int32_t> pos(size_t(B) * T);
  for (size_t i = 0; i < pos.size(); i++) pos[i] = int32_t(i % size_t(T));
  m.forward(tokens.data(), pos.data(), nullptr, m.attention_params(B, T), 0.0f);
  const size_t n = size_t(B) * T * size_t(m.config().vocab_size);
  return std::vector<float>(m.logits(), m.logits() + n);
}

}  // namespace

// Prefill of a prompt, then one token at a time: every position's logits equal the full-recompute forward.
TEST(Decoder, MatchesFullForward) {
  const GPT2Config cfg = tiny_config();
  GPT2 model(cfg, /*with_grads=*/false);
  fill_weights(model, 5);
  const int B = 2, T = 40, prompt = 9, V = cfg.vocab_size;
  const auto tokens = random_tokens(size_t(B) * T, V, 6);
  const auto ref = full_logits(model, tokens, B, T);

  Decoder dec(cfg, model.params(), B);
  std::vector<int32_t> prompt_tok(size_t(B) * prompt);
  for (int b = 0; b < B; b++)
    std::copy_n(tokens.begin() + b * T, prompt, prompt_tok.begin() + b * prompt);
  const float* lg = dec.forward(prompt_tok.data(), prompt, /*all_logits=*/true);
  for (int b = 0; b < B; b++)
    EXPECT_TRUE(all_close(lg + size_t(b) * prompt * V, ref.data() + size_t(b) * T * V, size_t(prompt) * V, 0, 1e-4))
        << "prefill, sequence " << b;
  for (int t = prompt; t < T; t++) {
    std::vector<int32_t> step = {tokens[size_t(t)], tokens[size_t(T + t)]};
    lg = dec.forward(step.data(), 1);
    for (int b = 0; b < B; b++)
      ASSERT_TRUE(all_close(lg + size_t(b) * V, ref.data() + (size_t(b) * T + t) * V, size_t(V), 0, 1e-4))
          << "position " << t << ", sequence " << b;
  }
  EXPECT_EQ(dec.length(), T);
}

// A prompt longer than one prefill chunk: the second chunk attends to the cache through the decode kernel
// with many queries; then a few single steps.
TEST(Decoder, ChunkedPrefillMatchesFullForward) {
  const GPT2Config cfg = tiny_config(300);
  GPT2 model(cfg, false);
  fill_weights(model, 8);
  const int T = 290, prompt = 285, V = cfg.vocab_size;
  static_assert(Decoder::kMaxChunk < 285);
  const auto tokens = random_tokens(size_t(T), V, 9);
  const auto ref = full_logits(model, tokens, 1, T);
  Decoder dec(cfg, model.params());
  const float* lg = dec.forward(tokens.data(), prompt, true);
  EXPECT_TRUE(all_close(lg, ref.data(), size_t(prompt) * V, 0, 1e-4));
  for (int t = prompt; t < T; t++) {
    lg = dec.forward(&tokens[size_t(t)], 1);
    ASSERT_TRUE(all_close(lg, ref.data() + size_t(t) * V, size_t(V), 0, 1e-4)) << "position " << t;
  }
  // Without all_logits the prefill returns the last position's logits only.
  dec.reset();
  lg = dec.forward(tokens.data(), prompt);
  EXPECT_TRUE(all_close(lg, ref.data() + size_t(prompt - 1) * V, size_t(V), 0, 1e-4));
}

TEST(Decoder, RejectsBadTokensAndOverflow) {
  const GPT2Config cfg = tiny_config(8);
  GPT2 model(cfg, false);
  fill_weights(model, 1);
  Decoder dec(cfg, model.params());
  const int32_t bad = cfg.vocab_size, neg = -1;
  EXPECT_THROW(dec.forward(&bad, 1), Error);
  EXPECT_THROW(dec.forward(&neg, 1), Error);
  const auto t = random_tokens(9, cfg.vocab_size, 2);
  EXPECT_THROW(dec.forward(t.data(), 9), Error);
  dec.forward(t.data(), 8);
  EXPECT_THROW(dec.forward(t.data(), 1), Error);
}

// ---------------------------------------------------------------------------------------------------------
// Sampler

namespace {

std::vector<int32_t> draw(const SamplingParams& sp, const std::vector<float>& logits, int n) {
  Sampler s(sp);
  std::vector<int32_t> out;
  for (int i = 0; i < n; i++) out.push_back(s.sample(logits.data(), int(logits.size())));
  return out;
}

// The allowed tokens and their probabilities, computed independently: softmax of logits/T in double, a full
// stable sort by decreasing probability, the first k, renormalise, the shortest prefix with mass >= p.
std::map<int32_t, double> allowed_set(const std::vector<float>& logits, float T, int k, float top_p,
                                      double* margin = nullptr) {
  const size_t V = logits.size();
  std::vector<double> p(V);
  double mx = *std::max_element(logits.begin(), logits.end()) / double(T), sum = 0;
  for (size_t i = 0; i < V; i++) sum += (p[i] = std::exp(double(logits[i]) / T - mx));
  for (auto& x : p) x /= sum;
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
  if (k > 0 && size_t(k) < V) order.resize(size_t(k));
  double kept = 0;
  for (int32_t i : order) kept += p[size_t(i)];
  std::map<int32_t, double> out;
  double cum = 0;
  if (margin) *margin = 1.0;
  for (int32_t i : order) {
    const double q = p[size_t(i)] / kept;
    out[i] = q;
    cum += q;
    if (margin) *margin = std::min(*margin, std::fabs(cum - double(top_p)));
    if (cum >= double(top_p)) break;
  }
  for (auto& [id, q] : out) q /= cum;
  return out;
}

}  // namespace

TEST(Sampler, SeedReproducesSamples) {
  const auto logits = randn(300, 4, 2.0f);
  SamplingParams sp;
  sp.temperature = 0.9f;
  sp.top_k = 50;
  sp.top_p = 0.95f;
  sp.seed = 1234;
  const auto a = draw(sp, logits, 500), b = draw(sp, logits, 500);
  EXPECT_EQ(a, b);
  sp.seed = 1235;
  EXPECT_NE(a, draw(sp, logits, 500));
}

// Greedy is the arg max (first among ties), and top-k = 1 at any temperature is the same token.
TEST(Sampler, GreedyAndTopK1) {
  for (uint64_t seed = 1; seed <= 30; seed++) {
    auto logits = randn(257, seed);
    for (auto& x : logits) x = std::round(x * 4.0f) / 4.0f;  // plenty of ties
    const int32_t expect = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    EXPECT_EQ(draw(greedy, logits, 1)[0], expect);
    SamplingParams k1;
    k1.top_k = 1;
    k1.temperature = 1.7f;
    k1.seed = seed;
    for (int32_t t : draw(k1, logits, 20)) EXPECT_EQ(t, expect);
  }
}

// top-k and top-p keep exactly the tokens of the independent computation: the candidate lists agree, no draw
// falls outside, and every allowed token shows up with about its probability.
TEST(Sampler, TopKTopPSupport) {
  // A fixed, tie-free distribution over 40 tokens with a long tail.
  std::vector<float> logits(40);
  for (int i = 0; i < 40; i++) logits[size_t(i)] = 3.0f * std::sin(1.3f * float(i) + 0.4f) - 0.05f * float(i);
  struct Setting {
    float T;
    int k;
    float p;
  };
  for (const Setting s : {Setting{1.0f, 5, 1.0f}, Setting{1.0f, 0, 0.7f}, Setting{0.7f, 12, 0.8f},
                          Setting{1.5f, 20, 0.5f}, Setting{2.0f, 0, 0.93f}, Setting{1.0f, 3, 0.999f}}) {
    SCOPED_TRACE(::testing::Message() << "T=" << s.T << " k=" << s.k << " p=" << s.p);
    double margin = 0;
    const auto allowed = allowed_set(logits, s.T, s.k, s.p, &margin);
    if (s.p < 1.0f) {
      ASSERT_GT(margin, 1e-4) << "test setting too close to a nucleus boundary";
    }
    SamplingParams sp;
    sp.temperature = s.T;
    sp.top_k = s.k;
    sp.top_p = s.p;
    sp.seed = 42;
    Sampler sampler(sp);
    std::vector<Candidate> cand;
    sampler.candidates(logits.data(), int(logits.size()), cand);
    ASSERT_EQ(cand.size(), allowed.size());
    for (const Candidate& c : cand) {
      ASSERT_TRUE(allowed.count(c.id)) << "candidate " << c.id << " not allowed";
      EXPECT_NEAR(c.p, allowed.at(c.id), 1e-6);
    }
    const int n = 20000;
    std::map<int32_t, int> counts;
    for (int i = 0; i < n; i++) counts[sampler.sample(logits.data(), int(logits.size()))]++;
    for (const auto& [id, cnt] : counts) EXPECT_TRUE(allowed.count(id)) << "drew token " << id << " outside the set";
    for (const auto& [id, q] : allowed) {
      const double expect = q * n, sd = std::sqrt(n * q * (1 - q));
      EXPECT_NEAR(counts[id], expect, 5 * sd + 3) << "token " << id;
      if (expect > 20) {
        EXPECT_GT(counts[id], 0) << "allowed token " << id << " never drawn";
      }
    }
  }
}

TEST(Sampler, RejectsBadSettings) {
  SamplingParams sp;
  sp.temperature = -1.0f;
  EXPECT_THROW(Sampler{sp}, Error);
  sp = {};
  sp.top_p = 0.0f;
  EXPECT_THROW(Sampler{sp}, Error);
  sp = {};
  sp.top_k = -2;
  EXPECT_THROW(Sampler{sp}, Error);
}

// ---------------------------------------------------------------------------------------------------------
// Streaming text

// A character split across tokens comes out whole, once its last byte arrives.
TEST(TextStream, HoldsSplitUtf8Characters) {
  TextStream s;
  EXPECT_EQ(s.push("caf\xC3"), "caf");            // é = C3 A9
  EXPECT_EQ(s.push("\xA9 \xF0\x9F"), "\xC3\xA9 "); // 😀 = F0 9F 98 80
  EXPECT_EQ(s.push("\x98"), "");
  EXPECT_EQ(s.push("\x80!"), "\xF0\x9F\x98\x80!");
  EXPECT_EQ(s.push("\xE2\x82"), "");             // € = E2 82 AC, cut by the end of generation
  EXPECT_EQ(s.finish(), "\xE2\x82");
  EXPECT_EQ(s.text(), "caf\xC3\xA9 \xF0\x9F\x98\x80!\xE2\x82");
  // Bytes that cannot be completed are not held: a stray continuation byte, an invalid lead byte.
  TextStream t;
  EXPECT_EQ(t.push("a\x80"), "a\x80");
  EXPECT_EQ(t.push("\xFF"), "\xFF");
}

// Text that may begin the stop string is held until it is known not to; the stop string and what follows
// never come out, even when it spans several tokens.
TEST(TextStream, StopString) {
  TextStream s("END");
  EXPECT_EQ(s.push("abcE"), "abc");
  EXPECT_EQ(s.push("Nx"), "ENx");
  EXPECT_EQ(s.push("yEN"), "y");
  EXPECT_EQ(s.push("D and more"), "");
  EXPECT_TRUE(s.stopped());
  EXPECT_EQ(s.push("later"), "");
  EXPECT_EQ(s.finish(), "");
  EXPECT_EQ(s.text(), "abcENxy");
  TextStream t("\n\n");
  EXPECT_EQ(t.push("one\n"), "one");
  EXPECT_EQ(t.push("two\n\nthree"), "\ntwo");
  EXPECT_TRUE(t.stopped());
  TextStream u("stop");
  EXPECT_EQ(u.push("st"), "");
  EXPECT_EQ(u.finish(), "st");  // generation ended without the stop string: the held text is released
}
