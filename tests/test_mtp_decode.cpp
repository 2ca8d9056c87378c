// MTP self-drafting (infer/mtp_decode.h) with chained modules. The decoder's drafts 1..3 (module k reading
// module k−1's hidden state and draft k−1) against the training forward's depth-k MTP logits, after a prompt,
// after a rejection (module entries that read a rejected draft run again), after an acceptance and after rounds
// with fewer drafts; greedy self-drafted output equal to plain greedy output for 1, 2 and 3 drafts per round on
// deepseek_v3-style models with three MTP modules (several prompts, f32 and q8_0 weights, a prompt longer than
// one prefill piece, at the context limit, end-of-text inside a round, budgets ending inside one); and sampling:
// on a small vocabulary, a Markov-chain "model" whose own drafts are known exactly, 10^5 generations against the
// model's exact distribution of its first five tokens (χ² and a total-variation bound), at several draft
// mismatches and draft counts.
#include <cmath>
#include <string>
#include <vector>

#include "chi2_test_util.h"
#include "mtp_test_util.h"
#include "core/error.h"
#include "core/rng.h"
#include "infer/generate.h"
#include "infer/mtp_decode.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"
#include "test_util.h"

using namespace kiln;

using kiln::test::exact_joint;
using kiln::test::random_table;
using kiln::test::deepseek_mtp;
using kiln::test::depth_logits;
using kiln::test::mtp_model;

namespace {

TEST(MTPDecode, ChainedDraftsEqualTrainingForward) {
  const ModelConfig cfg = deepseek_mtp(32, 37, 3);
  const int T = 14, V = cfg.vocab_size;
  auto m = mtp_model(cfg, 61, 1.0f);
  Rng r(62);
  std::vector<int32_t> t(T + 1);
  for (int32_t& x : t) x = int32_t(r.below(uint64_t(V)));
  std::vector<std::vector<float>> ref;
  for (int k = 1; k <= 3; k++) ref.push_back(depth_logits(cfg, *m, k, t, T));
  for (bool absorbed : {true, false}) {
    SCOPED_TRACE(absorbed ? "absorbed" : "plain");
    TransformerDecoder d(cfg, m->host_params(), 1, 32);
    d.set_latent_absorbed(absorbed);
    ASSERT_EQ(d.self_draft_depth(), 3);
    // Drafts k = 1 .. K of a round at cache length L, fed the true tokens: depth k's logits at position L−1.
    int compared = 0;
    auto round = [&](int K, const std::vector<int32_t>& inputs, const char* what) {
      const int L = d.length();
      for (int k = 1; k <= K; k++) {
        const float* l = d.self_draft(k, inputs[size_t(k - 1)]);
        if (inputs[size_t(k - 1)] == t[size_t(L + k - 1)] && ++compared)
          EXPECT_TRUE(test::all_close(l, &ref[size_t(k - 1)][size_t(L - 1) * V], size_t(V), 1e-4, 1e-4))
              << what << ": draft " << k << " at length " << L;
      }
    };
    d.forward(t.data(), 5);
    round(3, {t[5], t[6], t[7]}, "after the prompt");
    // Wrong drafts 1 and 2: modules 2 and 3 read them at position 4.
    const int32_t w1 = (t[6] + 1) % V, w2 = (t[7] + 1) % V;
    round(3, {t[5], w1, w2}, "wrong drafts");
    // Verification keeps t5 and t6 (as if draft 1 had been right and draft 2 wrong): those module entries run
    // again with the tokens now there.
    const int32_t feed[4] = {t[5], t[6], w2, 0};
    d.forward(feed, 4, true);
    d.truncate(7);
    round(3, {t[7], t[8], t[9]}, "after a rejection");
    // Everything accepted.
    d.forward(&t[7], 3, true);
    round(3, {t[10], t[11], t[12]}, "after an acceptance");
    // A round of one draft, then modules 2 and 3 catch up over two positions.
    d.forward(&t[10], 1);
    round(1, {t[11]}, "one draft");
    d.forward(&t[11], 1);
    round(2, {t[12], t[13]}, "catching up");
    EXPECT_EQ(compared, 13);
    // Contract: draft k follows drafts 1 .. k−1 of the same round; no draft past the modules.
    EXPECT_THROW(d.self_draft(4, t[0]), Error);
    d.forward(&t[12], 1);
    EXPECT_THROW(d.self_draft(2, t[0]), Error);
  }
}

struct MtpGen {
  std::vector<int32_t> tokens;
  FinishReason why;
};

// K: drafts per round with MTP self-drafting, 0 for plain decoding.
MtpGen run(IncrementalDecoder& dec, const std::vector<int32_t>& prompt, const GenerateLimits& lim, int K,
        SpeculativeStats* st = nullptr) {
  SamplingParams sp;
  sp.temperature = 0;
  Sampler s(sp);
  MtpGen g;
  auto on = [&](int32_t t) { g.tokens.push_back(t); return true; };
  g.why = K ? generate_self_draft(dec, s, prompt, lim, K, on, st) : generate(dec, s, prompt, lim, on);
  return g;
}

TEST(MTPDecode, GreedyEqualsPlainGreedy) {
  // max positions 300: the 270-token prompt is prefilled in two pieces (the modules catch up over both).
  const ModelConfig cfg = deepseek_mtp(300);
  const int V = cfg.vocab_size;
  Rng r(5);
  std::vector<int32_t> long_prompt(270);
  for (int32_t& x : long_prompt) x = int32_t(r.below(uint64_t(V)));
  const std::vector<std::vector<int32_t>> prompts = {{5}, {1, 2, 3, 4}, {50, 17, 33, 8, 41, 2, 2, 40, 11},
                                                     long_prompt};
  auto m = mtp_model(cfg, 75, 4.0f);
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::Q8_0})
    for (const auto& prompt : prompts) {
      DecoderOptions d;
      d.weights = f;
      auto dec = make_decoder(cfg, m->host_params(), d);
      ASSERT_EQ(dec->self_draft_depth(), 3);
      GenerateLimits lim;
      lim.max_new = 400;  // past the context: both stop there
      lim.max_length = prompt.size() > 100 ? 0 : 48;
      const MtpGen a = run(*dec, prompt, lim, 0);
      ASSERT_EQ(a.why, FinishReason::Context);
      for (int K = 1; K <= 3; K++) {
        if (f == WeightFormat::Q8_0 && K != 3) continue;  // the format changes the products, not the loop
        SCOPED_TRACE(std::string(weight_format_name(f)) + " prompt " + std::to_string(prompt.size()) + " K " +
                     std::to_string(K));
        SpeculativeStats st;
        const MtpGen b = run(*dec, prompt, lim, K, &st);
        EXPECT_EQ(b.why, a.why);
        EXPECT_EQ(b.tokens, a.tokens);
        EXPECT_GT(st.drafted, 0);
        // The prefill's token, one per round, each accepted draft.
        EXPECT_EQ(int64_t(b.tokens.size()), 1 + st.rounds + st.accepted);
        ASSERT_EQ(st.accepted_at.size(), size_t(K));
        int64_t sum = 0;
        for (int j = 0; j < K; j++) {
          sum += st.accepted_at[size_t(j)];
          EXPECT_LE(st.accepted_at[size_t(j)], st.drafted_at[size_t(j)]);
          if (j) EXPECT_LE(st.accepted_at[size_t(j)], st.accepted_at[size_t(j - 1)]);  // a prefix passes
        }
        EXPECT_EQ(sum, st.accepted);
        // End-of-text inside a round: stop at tokens from the plain output (its first occurrence ends both).
        for (size_t at : {a.tokens.size() / 2, a.tokens.size() / 3 + 1}) {
          GenerateLimits le = lim;
          le.eot = a.tokens[at];
          const MtpGen c = run(*dec, prompt, le, 0), e = run(*dec, prompt, le, K);
          EXPECT_EQ(c.why, FinishReason::EndOfText);
          EXPECT_EQ(e.why, c.why);
          EXPECT_EQ(e.tokens, c.tokens);
        }
        // Budgets that end inside a round, or leave room for no draft at all.
        for (int budget : {1, 2, 3, 7, 8}) {
          GenerateLimits lb = lim;
          lb.max_new = budget;
          const MtpGen c = run(*dec, prompt, lb, 0), e = run(*dec, prompt, lb, K);
          EXPECT_EQ(e.why, FinishReason::Length);
          EXPECT_EQ(e.tokens, c.tokens) << "budget " << budget;
        }
      }
    }
  // More drafts than modules: one line naming the flag.
  auto dec = make_decoder(cfg, m->host_params());
  GenerateLimits lim;
  try {
    run(*dec, {1, 2}, lim, 4);
    ADD_FAILURE() << "4 drafts with 3 modules ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--draft-tokens 4: the model has 3 multi-token-prediction modules"),
              std::string::npos)
        << e.what();
  }
}

TEST(MTPDecode, ModelWithoutModulesIsRefused) {
  const ModelConfig cfg = parse_model_config(
      R"({"n_layer": 1, "n_head": 2, "n_embd": 16, "vocab_size": 20, "n_positions": 16})", "gpt2/config.json");
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(1);
  auto dec = make_decoder(cfg, m->host_params());
  EXPECT_EQ(dec->self_draft_depth(), 0);
  GenerateLimits lim;
  EXPECT_THROW(run(*dec, {1, 2}, lim, 1), Error);
}

// ---- sampling: exactly the model's distribution ----

// A "model" whose next-token logits depend only on the last token (table[prev]), with three self-draft modules:
// module k's guess of the token after its input `token` is draft[k−1][token]. It checks the self_draft()
// contract: drafts 1 .. k of a round in order, no forward between them.
class MarkovMTP final : public IncrementalDecoder {
 public:
  MarkovMTP(std::vector<std::vector<float>> table, std::vector<std::vector<std::vector<float>>> draft, int max_pos)
      : table_(std::move(table)), draft_(std::move(draft)) {
    cfg_.vocab_size = int(table_.size());
    cfg_.max_positions = max_pos;
  }
  const float* forward(const int32_t* tokens, int n, bool all_logits) override {
    KILN_CHECK(length() + n <= cfg_.max_positions, "markov: overflow");
    next_k_ = 1;  // a new round may start
    out_.clear();
    for (int i = 0; i < n; i++) {
      hist_.push_back(tokens[i]);
      const auto& row = table_[size_t(tokens[i])];
      if (all_logits || i == n - 1) out_.insert(out_.end(), row.begin(), row.end());
    }
    return out_.data();
  }
  int self_draft_depth() const override { return int(draft_.size()); }
  const float* self_draft(int k, int32_t token) override {
    KILN_CHECK(k >= 1 && k <= self_draft_depth() && (k == 1 || k == next_k_) && length() > 0,
               "markov: draft out of turn");
    next_k_ = k + 1;
    return draft_[size_t(k - 1)][size_t(token)].data();
  }
  int length() const override { return int(hist_.size()); }
  int max_positions() const override { return cfg_.max_positions; }
  int batch() const override { return 1; }
  void reset() override { hist_.clear(), next_k_ = 1; }
  void truncate(int length) override {
    KILN_CHECK(length >= 0 && length <= this->length(), "markov: bad truncate");
    hist_.resize(size_t(length));
    next_k_ = 1;
  }
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return 0; }

 private:
  std::vector<std::vector<float>> table_;
  std::vector<std::vector<std::vector<float>>> draft_;  // [module][token][V]
  std::vector<int32_t> hist_;
  std::vector<float> out_;
  int next_k_ = 1;
  ModelConfig cfg_;
};

TEST(MTPDecode, SamplesFollowTheModelDistribution) {
  const int V = 4, L = 5;  // the first five tokens (the prefill's, then a round of up to three drafts): 1024 cells
  const int64_t n = 100000;
  const auto table = random_table(V, 1, 1.5f);
  using Drafts = std::vector<std::vector<std::vector<float>>>;
  struct Case {
    const char* name;
    Drafts draft;  // one table per module
    int K;         // drafts per round
    int top_k;
    float temperature;
  };
  auto noisy = [&](uint64_t seed) {  // the model plus noise
    auto d = random_table(V, seed, 0.5f);
    for (size_t i = 0; i < table.size(); i++)
      for (size_t j = 0; j < table[i].size(); j++) d[i][j] += table[i][j];
    return d;
  };
  const std::vector<Case> cases = {
      {"drafts = model, 3 per round", {table, table, table}, 3, 0, 1.0f},
      {"mild mismatch, 3 per round", {noisy(2), noisy(5), noisy(6)}, 3, 0, 1.0f},
      {"strong mismatch, 2 per round, temperature 0.7", {random_table(V, 3, 3.0f), random_table(V, 7, 3.0f), table},
       2, 0, 0.7f},
      {"top-k 2 (disjoint supports), 3 per round",
       {random_table(V, 4, 2.0f), random_table(V, 8, 2.0f), random_table(V, 9, 2.0f)}, 3, 2, 1.0f},
      {"mild mismatch, 1 per round", {noisy(10), table, table}, 1, 0, 1.0f},
  };
  for (const Case& c : cases) {
    SamplingParams sp;
    sp.temperature = c.temperature;
    sp.top_k = c.top_k;
    const std::vector<double> exact = exact_joint(table, Sampler(sp), 0, L);
    std::vector<int64_t> counts(exact.size(), 0);
    MarkovMTP dec(table, c.draft, 64);
    SpeculativeStats total;
    total.accepted_at.assign(size_t(c.K), 0);
    total.drafted_at.assign(size_t(c.K), 0);
    for (int64_t i = 0; i < n; i++) {
      sp.seed = uint64_t(i) + 1 + 1000000 * uint64_t(&c - cases.data());  // each case its own seeds
      Sampler s(sp);
      std::vector<int32_t> got;
      GenerateLimits lim;
      lim.max_new = L;
      SpeculativeStats st;
      generate_self_draft(dec, s, {0}, lim, c.K, [&](int32_t x) { got.push_back(x); return true; }, &st);
      ASSERT_EQ(got.size(), size_t(L));
      size_t cell = 0;
      for (int32_t x : got) cell = cell * V + size_t(x);
      counts[cell]++;
      total.drafted += st.drafted, total.accepted += st.accepted;
      for (int j = 0; j < c.K; j++)
        total.drafted_at[size_t(j)] += st.drafted_at[size_t(j)], total.accepted_at[size_t(j)] += st.accepted_at[size_t(j)];
    }
    const test::Chi2 x2 = test::chi2_of(exact, counts, n);
    double tv = 0, expect_tv = 0;
    for (size_t i = 0; i < exact.size(); i++) {
      tv += 0.5 * std::fabs(double(counts[i]) / n - exact[i]);
      expect_tv += 0.5 * std::sqrt(2.0 * exact[i] * (1 - exact[i]) / (M_PI * n));  // E|binomial/n − p|
    }
    std::printf("%s: acceptance %.3f (per position:", c.name, total.acceptance_rate());
    for (int j = 0; j < c.K; j++)
      std::printf(" %.3f", double(total.accepted_at[size_t(j)]) / double(std::max<int64_t>(1, total.drafted_at[size_t(j)])));
    std::printf("), chi2 %.1f (df %d), TV %.4f (sampling noise alone: %.4f)\n", x2.stat, x2.df, tv, expect_tv);
    EXPECT_TRUE(test::chi2_passes(x2.stat, x2.df)) << c.name << ": chi2 " << x2.stat << " df " << x2.df;
    // The stated bound: total variation within 1.5x what 10^5 exact draws give on average. (Each χ² check
    // fails by chance with probability 0.01.)
    EXPECT_LT(tv, 1.5 * expect_tv) << c.name;
    if (c.draft[0] == table && c.draft[1] == table && c.draft[2] == table) {
      EXPECT_EQ(total.accepted, total.drafted);  // the same filtered distribution: min(1, p/q) = 1
    }
  }
}

}  // namespace
