// Medusa (nn/medusa.h, infer/medusa.h, models/medusa_checkpoint.h, train/medusa_trainer.h): the heads' gradients
// against central finite differences; the per-head targets by hand; tree attention, where every node's logits
// must equal those of its path decoded alone by plain causal decoding, and the accepted path's compacted cache
// must continue like a plain cache; greedy Medusa output identical to plain greedy (several models, prompts and
// trees, at the context limit, with end-of-text inside a tree, f32 and bf16 weights); typical acceptance at its
// extremes; the checkpoint round trip and bad input.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "infer/generate.h"
#include "infer/medusa.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "nn/medusa.h"
#include "decode_test_util.h"
#include "test_util.h"
#include "train/medusa_trainer.h"

using namespace kiln;
namespace fs = std::filesystem;

namespace {

std::vector<float> gaussian(size_t n, uint64_t seed, float scale) {
  Rng r(seed);
  std::vector<float> v(n);
  for (float& x : v) x = float(r.normal()) * scale;
  return v;
}

std::string write_config(const std::string& name, const std::string& json) {
  const fs::path dir = fs::path(KILN_BINARY_DIR) / "test_medusa";
  fs::create_directories(dir);
  const fs::path p = dir / (name + ".json");
  std::ofstream(p) << json;
  return p.string();
}

// The loss the heads train on, in double from float logits: Σ_k λ_k · Σ_rows CE_k.
double heads_loss(const nn::MedusaHeads& heads, const float* h, int64_t N, const std::vector<int32_t>& tk,
                  const std::vector<double>& lambda) {
  const nn::MedusaShape& s = heads.shape;
  std::vector<float> logits(size_t(s.K * N * s.V));
  nn::MedusaActivations a;
  heads.forward(h, N, logits.data(), a);
  double L = 0;
  for (int k = 0; k < s.K; k++)
    L += lambda[size_t(k)] * nn::softmax_ce(logits.data() + k * N * s.V, tk.data() + k * N, N, s.V, 0, nullptr).loss_sum;
  return L;
}

TEST(Medusa, HeadGradientsMatchFiniteDifferences) {
  nn::MedusaShape s;
  s.K = 2, s.C = 6, s.V = 9;
  const int64_t N = 4;
  std::vector<float> params = gaussian(size_t(s.total()), 1, 0.5f), grads(size_t(s.total()), 0.0f);
  std::vector<float> h = gaussian(size_t(N * s.C), 2, 1.0f), dh(size_t(N * s.C), 0.0f);
  const std::vector<int32_t> tk = {3, -1, 8, 0, 1, 2, -1, 5};  // [K, N]; -1: no loss
  const std::vector<double> lambda = {0.8, 0.64};
  nn::MedusaHeads heads{s, params.data(), grads.data()};
  // Analytic: dlogits from softmax_ce scaled by λ_k, then backward.
  std::vector<float> logits(size_t(s.K * N * s.V));
  nn::MedusaActivations a;
  heads.forward(h.data(), N, logits.data(), a);
  for (int k = 0; k < s.K; k++)
    nn::softmax_ce(logits.data() + k * N * s.V, tk.data() + k * N, N, s.V, float(lambda[size_t(k)]),
                   logits.data() + k * N * s.V);
  heads.backward(h.data(), N, logits.data(), a, dh.data());
  const double eps = 1e-2;
  auto fd = [&](float* x) {
    const float keep = *x;
    *x = float(keep + eps);
    const double up = heads_loss(heads, h.data(), N, tk, lambda);
    *x = float(keep - eps);
    const double down = heads_loss(heads, h.data(), N, tk, lambda);
    *x = keep;
    return (up - down) / (2 * eps);
  };
  for (size_t i = 0; i < params.size(); i++)
    EXPECT_NEAR(grads[i], fd(&params[i]), 2e-3 + 2e-3 * std::fabs(grads[i])) << "parameter " << i;
  for (size_t i = 0; i < h.size(); i++) EXPECT_NEAR(dh[i], fd(&h[i]), 2e-3 + 2e-3 * std::fabs(dh[i])) << "h " << i;
}

TEST(Medusa, FreshHeadsPredictWhatTheLMHeadDoes) {
  nn::MedusaShape s;
  s.K = 3, s.C = 5, s.V = 7;
  std::vector<float> params(size_t(s.total())), lm = gaussian(size_t(s.V * s.C), 3, 1.0f), h = gaussian(5, 4, 1.0f);
  nn::MedusaHeads::init_from_lm_head(s, params.data(), lm.data());
  nn::MedusaHeads heads{s, params.data(), nullptr};
  std::vector<float> out(size_t(s.V)), u(5), z(5);
  for (int k = 0; k < s.K; k++) {
    heads.forward_head(k, h.data(), 1, out.data(), u.data(), z.data());
    for (int v = 0; v < s.V; v++) {
      double want = 0;  // W = 0, b = 0: u = h + SiLU(0) = h
      for (int c = 0; c < s.C; c++) want += double(lm[size_t(v * s.C + c)]) * h[size_t(c)];
      EXPECT_NEAR(out[size_t(v)], want, 1e-5);
    }
  }
}

TEST(Medusa, TargetsByHand) {
  // Two rows of 3 (positions restart), targets = the next token.
  const std::vector<int32_t> targets = {11, 12, -1, 21, 22, 23}, pos = {0, 1, 2, 0, 1, 2};
  std::vector<int32_t> out(12);
  medusa_targets(targets.data(), pos.data(), 6, 2, out.data());
  const std::vector<int32_t> want = {12, -1, -1, 22, 23, -1,   // head 1: two places after
                                     -1, -1, -1, 23, -1, -1};  // head 2: three places after
  EXPECT_EQ(out, want);
}

struct Models {
  std::unique_ptr<Model> gpt2, gpt2_big, llama;
};

std::unique_ptr<Model> make(const std::string& path, uint64_t seed, float scale) {
  ModelOptions mo;
  mo.with_grads = false;
  auto m = make_model(load_model_config(path), mo);
  m->init_random(seed);
  float* w = m->host_params();
  for (size_t i = 0; i < m->table().total; i++) w[i] *= scale;
  m->params_changed();
  return m;
}

Models models() {
  const std::string gpt2 = write_config("gpt2", R"({"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 96, "n_positions": 40})");
  const std::string llama = write_config("llama", R"({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 96,
      "max_position_embeddings": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
      "tie_word_embeddings": false})");
  Models m;
  m.gpt2 = make(gpt2, 1, 1.0f);       // GPT-2's initialisation: outputs that repeat (the heads' guesses pass)
  m.gpt2_big = make(gpt2, 2, 20.0f);  // larger weights: outputs that vary with the context
  m.llama = make(llama, 3, 20.0f);
  return m;
}

TEST(Medusa, TreeNodeLogitsEqualTheirPathDecodedAlone) {
  Models ms = models();
  // Parents of nodes 1..9 (node 0 the root), depths follow.
  const std::vector<int> parent = {-1, 0, 0, 0, 1, 1, 2, 4, 4, 7};
  const int n = int(parent.size());
  const auto [depth, mask] = test::tree_from_parents(parent);
  const std::vector<int32_t> tokens = {7, 3, 50, 3, 9, 9, 70, 1, 2, 95};
  const std::vector<int32_t> prompt = {4, 8, 15, 16, 23};
  for (Model* m : {ms.gpt2.get(), ms.gpt2_big.get(), ms.llama.get()})
    for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16}) {
      SCOPED_TRACE(m->config().family + " " + weight_format_name(f));
      const int V = m->config().vocab_size, C = m->config().d_model;
      DecoderOptions d;
      d.weights = f;
      auto dec = make_decoder(m->config(), m->host_params(), d);
      dec->forward(prompt.data(), int(prompt.size()));
      const float* tl = dec->forward_tree(tokens.data(), n, depth.data(), mask.data());
      const std::vector<float> tree(tl, tl + size_t(n) * V), hid(dec->hidden(), dec->hidden() + size_t(n) * C);
      EXPECT_EQ(dec->length(), int(prompt.size()) + n);
      for (int i = 0; i < n; i++) {
        std::vector<int32_t> path;  // the prompt, then the node's ancestors and itself
        for (int j = i; j >= 0; j = parent[size_t(j)]) path.insert(path.begin(), tokens[size_t(j)]);
        path.insert(path.begin(), prompt.begin(), prompt.end());
        auto alone = make_decoder(m->config(), m->host_params(), d);
        const float* want = alone->forward(path.data(), int(path.size()));
        EXPECT_TRUE(test::all_close(tree.data() + size_t(i) * V, want, size_t(V), 1e-4, 1e-4)) << "node " << i;
        EXPECT_TRUE(test::all_close(hid.data() + size_t(i) * C, alone->hidden(), size_t(C), 1e-4, 1e-4)) << "node " << i;
      }
      // Keep the path 0 -> 1 -> 4 -> 7 and continue: the compacted cache decodes like a plain one.
      const std::vector<int32_t> keep = {0, 1, 4, 7};
      dec->keep_path(int(prompt.size()), keep.data(), int(keep.size()));
      EXPECT_EQ(dec->length(), int(prompt.size()) + 4);
      const int32_t next = 42;
      const float* g = dec->forward(&next, 1);
      const std::vector<float> got(g, g + V);
      std::vector<int32_t> seq = prompt;
      for (int32_t t : {7, 3, 9, 1, 42}) seq.push_back(t);
      auto plain = make_decoder(m->config(), m->host_params(), d);
      EXPECT_TRUE(test::all_close(got.data(), plain->forward(seq.data(), int(seq.size())), size_t(V), 1e-4, 1e-4));
    }
  EXPECT_THROW(make_decoder(ms.gpt2->config(), ms.gpt2->host_params())->forward_tree(nullptr, 1, nullptr, nullptr),
               Error);  // an empty cache
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

Gen medusa(IncrementalDecoder& dec, const nn::MedusaHeads& heads, const std::vector<int32_t>& prompt,
           const GenerateLimits& lim, const MedusaParams& mp, MedusaStats* st = nullptr, float temperature = 0) {
  SamplingParams sp;
  sp.temperature = temperature;
  sp.seed = 5;
  Sampler s(sp);
  Gen r;
  r.why = generate_medusa(dec, heads, s, prompt, lim, mp, [&](int32_t t) { r.tokens.push_back(t); return true; }, st);
  return r;
}

// Heads on a model: W and b small random, H the LM head plus noise (so their guesses are sometimes right).
std::vector<float> heads_for(const Model& m, int K, uint64_t seed, float noise) {
  const nn::MedusaShape s = medusa_shape(m.config(), K);
  std::vector<float> p(size_t(s.total()));
  nn::MedusaHeads::init_from_lm_head(s, p.data(), lm_head_matrix(m.config(), m.table(), const_cast<Model&>(m).host_params()));
  const std::vector<float> e = gaussian(p.size(), seed, noise);
  for (size_t i = 0; i < p.size(); i++) p[i] += e[i];
  return p;
}

TEST(Medusa, GreedyEqualsPlainGreedy) {
  Models ms = models();
  const std::vector<std::vector<int32_t>> prompts = {{5}, {90, 17, 33, 8, 61, 2, 2, 40, 11}};
  // The default tree, and a chain deeper than the heads (its last node is dropped).
  const MedusaTree trees[] = {MedusaTree::default_tree(), MedusaTree::parse("0;0,0;0,0,0;0,0,0,0;0,0,0,0,0")};
  int64_t accepted = 0;
  for (Model* m : {ms.gpt2.get(), ms.gpt2_big.get(), ms.llama.get()})
    for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16})
      for (const MedusaTree& tree : trees)
        for (const auto& prompt : prompts) {
          SCOPED_TRACE(m->config().family + " " + weight_format_name(f) + " tree " + tree.str() + " prompt " +
                       std::to_string(prompt.size()));
          const std::vector<float> hp = heads_for(*m, 4, 7, 0.01f);
          nn::MedusaHeads heads{medusa_shape(m->config(), 4), hp.data(), nullptr};
          heads.set_weight_format(f);
          DecoderOptions d;
          d.weights = f;
          auto dec = make_decoder(m->config(), m->host_params(), d);
          MedusaParams mp;
          mp.tree = tree;
          GenerateLimits lim;
          lim.max_new = 100;  // past the 40-position context: both stop there
          const Gen a = plain(*dec, prompt, lim);
          MedusaStats st;
          const Gen b = medusa(*dec, heads, prompt, lim, mp, &st);
          ASSERT_EQ(a.why, FinishReason::Context);
          EXPECT_EQ(b.why, a.why);
          EXPECT_EQ(b.tokens, a.tokens);
          accepted += st.accepted;
          // End-of-text inside a tree: stop at a token from the middle of the plain output.
          GenerateLimits le = lim;
          le.eot = a.tokens[a.tokens.size() / 2];
          const Gen c = plain(*dec, prompt, le), e = medusa(*dec, heads, prompt, le, mp);
          EXPECT_EQ(c.why, FinishReason::EndOfText);
          EXPECT_EQ(e.why, c.why);
          EXPECT_EQ(e.tokens, c.tokens);
          // A token budget that ends inside a round.
          GenerateLimits lb = lim;
          lb.max_new = 7;
          EXPECT_EQ(medusa(*dec, heads, prompt, lb, mp).tokens, plain(*dec, prompt, lb).tokens);
        }
  EXPECT_GT(accepted, 100);  // paths past the root were kept (the compaction ran), not only roots
}

TEST(Medusa, TypicalAcceptanceAtItsExtremes) {
  Models ms = models();
  Model& m = *ms.gpt2;
  const std::vector<float> hp = heads_for(m, 3, 8, 0.01f);
  const nn::MedusaHeads heads{medusa_shape(m.config(), 3), hp.data(), nullptr};
  auto dec = make_decoder(m.config(), m.host_params());
  const std::vector<int32_t> prompt = {3, 1, 4};
  GenerateLimits lim;
  lim.max_new = 30;
  MedusaParams mp;
  mp.typical = true;
  mp.tree = MedusaTree::parse("0;0,0;0,0,0");
  // A bar above 1: nothing passes, every round yields its root alone.
  mp.typical_threshold = 1e9f, mp.typical_alpha = 1e9f;
  MedusaStats st;
  const Gen a = medusa(*dec, heads, prompt, lim, mp, &st, 1.0f);
  EXPECT_EQ(st.accepted, 0);
  EXPECT_EQ(int(a.tokens.size()), 30);
  // A bar near 0: the whole chain passes, every round but the last yields depth + 1 tokens.
  mp.typical_threshold = 1e-30f, mp.typical_alpha = 1e-30f;
  const Gen b = medusa(*dec, heads, prompt, lim, mp, &st, 1.0f);
  EXPECT_EQ(int(b.tokens.size()), 30);
  EXPECT_EQ(st.rounds, 8);  // ceil(30 / 4)
  // The same seed reproduces a sample; temperature > 0 needs typical acceptance.
  EXPECT_EQ(medusa(*dec, heads, prompt, lim, mp, nullptr, 1.0f).tokens, b.tokens);
  mp.typical = false;
  EXPECT_THROW(medusa(*dec, heads, prompt, lim, mp, nullptr, 1.0f), Error);
}

TEST(Medusa, CheckpointRoundTripAndBadInput) {
  Models ms = models();
  Model& m = *ms.llama;
  const fs::path dir = fs::path(KILN_BINARY_DIR) / "test_medusa" / "ckpt";
  fs::remove_all(dir);
  save_model_checkpoint(dir.string(), m.config(), m.table(), m.host_params(), DType::F32);
  EXPECT_FALSE(load_medusa_heads(dir.string(), m.config()));  // no heads yet
  const std::vector<float> hp = heads_for(m, 2, 9, 0.1f);
  save_medusa_heads(dir.string(), medusa_shape(m.config(), 2), hp.data());
  const auto w = load_medusa_heads(dir.string(), load_model_config_for(dir.string()));
  ASSERT_TRUE(w);
  EXPECT_EQ(w->shape.K, 2);
  EXPECT_EQ(w->params, hp);
  // The base still loads (its file holds no head tensors) and config.json names the heads.
  std::vector<float> base(m.table().total);
  load_model_weights(dir.string(), m.config(), m.table(), base.data());
  std::ifstream cfg(dir / "config.json");
  const std::string text((std::istreambuf_iterator<char>(cfg)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"medusa_num_heads\": 2"), std::string::npos);
  // Heads of another width: one error naming the file and tensor.
  ModelConfig other = m.config();
  other.d_model = 16;
  try {
    load_medusa_heads(dir.string(), other);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("medusa.0.res.weight"), std::string::npos) << e.what();
  }
  EXPECT_THROW(MedusaTree::parse("0;0,x"), Error);
  EXPECT_THROW(MedusaTree::parse("0;1,0"), Error);  // no parent (1)
  EXPECT_THROW(MedusaTree::parse("0;0"), Error);    // a repeat
}

}  // namespace
