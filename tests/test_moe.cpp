// Mixture-of-experts models through the one Transformer on the CPU: Qwen3-MoE (softmax router, top-k,
// mlp_only_layers) and a DeepSeek-V3-style MoE (sigmoid affinities, selection bias, group-limited routing,
// routed_scaling_factor, shared experts, a first dense layer). Gradients against finite differences (the router
// included: the gate weights carry its gradient), recomputation policies bit-identical over alternating dense
// and MoE layers, KV-cache decoding equal to the full forward, checkpoints with one tensor per expert, and
// one-line errors for bad configs and missing experts.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/model.h"
#include "test_util.h"

using namespace kiln;

namespace {

const char* kQwen3Moe = R"({"model_type":"qwen3_moe","hidden_size":32,"num_attention_heads":4,
  "num_key_value_heads":2,"head_dim":8,"num_hidden_layers":3,"intermediate_size":40,"vocab_size":41,
  "max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"hidden_act":"silu",
  "tie_word_embeddings":false,"num_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":12,
  "norm_topk_prob":true,"decoder_sparse_step":1,"mlp_only_layers":[1]})";

ModelConfig qwen3_moe() { return parse_model_config(kQwen3Moe, "qwen3_moe/config.json"); }

// DeepSeek-V3's MoE on the same attention: 16 experts in 4 groups (2 kept), top-3, sigmoid, bias, scale 2.5,
// one shared expert, layer 0 dense.
ModelConfig deepseek_style() {
  ModelConfig c = qwen3_moe();
  c.mlp_only_layers.clear();
  c.n_experts = 16;
  c.moe_top_k = 3;
  c.moe_groups = 4;
  c.moe_topk_groups = 2;
  c.moe_scoring = RouterScoring::Sigmoid;
  c.moe_router_bias = true;
  c.routed_scaling_factor = 2.5;
  c.n_shared_experts = 1;
  c.first_k_dense_replace = 1;
  c.validate("deepseek-style");
  return c;
}

std::unique_ptr<Model> model_of(const ModelConfig& cfg, uint64_t seed, bool grads = true) {
  ModelOptions o;
  o.with_grads = grads;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);
  float* p = m->host_params();
  for (const ParamSpec& s : m->table().specs) {
    // Norm gains off 1; a router strong enough that the gates vary between tokens; a selection bias.
    const float scale = s.shape.ndim == 1 ? 0.3f : s.key.find("ffn_gate_inp") != std::string::npos ? 0.3f : 0.0f;
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + i] += scale * r.normal();
  }
  m->params_changed();
  return m;
}

struct Batch {
  int B = 2, T = 9;
  std::vector<int32_t> tokens, targets, pos;
  Batch(int vocab, uint64_t seed) {
    Rng r(seed);
    for (int i = 0; i < B * T; i++) {
      tokens.push_back(int32_t(r.below(uint64_t(vocab))));
      targets.push_back(int32_t(r.below(uint64_t(vocab))));
      pos.push_back(i % T);
    }
  }
};

std::vector<float> grads_of(Model& m, const Batch& b, const char* policy, double* loss) {
  m.plan(b.B, b.T, RecomputePolicy::parse(policy));
  m.zero_grad();
  *loss = m.forward(b.tokens.data(), b.pos.data(), b.targets.data(), m.attention(b.B, b.T), 0.05f);
  m.backward();
  const ParamBlocks pb = m.blocks();
  return std::vector<float>(pb.grads, pb.grads + pb.n);
}

struct Named {
  const char* name;
  ModelConfig (*make)();
};
const Named kModels[] = {{"qwen3_moe", qwen3_moe}, {"deepseek_style", deepseek_style}};
void PrintTo(const Named& n, std::ostream* os) { *os << n.name; }

class Moe : public ::testing::TestWithParam<Named> {};

}  // namespace

TEST_P(Moe, GradientsMatchFiniteDifferences) {
  const ModelConfig cfg = GetParam().make();
  Batch b(cfg.vocab_size, 5);
  auto m = model_of(cfg, 3);
  double loss = 0;
  const std::vector<float> g = grads_of(*m, b, "none", &loss);
  float* p = m->host_params();
  auto loss_at = [&](size_t i, float delta) {
    const float old = p[i];
    p[i] = old + delta;
    m->params_changed();
    const double l = m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), 0.0f);
    p[i] = old;
    m->params_changed();
    return l * 0.05;
  };
  Rng r(9);
  int moe_checked = 0, checked = 0, retried = 0;
  for (const ParamSpec& s : m->table().specs) {
    if (s.key.find("exp_probs_b") != std::string::npos) {
      // The selection bias gets no gradient (the loss-free balancing update moves it).
      for (int64_t i = 0; i < s.numel(); i++) EXPECT_EQ(g[s.offset + size_t(i)], 0.0f) << s.name;
      continue;
    }
    const bool moe = s.key.find("exps") != std::string::npos || s.key.find("shexp") != std::string::npos ||
                     s.key.find("gate_inp") != std::string::npos;
    for (int k = 0; k < (moe ? 6 : 2); k++) {
      const size_t i = s.offset + size_t(r.below(uint64_t(s.numel())));
      // The loss is piecewise smooth: a step that moves some token's expert choice crosses a (small) jump.
      // Such an element is measured again with smaller steps, one of which misses the jump (rounding noise
      // then allows a wider margin).
      double fd = (loss_at(i, 1e-2f) - loss_at(i, -1e-2f)) / 2e-2;
      if (std::fabs(g[i] - fd) > 2e-4 + 2e-2 * std::fabs(fd)) {
        retried++;
        bool ok = false;
        for (float h : {3e-3f, 1e-3f, 3e-4f}) {
          fd = (loss_at(i, h) - loss_at(i, -h)) / (2.0 * h);
          ok |= std::fabs(g[i] - fd) <= 1e-6 / h + 2e-2 * std::fabs(fd);
        }
        EXPECT_TRUE(ok) << s.name << " element " << i - s.offset << ": " << g[i] << " vs " << fd;
      }
      moe_checked += moe;
      checked++;
    }
  }
  EXPECT_GE(moe_checked, 24);
  EXPECT_LE(retried * 10, checked) << retried << " of " << checked << " elements needed the smaller step";
  // The router's gradient is not zero: the gate weights pass it on.
  const ParamSpec& router = m->table().get_key(cfg.has_dense_ffn() && cfg.first_k_dense_replace ? "blk.1.ffn_gate_inp.weight"
                                                                                                 : "blk.0.ffn_gate_inp.weight");
  double norm = 0;
  for (int64_t i = 0; i < router.numel(); i++) norm += std::pow(g[router.offset + size_t(i)], 2);
  EXPECT_GT(norm, 1e-10);
}

TEST_P(Moe, RecomputePoliciesGiveBitIdenticalGradients) {
  const ModelConfig cfg = GetParam().make();
  Batch b(cfg.vocab_size, 6);
  double l0 = 0;
  auto m = model_of(cfg, 4);
  const std::vector<float> base = grads_of(*m, b, "none", &l0);
  for (const char* policy : {"block", "every:2", "selective"}) {
    auto mp = model_of(cfg, 4);
    double l = 0;
    const std::vector<float> g = grads_of(*mp, b, policy, &l);
    EXPECT_EQ(l, l0) << policy;
    EXPECT_EQ(0, std::memcmp(g.data(), base.data(), g.size() * sizeof(float))) << policy;
  }
}

TEST_P(Moe, KvCacheLogitsEqualFullRecompute) {
  const ModelConfig cfg = GetParam().make();
  const int T = 11, V = cfg.vocab_size;
  auto m = model_of(cfg, 12, /*grads=*/false);
  Rng r(21);
  std::vector<int32_t> tok(2 * T), pos(2 * T);
  for (int i = 0; i < 2 * T; i++) tok[i] = int32_t(r.below(uint64_t(V))), pos[i] = i % T;
  m->plan(2, T);
  m->forward(tok.data(), pos.data(), nullptr, m->attention(2, T), 0.0f);
  const std::vector<float> full(m->logits(), m->logits() + size_t(2) * T * V);
  auto d = make_decoder(cfg, m->host_params(), DecoderOptions{});
  for (int t = 0; t < T; t++) {
    const float* l = d->forward(&tok[t], 1);
    EXPECT_TRUE(test::all_close(l, &full[size_t(t) * V], V, 1e-5, 1e-5)) << "token " << t;
  }
  DecoderOptions two;
  two.batch = 2;
  auto d2 = make_decoder(cfg, m->host_params(), two);
  const float* all = d2->forward(tok.data(), T, /*all_logits=*/true);
  EXPECT_TRUE(test::all_close(all, full.data(), full.size(), 1e-5, 1e-5)) << "batch of two";
}

INSTANTIATE_TEST_SUITE_P(, Moe, ::testing::ValuesIn(kModels),
                         [](const ::testing::TestParamInfo<Named>& i) { return std::string(i.param.name); });

TEST(MoeConfig, LayersAndParameterCounts) {
  const ModelConfig q = qwen3_moe();
  EXPECT_TRUE(q.is_moe_layer(0));
  EXPECT_FALSE(q.is_moe_layer(1));  // mlp_only_layers
  EXPECT_TRUE(q.is_moe_layer(2));
  // Counted by hand: per layer attention 32·(32 + 2·16) + 32·32 + 2 norms of 32 + q/k norms of 8; MoE layer
  // router 8·32 + 8 experts of 3·32·12; dense layer 3·32·40; embedding and head 41·32 each, final norm 32.
  const int64_t attn = 32 * (32 + 2 * 16) + 32 * 32 + 2 * 32 + 2 * 8;
  const int64_t moe = 8 * 32 + 8 * 3 * 32 * 12, dense = 3 * 32 * 40;
  EXPECT_EQ(q.num_params(), 2 * 41 * 32 + 32 + 3 * attn + 2 * moe + dense);
  EXPECT_EQ(q.active_params(), 2 * 41 * 32 + 32 + 3 * attn + 2 * (8 * 32 + 2 * 3 * 32 * 12) + dense);
  EXPECT_EQ(int64_t(model_param_table(q).total) >= q.num_params(), true);
  const ModelConfig d = deepseek_style();
  EXPECT_FALSE(d.is_moe_layer(0));
  EXPECT_EQ(d.active_params(), d.num_params() - 2 * (16 - 3) * 3 * 32 * 12);
}

TEST(MoeConfig, BadConfigsAreOneLineErrors) {
  auto error_of = [](const ModelConfig& c) -> std::string {
    try {
      c.validate("m/config.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  auto expect = [&](ModelConfig c, std::initializer_list<const char*> words) {
    const std::string e = error_of(c);
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
    EXPECT_NE(e.find("m/config.json"), std::string::npos) << e;
    for (const char* w : words) EXPECT_NE(e.find(w), std::string::npos) << "'" << w << "' not in: " << e;
  };
  ModelConfig c = deepseek_style();
  c.moe_groups = 3;  // 16 experts
  expect(c, {"n_group", "does not divide", "16"});
  c = deepseek_style();
  c.moe_top_k = 17;
  expect(c, {"num_experts_per_tok", "17"});
  c = deepseek_style();
  c.moe_topk_groups = 5;
  expect(c, {"topk_group", "n_group"});
  c = deepseek_style();
  c.first_k_dense_replace = 9;
  expect(c, {"first_k_dense_replace"});
  // From config.json: top-k above the expert count.
  std::string json = kQwen3Moe;
  json.replace(json.find("\"num_experts_per_tok\":2"), 23, "\"num_experts_per_tok\":9");
  try {
    parse_model_config(json, "q/config.json");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("q/config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find("num_experts_per_tok"), std::string::npos) << msg;
  }
}

// Hugging Face keeps one tensor per expert (mlp.experts.E.{gate,up,down}_proj.weight); kiln stacks them. A save
// writes them apart, a load puts them back bit for bit, and a missing expert is a one-line error naming it.
TEST(MoeCheckpoint, ExpertsSavedApartAndLoadedBack) {
  namespace fs = std::filesystem;
  const ModelConfig cfg = deepseek_style();
  auto m = model_of(cfg, 31, /*grads=*/false);
  const ParamTable& t = m->table();
  const std::string dir = ::testing::TempDir() + "kiln_moe_ckpt_" + std::to_string(::getpid());
  fs::remove_all(dir);
  save_model_checkpoint(dir, cfg, t, m->host_params(), DType::F32);
  SafeTensorsReader r(dir + "/model.safetensors");
  std::vector<std::string> names;
  for (const auto& e : r.entries()) names.push_back(e.name);
  auto has = [&](const std::string& n) { return std::find(names.begin(), names.end(), n) != names.end(); };
  EXPECT_TRUE(has("model.layers.1.mlp.experts.15.down_proj.weight"));
  EXPECT_TRUE(has("model.layers.2.mlp.experts.0.gate_proj.weight"));
  EXPECT_TRUE(has("model.layers.1.mlp.gate.weight"));
  EXPECT_TRUE(has("model.layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_TRUE(has("model.layers.1.mlp.shared_experts.up_proj.weight"));
  EXPECT_TRUE(has("model.layers.0.mlp.down_proj.weight"));  // the dense first layer
  EXPECT_FALSE(has("model.layers.0.mlp.gate.weight"));
  std::vector<float> back(t.total, -1.0f);
  load_model_weights(dir, cfg, t, back.data());
  EXPECT_EQ(0, std::memcmp(back.data(), m->host_params(), t.total * sizeof(float)));

  // Drop expert 7's up projection of layer 2.
  const std::string victim = "model.layers.2.mlp.experts.7.up_proj.weight";
  std::vector<std::vector<float>> keep;
  std::vector<Tensor> ts;
  keep.reserve(r.tensors().size());
  for (const Tensor& e : r.tensors()) {
    if (e.name == victim) continue;
    keep.emplace_back(e.f32(), e.f32() + e.numel());
    ts.push_back(Tensor{e.name, DType::F32, e.shape, keep.back().data()});
  }
  write_safetensors(dir + "/model.safetensors", ts, {{"format", "pt"}});
  try {
    load_model_weights(dir, cfg, t, back.data());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_NE(msg.find(victim), std::string::npos) << msg;
  }
  fs::remove_all(dir);
}
