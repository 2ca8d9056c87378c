// Speculative decoding (infer/speculative.h). The rejection step against the exact residual distribution and
// the acceptance probability; whole speculative generations on small vocabularies (Markov-chain "models" whose
// next-token distributions are known exactly) against the target's own distribution of the first four tokens
// by a χ² test and a total-variation bound, at several draft/target mismatches; and greedy speculative output
// equal to plain greedy output for real decoders (several prompts and models, f32 and q8_0 weights, at the
// context limit, with end-of-text inside a draft), plus the cache roll-back itself. Prompt lookup (n-gram
// drafting, infer/prompt_lookup.h): its proposals by hand, its samples by the same χ² test, its greedy output
// equal to plain greedy output.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "infer/generate.h"
#include "infer/prompt_lookup.h"
#include "infer/speculative.h"
#include "models/family.h"
#include "models/model.h"
#include "chi2_test_util.h"
#include "test_util.h"

using namespace kiln;
namespace fs = std::filesystem;
using kiln::test::chi2_of;
using kiln::test::exact_joint;
using kiln::test::random_table;
using kiln::test::chi2_passes;
using kiln::test::Chi2;

namespace {

std::vector<double> normalized(std::vector<double> v) {
  double s = 0;
  for (double x : v) s += x;
  for (double& x : v) x /= s;
  return v;
}

TEST(Speculative, ResidualDistributionByHand) {
  const std::vector<double> p = {0.5, 0.2, 0.3, 0.0}, q = {0.1, 0.6, 0.1, 0.2};
  // max(0, p − q) = {0.4, 0, 0.2, 0}, normalised by 0.6.
  const std::vector<double> r = residual_distribution(p, q);
  EXPECT_NEAR(r[0], 0.4 / 0.6, 1e-12);
  EXPECT_EQ(r[1], 0.0);
  EXPECT_NEAR(r[2], 0.2 / 0.6, 1e-12);
  EXPECT_EQ(r[3], 0.0);
}

TEST(Speculative, RejectionStepAgainstTheExactResidual) {
  const std::vector<double> p = normalized({0.30, 0.05, 0.25, 0.10, 0.20, 0.10});
  const std::vector<double> q = normalized({0.05, 0.40, 0.10, 0.15, 0.20, 0.10});
  Rng rng(5);
  const int64_t n = 100000;
  // A fixed proposal with p < q: accepted with probability p/q; a rejection draws from the residual.
  for (int32_t x : {1, 3}) {
    std::vector<int64_t> counts(p.size(), 0);
    int64_t acc = 0, rej = 0;
    for (int64_t i = 0; i < n; i++) {
      const Verdict v = accept_or_resample(p, q, x, rng);
      if (v.accepted) {
        acc++;
        EXPECT_EQ(v.token, x);
      } else {
        rej++;
        counts[size_t(v.token)]++;
      }
    }
    const double pa = p[size_t(x)] / q[size_t(x)];
    EXPECT_NEAR(double(acc) / n, pa, 4.0 * std::sqrt(pa * (1 - pa) / n));  // 4 standard deviations
    std::vector<double> r(p.size());
    double tot = 0;
    for (size_t i = 0; i < p.size(); i++) tot += (r[i] = std::max(0.0, p[i] - q[i]));
    for (double& v : r) v /= tot;
    const Chi2 c = chi2_of(r, counts, rej);
    EXPECT_TRUE(chi2_passes(c.stat, std::max(c.df, 10))) << "x=" << x << " chi2 " << c.stat << " df " << c.df;
  }
  // A proposal with p >= q is always accepted.
  for (int i = 0; i < 1000; i++) EXPECT_TRUE(accept_or_resample(p, q, 0, rng).accepted);
  // x ~ q, then the step: the output is distributed as p.
  std::vector<int64_t> counts(p.size(), 0);
  for (int64_t i = 0; i < n; i++) counts[size_t(accept_or_resample(p, q, sample_dense(q, rng), rng).token)]++;
  const Chi2 c = chi2_of(p, counts, n);
  EXPECT_TRUE(chi2_passes(c.stat, std::max(c.df, 10))) << "chi2 " << c.stat;
}

// A "model" whose next-token logits depend only on the last token: logits[prev][v].
class MarkovDecoder final : public IncrementalDecoder {
 public:
  MarkovDecoder(std::vector<std::vector<float>> table, int max_pos) : table_(std::move(table)) {
    cfg_.vocab_size = int(table_.size());
    cfg_.max_positions = max_pos;
  }
  const float* forward(const int32_t* tokens, int n, bool all_logits) override {
    KILN_CHECK(length() + n <= cfg_.max_positions, "markov: overflow");
    out_.clear();
    for (int i = 0; i < n; i++) {
      hist_.push_back(tokens[i]);
      if (all_logits || i == n - 1) out_.insert(out_.end(), table_[size_t(tokens[i])].begin(), table_[size_t(tokens[i])].end());
    }
    forwards++;
    return out_.data();
  }
  int length() const override { return int(hist_.size()); }
  int max_positions() const override { return cfg_.max_positions; }
  int batch() const override { return 1; }
  void reset() override { hist_.clear(); }
  void truncate(int length) override {
    KILN_CHECK(length >= 0 && length <= this->length(), "markov: bad truncate");
    hist_.resize(size_t(length));
  }
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return 0; }
  const std::vector<int32_t>& history() const { return hist_; }
  int forwards = 0;

 private:
  std::vector<std::vector<float>> table_;
  std::vector<int32_t> hist_;
  std::vector<float> out_;
  ModelConfig cfg_;
};

TEST(Speculative, SamplesFollowTheTargetDistribution) {
  const int V = 4, L = 4;  // the first four tokens: 256 cells
  const int64_t n = 100000;
  const auto target = random_table(V, 1, 1.5f);
  struct Case {
    const char* name;
    std::vector<std::vector<float>> draft;
    int K, top_k;
    double min_prob = 0;  // --draft-min-prob: rounds of fewer proposals when the draft is unsure
  };
  std::vector<Case> cases = {
      {"draft = target", target, 3, 0},
      {"mild mismatch", random_table(V, 2, 0.5f), 3, 0},
      {"strong mismatch", random_table(V, 3, 3.0f), 2, 0},
      {"top-k 2 (disjoint supports)", random_table(V, 4, 2.0f), 3, 2},
      {"mild mismatch, drafting ends below p 0.6", {}, 3, 0, 0.6},
  };
  // Mild mismatch: the target plus noise.
  for (size_t i = 0; i < target.size(); i++)
    for (size_t j = 0; j < target[i].size(); j++) cases[1].draft[i][j] += target[i][j];
  cases[4].draft = cases[1].draft;
  double mild_per_round = 0;
  for (const Case& c : cases) {
    SamplingParams sp;
    sp.temperature = 1.0f;
    sp.top_k = c.top_k;
    sp.seed = 17;
    Sampler sampler(sp);
    const std::vector<double> exact = exact_joint(target, sampler, 0, L);
    std::vector<int64_t> counts(exact.size(), 0);
    MarkovDecoder t(target, 64), d(c.draft, 64);
    SpeculativeStats total;
    for (int64_t i = 0; i < n; i++) {
      sp.seed = uint64_t(i) + 1;
      Sampler s(sp);
      std::vector<int32_t> got;
      GenerateLimits lim;
      lim.max_new = L;
      SpeculativeStats st;
      generate_speculative(t, d, s, {0}, lim, c.K, [&](int32_t x) { got.push_back(x); return true; }, &st,
                           c.min_prob);
      ASSERT_EQ(got.size(), size_t(L));
      size_t cell = 0;
      for (int32_t x : got) cell = cell * V + size_t(x);
      counts[cell]++;
      total.drafted += st.drafted, total.accepted += st.accepted, total.rounds += st.rounds;
    }
    const Chi2 x2 = chi2_of(exact, counts, n);
    double tv = 0, expect_tv = 0;
    for (size_t i = 0; i < exact.size(); i++) {
      tv += 0.5 * std::fabs(double(counts[i]) / n - exact[i]);
      expect_tv += 0.5 * std::sqrt(2.0 * exact[i] * (1 - exact[i]) / (M_PI * n));  // E|binomial/n − p|
    }
    std::printf("%s: acceptance %.3f, %.2f proposals per round, chi2 %.1f (df %d), TV %.4f (sampling noise alone: "
                "%.4f)\n", c.name, total.acceptance_rate(), double(total.drafted) / double(total.rounds), x2.stat, x2.df,
                tv, expect_tv);
    // The same draft without the threshold (case 1, run before) proposes more per round.
    const double per_round = double(total.drafted) / double(total.rounds);
    if (c.min_prob > 0) EXPECT_LT(per_round, 0.8 * mild_per_round) << "drafting never ended early";
    if (&c == &cases[1]) mild_per_round = per_round;
    EXPECT_TRUE(chi2_passes(x2.stat, x2.df)) << c.name << ": chi2 " << x2.stat << " df " << x2.df;
    // The stated bound: total variation within 1.5x what 10^5 exact draws give on average.
    EXPECT_LT(tv, 1.5 * expect_tv) << c.name;
  }
}

TEST(PromptLookup, ProposalsByHand) {
  auto look = [](std::vector<int32_t> seq, int k, int max_ngram = 3, int min_ngram = 1) {
    std::vector<int32_t> out = {99};  // cleared first
    lookup_proposals(seq.data(), int(seq.size()), PromptLookupParams{max_ngram, min_ngram}, k, out);
    return out;
  };
  using V = std::vector<int32_t>;
  // [1 2] occurred at 0: what followed it, then on through the proposals themselves (3 1 2 3 ...).
  EXPECT_EQ(look({1, 2, 3, 1, 2}, 4), (V{3, 1, 2, 3}));
  EXPECT_EQ(look({1, 2, 3, 1, 2}, 2), (V{3, 1}));
  // The longest suffix wins over a later shorter one: [5 1 2] at 0 (followed by 8), not [1 2] at 4 (followed by 9).
  EXPECT_EQ(look({5, 1, 2, 8, 1, 2, 9, 5, 1, 2}, 2), (V{8, 1}));
  EXPECT_EQ(look({5, 1, 2, 8, 1, 2, 9, 5, 1, 2}, 2, 2), (V{9, 5}));  // n-grams of 2 at most: the latest [1 2]
  // The latest occurrence of a suffix wins: [4] at 2 (followed by 6), not at 0 (followed by 5).
  EXPECT_EQ(look({4, 5, 4, 6, 4}, 3), (V{6, 4, 6}));
  // A run repeats itself.
  EXPECT_EQ(look({3, 7, 7}, 5), (V{7, 7, 7, 7, 7}));
  // No earlier occurrence, or only shorter than min_ngram: nothing.
  EXPECT_EQ(look({1, 2, 3}, 4), V{});
  EXPECT_EQ(look({1, 2, 1}, 4, 3, 2), V{});
  EXPECT_EQ(look({1, 2, 1}, 4, 3, 1), (V{2, 1, 2, 1}));
  EXPECT_EQ(look({1}, 4), V{});
  EXPECT_EQ(look({1, 2, 1, 2}, 0), V{});
}

TEST(PromptLookup, TheLengthAdaptsToWhatPassed) {
  const PromptLookupParams p;
  LookupState st;
  std::vector<int32_t> d;
  std::vector<std::vector<double>> qs;
  std::vector<int32_t> seq = {1, 2, 3, 1, 2};
  lookup_draft(seq.data(), int(seq.size()), p, 4, 10, st, d, qs);
  EXPECT_EQ(d, (std::vector<int32_t>{3, 1, 2, 3}));  // the first round: K
  ASSERT_EQ(qs.size(), 4u);
  EXPECT_EQ(qs[1], (std::vector<double>{0, 1, 0, 0, 0, 0, 0, 0, 0, 0}));  // one-hot at the proposal
  // One accepted (3), then the target's 2 instead of 1: half as many next, two (the 3 2 after the latest 2).
  seq.insert(seq.end(), {3, 2});
  lookup_draft(seq.data(), int(seq.size()), p, 4, 10, st, d, qs);
  EXPECT_EQ(d, (std::vector<int32_t>{3, 2}));
  // Both passed, then the target's 3: twice as many (at most K, here 4).
  seq.insert(seq.end(), {3, 2, 3});
  lookup_draft(seq.data(), int(seq.size()), p, 4, 10, st, d, qs);
  EXPECT_EQ(d, (std::vector<int32_t>{2, 3, 2, 3}));
  // None of the four passed (the target's 1): half as many, two (the accepted count + 1 would be one).
  seq.push_back(1);
  lookup_draft(seq.data(), int(seq.size()), p, 4, 10, st, d, qs);
  EXPECT_EQ(d.size(), 2u);
  // Fixed length: always K; and an id past the sampled vocabulary ends the list.
  PromptLookupParams fixed;
  fixed.adaptive = false;
  LookupState fs;
  const std::vector<int32_t> big = {12, 1, 2, 12, 1, 2, 12, 1};
  lookup_draft(big.data(), int(big.size()), fixed, 4, 10, fs, d, qs);
  EXPECT_EQ(d, (std::vector<int32_t>{2}));  // 2 12 1 2 followed; 12 is not sampled
}

TEST(PromptLookup, SamplesFollowTheTargetDistribution) {
  // The proposals come from the sequence (the prompt and what was sampled), the target is a Markov chain: the
  // first five tokens after the prompt against their exact joint distribution.
  const int V = 4, L = 5;
  const int64_t n = 100000;
  const auto target = random_table(V, 11, 1.5f);
  const std::vector<int32_t> prompt = {1, 2, 3, 0, 1, 2, 0};
  for (int top_k : {0, 2}) {
    SamplingParams sp;
    sp.temperature = 1.0f;
    sp.top_k = top_k;
    const std::vector<double> exact = exact_joint(target, Sampler(sp), prompt.back(), L);
    std::vector<int64_t> counts(exact.size(), 0);
    MarkovDecoder t(target, 64);
    SpeculativeStats total;
    for (int64_t i = 0; i < n; i++) {
      sp.seed = uint64_t(i) + 1;
      std::vector<int32_t> got;
      GenerateLimits lim;
      lim.max_new = L;
      SpeculativeStats st;
      generate_prompt_lookup(t, Sampler(sp), prompt, lim, 3, PromptLookupParams{},
                             [&](int32_t x) { got.push_back(x); return true; }, &st);
      ASSERT_EQ(got.size(), size_t(L));
      size_t cell = 0;
      for (int32_t x : got) cell = cell * V + size_t(x);
      counts[cell]++;
      total.drafted += st.drafted, total.accepted += st.accepted;
    }
    const Chi2 x2 = chi2_of(exact, counts, n);
    std::printf("top-k %d: acceptance %.3f, chi2 %.1f (df %d)\n", top_k, total.acceptance_rate(), x2.stat, x2.df);
    EXPECT_GT(total.drafted, n);  // it did propose (the prompt holds every token)
    EXPECT_TRUE(chi2_passes(x2.stat, x2.df)) << "top-k " << top_k << ": chi2 " << x2.stat << " df " << x2.df;
  }
}

// ---- greedy: identical to plain decoding ----

std::string write_config(const std::string& name, const std::string& json) {
  const fs::path dir = fs::path(KILN_BINARY_DIR) / "test_speculative";
  fs::create_directories(dir);
  const fs::path p = dir / (name + ".json");
  std::ofstream(p) << json;
  return p.string();
}

struct Gen {
  std::vector<int32_t> tokens;
  FinishReason why;
};

Gen plain(IncrementalDecoder& dec, const std::vector<int32_t>& prompt, const GenerateLimits& lim) {
  SamplingParams sp;
  sp.temperature = 0;
  Sampler s(sp);
  Gen r;
  r.why = generate(dec, s, prompt, lim, [&](int32_t t) { r.tokens.push_back(t); return true; });
  return r;
}

Gen speculative(IncrementalDecoder& t, IncrementalDecoder& d, const std::vector<int32_t>& prompt,
                const GenerateLimits& lim, int K, SpeculativeStats* st = nullptr, double min_prob = 0) {
  SamplingParams sp;
  sp.temperature = 0;
  Sampler s(sp);
  Gen r;
  r.why = generate_speculative(t, d, s, prompt, lim, K, [&](int32_t x) { r.tokens.push_back(x); return true; }, st,
                               min_prob);
  return r;
}

Gen lookup(IncrementalDecoder& t, const std::vector<int32_t>& prompt, const GenerateLimits& lim, int K,
           SpeculativeStats* st = nullptr, bool adaptive = true) {
  SamplingParams sp;
  sp.temperature = 0;
  Gen r;
  PromptLookupParams lp;
  lp.adaptive = adaptive;
  r.why = generate_prompt_lookup(t, Sampler(sp), prompt, lim, K, lp,
                                 [&](int32_t x) { r.tokens.push_back(x); return true; }, st);
  return r;
}

TEST(Speculative, GreedyEqualsPlainGreedy) {
  const std::string gpt2 = write_config("gpt2", R"({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 96, "n_positions": 40})");
  const std::string gpt2_small = write_config("gpt2_small", R"({"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 96, "n_positions": 24})");
  const std::string llama = write_config("llama", R"({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 96,
      "max_position_embeddings": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
      "tie_word_embeddings": false})");
  ModelOptions mo;
  mo.with_grads = false;
  auto make = [&](const std::string& path, uint64_t seed) {
    auto m = make_model(load_model_config(path), mo);
    m->init_random(seed);
    // Larger weights than GPT-2's initialisation: outputs that vary with the context (not one token repeated).
    float* w = m->host_params();
    for (size_t i = 0; i < m->table().total; i++) w[i] *= 20.0f;
    m->params_changed();
    return m;
  };
  auto target_gpt2 = make(gpt2, 1), other_gpt2 = make(gpt2, 2), small = make(gpt2_small, 3), target_llama = make(llama, 4);
  struct Pair {
    const char* name;
    Model *target, *draft;
  };
  const Pair pairs[] = {{"gpt2, itself as draft", target_gpt2.get(), target_gpt2.get()},
                        {"gpt2, another gpt2", target_gpt2.get(), other_gpt2.get()},
                        {"gpt2, a smaller draft with a shorter context", target_gpt2.get(), small.get()},
                        {"llama, a gpt2 draft", target_llama.get(), small.get()}};
  const std::vector<std::vector<int32_t>> prompts = {{5}, {1, 2, 3, 4}, {90, 17, 33, 8, 61, 2, 2, 40, 11}};
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::Q8_0})
    for (const Pair& pr : pairs)
      for (const auto& prompt : prompts)
        for (int K : {1, 3, 5}) {
          SCOPED_TRACE(std::string(pr.name) + " " + weight_format_name(f) + " K" + std::to_string(K) + " prompt " +
                       std::to_string(prompt.size()));
          DecoderOptions d;
          d.weights = f;
          auto t = make_decoder(pr.target->config(), pr.target->host_params(), d);
          auto dr = make_decoder(pr.draft->config(), pr.draft->host_params(), d);
          GenerateLimits lim;
          lim.max_new = 100;  // past the 40-position context: both stop there
          const Gen a = plain(*t, prompt, lim);
          SpeculativeStats st;
          const Gen b = speculative(*t, *dr, prompt, lim, K, &st);
          ASSERT_EQ(a.why, FinishReason::Context);
          EXPECT_EQ(b.why, a.why);
          EXPECT_EQ(b.tokens, a.tokens);
          if (pr.target == pr.draft) EXPECT_EQ(st.accepted, st.drafted);  // its own draft: every proposal passes
          // Drafting that ends early when the draft is unsure (rounds of 0 .. K proposals): the same output.
          SpeculativeStats sm;
          const Gen m = speculative(*t, *dr, prompt, lim, K, &sm, 0.6);
          EXPECT_EQ(m.tokens, a.tokens);
          EXPECT_LE(sm.drafted, int64_t(sm.rounds) * K);
          // End-of-text inside a draft: stop at a token from the middle of the plain output.
          GenerateLimits le = lim;
          le.eot = a.tokens[a.tokens.size() / 2];
          const Gen c = plain(*t, prompt, le), e = speculative(*t, *dr, prompt, le, K);
          EXPECT_EQ(c.why, FinishReason::EndOfText);
          EXPECT_EQ(e.why, c.why);
          EXPECT_EQ(e.tokens, c.tokens);
          // A token budget that ends inside a round.
          GenerateLimits lb = lim;
          lb.max_new = 7;
          EXPECT_EQ(speculative(*t, *dr, prompt, lb, K).tokens, plain(*t, prompt, lb).tokens);
          // Prompt lookup (the draft model unused), the same three limits.
          if (&pr != &pairs[1] && &pr != &pairs[3]) continue;  // once per target
          SpeculativeStats sl;
          const Gen l = lookup(*t, prompt, lim, K, &sl);
          EXPECT_EQ(l.why, a.why);
          EXPECT_EQ(l.tokens, a.tokens);
          EXPECT_GT(sl.drafted, 0);
          EXPECT_EQ(lookup(*t, prompt, le, K).tokens, c.tokens);
          EXPECT_EQ(lookup(*t, prompt, lb, K).tokens, plain(*t, prompt, lb).tokens);
          EXPECT_EQ(lookup(*t, prompt, lim, K, nullptr, /*adaptive=*/false).tokens, a.tokens);
        }
}

TEST(Speculative, TruncateRollsTheCacheBack) {
  const std::string gpt2 = write_config("gpt2_t", R"({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 50, "n_positions": 32})");
  ModelOptions mo;
  mo.with_grads = false;
  auto m = make_model(load_model_config(gpt2), mo);
  m->init_random(9);
  auto dec = make_decoder(m->config(), m->host_params());
  const std::vector<int32_t> a = {1, 2, 3, 4, 5}, b = {1, 2, 3, 9, 8};
  dec->forward(a.data(), 5);
  dec->truncate(3);
  EXPECT_EQ(dec->length(), 3);
  dec->reset();
  const float* ref = dec->forward(b.data(), 5);
  const std::vector<float> want(ref, ref + 50);
  dec->reset();
  dec->forward(a.data(), 5);
  dec->truncate(3);
  const float* got = dec->forward(b.data() + 3, 2);
  EXPECT_TRUE(test::all_close(std::vector<float>(got, got + 50), want, 0, 1e-5));
  EXPECT_THROW(dec->truncate(6), Error);
  EXPECT_THROW(dec->truncate(-1), Error);
}

}  // namespace
