// MTP self-drafting (infer/mtp_decode.h). The decoder's draft over the kept part of a forward (after a
// rejection's roll-back) against the training forward's MTP logits; greedy self-drafted output equal to plain
// greedy output on deepseek_v3-style models with an MTP module (several prompts, f32 and q8_0 weights, a prompt
// longer than one prefill piece, at the context limit, end-of-text inside a round, a budget ending inside one);
// and sampling: on a small vocabulary, a Markov-chain "model" whose own draft is known exactly, 10^5 generations
// against the model's exact distribution of its first four tokens (χ² and a total-variation bound), at several
// draft mismatches.
#include <cmath>
#include <string>
#include <vector>

#include "chi2_test_util.h"
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

namespace {

ModelConfig deepseek_mtp(int max_pos, int V = 53) {
  const std::string json = R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
       "num_hidden_layers":2,"intermediate_size":36,"vocab_size":)" + std::to_string(V) +
                           R"(,"max_position_embeddings":)" + std::to_string(max_pos) + R"(,
       "rms_norm_eps":1e-6,"q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":16,
       "v_head_dim":16,"num_nextn_predict_layers":1,"hidden_act":"silu","tie_word_embeddings":false})";
  return parse_model_config(json, "deepseek_mtp/config.json");
}

// Random weights, scaled up so that the output varies with the context, with non-trivial norm gains.
std::unique_ptr<Model> model_of(const ModelConfig& cfg, uint64_t seed, float scale) {
  ModelOptions o;
  o.with_grads = false;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) {
      float& w = m->host_params()[s.offset + i];
      w = s.shape.ndim == 1 ? w + 0.3f * r.normal() : w * scale;
    }
  m->params_changed();
  return m;
}

// After a rejection the cache keeps the first m positions of a forward: the draft over them equals the training
// forward's MTP logits (module 1 sees h_i and the embedding of token i+1), in both latent decoding forms.
TEST(MTPDecode, DraftAfterRollBackEqualsTrainingForward) {
  const ModelConfig cfg = deepseek_mtp(32, 37);
  const int T = 12, V = cfg.vocab_size;
  auto m = model_of(cfg, 61, 1.0f);
  Rng r(62);
  std::vector<int32_t> t(T + 1), pos(T);
  for (int i = 0; i <= T; i++) t[size_t(i)] = int32_t(r.below(uint64_t(V)));
  for (int i = 0; i < T; i++) pos[size_t(i)] = i;
  m->plan(1, T);
  m->forward(t.data(), pos.data(), t.data() + 1, m->attention(1, T), 0.0f);
  const std::vector<float> mtp(m->logits(), m->logits() + size_t(T) * V);  // one module: its head runs last
  for (bool absorbed : {true, false}) {
    SCOPED_TRACE(absorbed ? "absorbed" : "plain");
    TransformerDecoder d(cfg, m->host_params(), 1, 32);
    d.set_latent_absorbed(absorbed);
    d.forward(t.data(), 5);
    d.draft(&t[5]);
    // A rejected guess: [t5, wrong], roll back to t5, draft over that one position with t6 as the next token.
    const int32_t wrong[2] = {t[5], int32_t((t[6] + 1) % V)};
    d.forward(wrong, 2, true);
    d.truncate(6);
    const float* l = d.draft(&t[6], 1);
    EXPECT_TRUE(test::all_close(l, &mtp[size_t(5) * V], size_t(V), 1e-5, 1e-5)) << "after a rejection";
    // An accepted guess: [t6, t7] kept, next t8.
    d.forward(&t[6], 2, true);
    l = d.draft(&t[8], 2);
    EXPECT_TRUE(test::all_close(l, &mtp[size_t(7) * V], size_t(V), 1e-5, 1e-5)) << "after an acceptance";
    // The draft cannot run over positions the cache no longer keeps.
    d.forward(&t[8], 2);
    d.truncate(9);
    EXPECT_THROW(d.draft(&t[9], 2), Error);
  }
}

struct Gen {
  std::vector<int32_t> tokens;
  FinishReason why;
};

Gen run(IncrementalDecoder& dec, const std::vector<int32_t>& prompt, const GenerateLimits& lim, bool mtp,
        SpeculativeStats* st = nullptr) {
  SamplingParams sp;
  sp.temperature = 0;
  Sampler s(sp);
  Gen g;
  auto on = [&](int32_t t) { g.tokens.push_back(t); return true; };
  g.why = mtp ? generate_self_draft(dec, s, prompt, lim, on, st) : generate(dec, s, prompt, lim, on);
  return g;
}

TEST(MTPDecode, GreedyEqualsPlainGreedy) {
  // max positions 300: the 270-token prompt is prefilled in two pieces (the draft follows each).
  const ModelConfig cfg = deepseek_mtp(300);
  const int V = cfg.vocab_size;
  Rng r(5);
  std::vector<int32_t> long_prompt(270);
  for (int32_t& x : long_prompt) x = int32_t(r.below(uint64_t(V)));
  const std::vector<std::vector<int32_t>> prompts = {{5}, {1, 2, 3, 4}, {50, 17, 33, 8, 41, 2, 2, 40, 11},
                                                     long_prompt};
  for (float scale : {4.0f}) {
    auto m = model_of(cfg, 71 + uint64_t(scale), scale);
    for (WeightFormat f : {WeightFormat::F32, WeightFormat::Q8_0})
      for (const auto& prompt : prompts) {
        SCOPED_TRACE(std::string(weight_format_name(f)) + " scale " + std::to_string(scale) + " prompt " +
                     std::to_string(prompt.size()));
        DecoderOptions d;
        d.weights = f;
        auto dec = make_decoder(cfg, m->host_params(), d);
        ASSERT_GT(dec->self_draft_chunk(), 1);
        GenerateLimits lim;
        lim.max_new = 400;  // past the context: both stop there
        lim.max_length = prompt.size() > 100 ? 0 : 48;
        const Gen a = run(*dec, prompt, lim, false);
        SpeculativeStats st;
        const Gen b = run(*dec, prompt, lim, true, &st);
        ASSERT_EQ(a.why, FinishReason::Context);
        EXPECT_EQ(b.why, a.why);
        EXPECT_EQ(b.tokens, a.tokens);
        EXPECT_GT(st.drafted, 0);
        EXPECT_EQ(int64_t(b.tokens.size()), 1 + st.rounds + st.accepted);  // the prefill's, one per round, each accepted guess
        // End-of-text inside a round: stop at tokens from the plain output (its first occurrence ends both).
        for (size_t at : {a.tokens.size() / 2, a.tokens.size() / 3 + 1}) {
          GenerateLimits le = lim;
          le.eot = a.tokens[at];
          const Gen c = run(*dec, prompt, le, false), e = run(*dec, prompt, le, true);
          EXPECT_EQ(c.why, FinishReason::EndOfText);
          EXPECT_EQ(e.why, c.why);
          EXPECT_EQ(e.tokens, c.tokens);
        }
        // Budgets that end inside a round, or leave room for no guess at all.
        for (int budget : {1, 2, 7, 8}) {
          GenerateLimits lb = lim;
          lb.max_new = budget;
          const Gen c = run(*dec, prompt, lb, false), e = run(*dec, prompt, lb, true);
          EXPECT_EQ(e.why, FinishReason::Length);
          EXPECT_EQ(e.tokens, c.tokens) << "budget " << budget;
        }
      }
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
  EXPECT_EQ(dec->self_draft_chunk(), 0);
  GenerateLimits lim;
  EXPECT_THROW(run(*dec, {1, 2}, lim, true), Error);
}

// ---- sampling: exactly the model's distribution ----

// A "model" whose next-token logits depend only on the last token (table[prev]), with a self-draft whose guess
// of the token after `next` is draft[next]. It checks the self_draft() contract: a forward of at most 4
// positions before it, m of them still cached.
class MarkovMTP final : public IncrementalDecoder {
 public:
  MarkovMTP(std::vector<std::vector<float>> table, std::vector<std::vector<float>> draft, int max_pos)
      : table_(std::move(table)), draft_(std::move(draft)) {
    cfg_.vocab_size = int(table_.size());
    cfg_.max_positions = max_pos;
  }
  const float* forward(const int32_t* tokens, int n, bool all_logits) override {
    KILN_CHECK(length() + n <= cfg_.max_positions, "markov: overflow");
    start_ = length(), n_ = n;
    out_.clear();
    for (int i = 0; i < n; i++) {
      hist_.push_back(tokens[i]);
      const auto& row = table_[size_t(tokens[i])];
      if (all_logits || i == n - 1) out_.insert(out_.end(), row.begin(), row.end());
    }
    return out_.data();
  }
  int self_draft_chunk() const override { return 4; }
  const float* self_draft(const int32_t* next, int m) override {
    KILN_CHECK(n_ > 0 && n_ <= 4 && m >= 1 && m <= n_ && start_ + m <= length(), "markov: draft out of turn");
    n_ = 0;  // once per forward
    return draft_[size_t(*next)].data();
  }
  int length() const override { return int(hist_.size()); }
  int max_positions() const override { return cfg_.max_positions; }
  int batch() const override { return 1; }
  void reset() override { hist_.clear(), n_ = 0; }
  void truncate(int length) override {
    KILN_CHECK(length >= 0 && length <= this->length(), "markov: bad truncate");
    hist_.resize(size_t(length));
  }
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return 0; }

 private:
  std::vector<std::vector<float>> table_, draft_;
  std::vector<int32_t> hist_;
  std::vector<float> out_;
  int start_ = 0, n_ = 0;
  ModelConfig cfg_;
};

TEST(MTPDecode, SamplesFollowTheModelDistribution) {
  const int V = 4, L = 4;  // the first four tokens: 256 cells
  const int64_t n = 100000;
  const auto table = random_table(V, 1, 1.5f);
  struct Case {
    const char* name;
    std::vector<std::vector<float>> draft;
    int top_k;
    float temperature;
  };
  std::vector<Case> cases = {
      {"draft = model", table, 0, 1.0f},
      {"mild mismatch", random_table(V, 2, 0.5f), 0, 1.0f},
      {"strong mismatch, temperature 0.7", random_table(V, 3, 3.0f), 0, 0.7f},
      {"top-k 2 (disjoint supports)", random_table(V, 4, 2.0f), 2, 1.0f},
  };
  for (size_t i = 0; i < table.size(); i++)  // mild mismatch: the model plus noise
    for (size_t j = 0; j < table[i].size(); j++) cases[1].draft[i][j] += table[i][j];
  for (const Case& c : cases) {
    SamplingParams sp;
    sp.temperature = c.temperature;
    sp.top_k = c.top_k;
    const std::vector<double> exact = exact_joint(table, Sampler(sp), 0, L);
    std::vector<int64_t> counts(exact.size(), 0);
    MarkovMTP dec(table, c.draft, 64);
    SpeculativeStats total;
    for (int64_t i = 0; i < n; i++) {
      sp.seed = uint64_t(i) + 1 + 1000000 * uint64_t(&c - cases.data());  // each case its own seeds
      Sampler s(sp);
      std::vector<int32_t> got;
      GenerateLimits lim;
      lim.max_new = L;
      SpeculativeStats st;
      generate_self_draft(dec, s, {0}, lim, [&](int32_t x) { got.push_back(x); return true; }, &st);
      ASSERT_EQ(got.size(), size_t(L));
      size_t cell = 0;
      for (int32_t x : got) cell = cell * V + size_t(x);
      counts[cell]++;
      total.drafted += st.drafted, total.accepted += st.accepted;
    }
    const test::Chi2 x2 = test::chi2_of(exact, counts, n);
    double tv = 0, expect_tv = 0;
    for (size_t i = 0; i < exact.size(); i++) {
      tv += 0.5 * std::fabs(double(counts[i]) / n - exact[i]);
      expect_tv += 0.5 * std::sqrt(2.0 * exact[i] * (1 - exact[i]) / (M_PI * n));  // E|binomial/n − p|
    }
    std::printf("%s: acceptance %.3f, chi2 %.1f (df %d), TV %.4f (sampling noise alone: %.4f)\n", c.name,
                total.acceptance_rate(), x2.stat, x2.df, tv, expect_tv);
    EXPECT_TRUE(test::chi2_passes(x2.stat, x2.df)) << c.name << ": chi2 " << x2.stat << " df " << x2.df;
    // The stated bound: total variation within 1.5x what 10^5 exact draws give on average. (Each χ² check
    // fails by chance with probability 0.01; 2·10^6 draws of every case give χ²/df of 0.5 to 1.1.)
    EXPECT_LT(tv, 1.5 * expect_tv) << c.name;
    if (c.draft == table) {
      EXPECT_EQ(total.accepted, total.drafted);  // the same filtered distribution: min(1, p/q) = 1
    }
  }
}

}  // namespace
