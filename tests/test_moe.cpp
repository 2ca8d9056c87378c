// Mixture-of-experts models through the one Transformer on the CPU: Qwen3-MoE (softmax router, top-k,
// mlp_only_layers) and a DeepSeek-V3-style MoE (sigmoid affinities, selection bias, group-limited routing,
// routed_scaling_factor, shared experts, a first dense layer). Gradients against finite differences (the router
// included: the gate weights carry its gradient), recomputation policies bit-identical over alternating dense
// and MoE layers, KV-cache decoding equal to the full forward, checkpoints with one tensor per expert, and
// one-line errors for bad configs and missing experts.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
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
#include "nn/moe.h"
#include "test_util.h"
#include "train/optimizer.h"

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

std::unique_ptr<Model> model_of(const ModelConfig& cfg, uint64_t seed, bool grads = true, float aux = 0) {
  ModelOptions o;
  o.with_grads = grads;
  auto m = make_model(cfg, o);
  m->set_seq_aux_alpha(aux);
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

struct MoeBatch {
  int B = 2, T = 9;
  std::vector<int32_t> tokens, targets, pos;
  MoeBatch(int vocab, uint64_t seed) {
    Rng r(seed);
    for (int i = 0; i < B * T; i++) {
      tokens.push_back(int32_t(r.below(uint64_t(vocab))));
      targets.push_back(int32_t(r.below(uint64_t(vocab))));
      pos.push_back(i % T);
    }
  }
};

std::vector<float> grads_of(Model& m, const MoeBatch& b, const char* policy, double* loss) {
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
  float aux = 0;  // the sequence-wise balance loss's weight
};
// The third: the balance loss on (a large weight, so its gradient matters next to the token losses').
const Named kModels[] = {{"qwen3_moe", qwen3_moe}, {"deepseek_style", deepseek_style},
                         {"deepseek_style_seq_aux", deepseek_style, 0.5f}};
void PrintTo(const Named& n, std::ostream* os) { *os << n.name; }

class Moe : public ::testing::TestWithParam<Named> {};

}  // namespace

TEST_P(Moe, GradientsMatchFiniteDifferences) {
  const ModelConfig cfg = GetParam().make();
  MoeBatch b(cfg.vocab_size, 5);
  auto m = model_of(cfg, 3, true, GetParam().aux);
  double loss = 0;
  const std::vector<float> g = grads_of(*m, b, "none", &loss);
  float* p = m->host_params();
  auto loss_at = [&](size_t i, float delta) {
    const float old = p[i];
    p[i] = old + delta;
    m->params_changed();
    // A training forward when the balance loss is on (evaluation forwards leave it out); its gradient scale
    // does not change the loss.
    const float scale = GetParam().aux > 0 ? 1e-30f : 0.0f;
    const double l = m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), scale);
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
  const ParamSpec& router =
      m->table().get_key(cfg.first_k_dense_replace ? "blk.1.ffn_gate_inp.weight" : "blk.0.ffn_gate_inp.weight");
  double norm = 0;
  for (int64_t i = 0; i < router.numel(); i++) norm += std::pow(g[router.offset + size_t(i)], 2);
  EXPECT_GT(norm, 1e-10);
}

TEST_P(Moe, RecomputePoliciesGiveBitIdenticalGradients) {
  const ModelConfig cfg = GetParam().make();
  MoeBatch b(cfg.vocab_size, 6);
  double l0 = 0;
  auto m = model_of(cfg, 4, true, GetParam().aux);
  const std::vector<float> base = grads_of(*m, b, "none", &l0);
  for (const char* policy : {"block", "every:2", "selective"}) {
    auto mp = model_of(cfg, 4, true, GetParam().aux);
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

namespace {
// The layer's selection bias (host view) and router of a MoE layer.
float* bias_of(Model& m, int layer) { return m.host_params() + m.table().get_key("blk." + std::to_string(layer) + ".exp_probs_b.bias").offset; }
}  // namespace

// A fixed routing: with the routers zeroed every affinity is sigmoid(0) = 1/2, so the bias alone chooses. With
// b_e = e/100 the groups {12..15} and {8..11} score highest and every token picks experts 13, 14, 15. The hand
// count: those three get all N tokens, the rest none; the mean is 3N/16, so their bias drops by gamma and every
// other expert's rises by gamma. Evaluation forwards do not count, and AdamW never moves the bias.
TEST(MoeBalance, BiasUpdateEqualsHandCount) {
  const ModelConfig cfg = deepseek_style();
  auto m = model_of(cfg, 41);
  float* p = m->host_params();
  for (int l = 1; l < cfg.n_layer; l++) {
    const ParamSpec& r = m->table().get_key("blk." + std::to_string(l) + ".ffn_gate_inp.weight");
    std::fill(p + r.offset, p + r.offset + r.numel(), 0.0f);
    for (int e = 0; e < 16; e++) bias_of(*m, l)[e] = float(e) / 100.0f;
  }
  m->params_changed();
  MoeBatch b(cfg.vocab_size, 42);
  const int N = b.B * b.T;
  m->plan(b.B, b.T);
  m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), 0.0f);  // not counted
  m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), 0.05f);
  m->backward();
  const auto load = m->take_expert_load();
  ASSERT_EQ(load.size(), 2u);  // layers 1 and 2
  for (const auto& l : load)
    for (int e = 0; e < 16; e++) EXPECT_EQ(l[size_t(e)], e >= 13 ? float(N) : 0.0f) << "expert " << e;
  // AdamW leaves the bias alone (its gradient is zero and it is not trainable).
  AdamWConfig ac;
  AdamW adam(m->table(), ac, m->blocks().backend);
  adam.update(m->blocks(), 1e-2f, 1, adam.grad_norm(m->blocks()), 1.0f, true);
  for (int e = 0; e < 16; e++) EXPECT_EQ(bias_of(*m, 1)[e], float(e) / 100.0f);
  const float gamma = 0.001f;
  m->update_expert_bias(load, gamma);
  for (int l = 1; l < cfg.n_layer; l++)
    for (int e = 0; e < 16; e++)
      EXPECT_EQ(bias_of(*m, l)[e], float(e) / 100.0f + (e >= 13 ? -gamma : gamma)) << "layer " << l << " expert " << e;
  // The counts restarted.
  for (const auto& l : m->take_expert_load())
    for (float x : l) EXPECT_EQ(x, 0.0f);
  // Equal loads leave the bias as it is (sign 0).
  std::vector<float> bias(4, 0.5f);
  const float even[4] = {3, 3, 3, 3}, mixed[4] = {5, 1, 3, 3};
  nn::moe_bias_update(bias.data(), even, 4, 0.1f);
  EXPECT_EQ(bias, std::vector<float>(4, 0.5f));
  nn::moe_bias_update(bias.data(), mixed, 4, 0.1f);
  EXPECT_EQ(bias, (std::vector<float>{0.4f, 0.6f, 0.5f, 0.5f}));
}

// A MoE block inside the MTP module (layer n_layer): counted in expert_load beside the main layers and its
// selection bias moved by the same rule. Zero routers and biases e/100: every one of the N positions the module
// runs on picks experts 13..15 (as in BiasUpdateEqualsHandCount), so the hand count is N for those, 0 else.
TEST(MoeBalance, MtpModuleBlockCountedAndBalanced) {
  // deepseek_style()'s routing on a deepseek_v3 model (latent attention) with one MTP module.
  const ModelConfig cfg = parse_model_config(R"({"model_type":"deepseek_v3","hidden_size":32,
    "num_attention_heads":4,"num_key_value_heads":4,"num_hidden_layers":3,"intermediate_size":40,"vocab_size":41,
    "max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000.0,"hidden_act":"silu",
    "tie_word_embeddings":false,"q_lora_rank":null,"kv_lora_rank":16,"qk_nope_head_dim":8,"qk_rope_head_dim":8,
    "v_head_dim":8,"head_dim":8,"num_nextn_predict_layers":1,"first_k_dense_replace":1,"n_routed_experts":16,
    "n_group":4,"topk_group":2,"num_experts_per_tok":3,"n_shared_experts":1,"moe_intermediate_size":12,
    "routed_scaling_factor":2.5,"norm_topk_prob":true,"topk_method":"noaux_tc","scoring_func":"sigmoid"})",
                                             "deepseek_v3 with MTP");
  ASSERT_TRUE(cfg.is_moe_layer(cfg.n_layer));
  auto m = model_of(cfg, 43);
  float* p = m->host_params();
  for (int l = 1; l <= cfg.n_layer; l++) {
    const ParamSpec& r = m->table().get_key("blk." + std::to_string(l) + ".ffn_gate_inp.weight");
    std::fill(p + r.offset, p + r.offset + r.numel(), 0.0f);
    for (int e = 0; e < 16; e++) bias_of(*m, l)[e] = float(e) / 100.0f;
  }
  m->params_changed();
  MoeBatch b(cfg.vocab_size, 44);
  const int N = b.B * b.T;
  m->plan(b.B, b.T);
  m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), 0.05f);
  m->backward();
  const auto load = m->take_expert_load();
  ASSERT_EQ(load.size(), 3u);  // layers 1 and 2, and the MTP module's layer 3
  for (const auto& l : load)
    for (int e = 0; e < 16; e++) EXPECT_EQ(l[size_t(e)], e >= 13 ? float(N) : 0.0f) << "expert " << e;
  const float gamma = 0.001f;
  m->update_expert_bias(load, gamma);
  for (int e = 0; e < 16; e++)
    EXPECT_EQ(bias_of(*m, cfg.n_layer)[e], float(e) / 100.0f + (e >= 13 ? -gamma : gamma)) << "expert " << e;
}

// A deliberately skewed router: every token embedding shares a direction c, and the routers of experts 0 and 1
// lean towards it, so most tokens pick them. Weights frozen, 300 steps of fresh random batches: the balancing
// update (gamma = 0.001) brings the worst layer's max/mean load (over the last 20 steps) below 1.5; gamma = 0
// keeps it above.
TEST(MoeBalance, LossFreeBalancingEvensTheLoad) {
  ModelConfig cfg = deepseek_style();
  cfg.n_layer = 2;  // layer 0 dense, layer 1 MoE
  cfg.n_experts = 8;
  cfg.moe_top_k = 2;
  cfg.moe_groups = cfg.moe_topk_groups = 1;
  cfg.routed_scaling_factor = 1.0;
  cfg.validate("balance");
  auto ratio_after = [&](float gamma, double* initial) {
    auto m = model_of(cfg, 51);
    float* p = m->host_params();
    const int C = cfg.d_model;
    Rng r(52);
    std::vector<float> c(static_cast<size_t>(C));
    for (float& x : c) x = r.normal();
    const ParamSpec& wte = m->table().get_key("token_embd.weight");
    for (int v = 0; v < cfg.vocab_size; v++)
      for (int i = 0; i < C; i++) p[wte.offset + size_t(v) * C + i] += 0.05f * c[size_t(i)];
    for (int l = 1; l < cfg.n_layer; l++) {
      const ParamSpec& w = m->table().get_key("blk." + std::to_string(l) + ".ffn_gate_inp.weight");
      for (int e = 0; e < 2; e++)
        for (int i = 0; i < C; i++) p[w.offset + size_t(e) * C + i] += 0.15f * c[size_t(i)];
      std::fill(bias_of(*m, l), bias_of(*m, l) + cfg.n_experts, 0.0f);
    }
    m->params_changed();
    const int B = 4, T = 16;
    m->plan(B, T);
    std::vector<std::vector<double>> window(1, std::vector<double>(size_t(cfg.n_experts), 0.0));
    auto worst = [&]() {
      double w = 0;
      for (const auto& l : window) {
        double sum = 0, mx = 0;
        for (double x : l) sum += x, mx = std::max(mx, x);
        w = std::max(w, mx * double(l.size()) / sum);
      }
      return w;
    };
    Rng data(53);
    std::vector<int32_t> tok(size_t(B * T)), pos(size_t(B * T));
    for (int step = 0; step < 300; step++) {
      for (int i = 0; i < B * T; i++) tok[size_t(i)] = int32_t(data.below(uint64_t(cfg.vocab_size))), pos[size_t(i)] = i % T;
      m->forward(tok.data(), pos.data(), tok.data(), m->attention(B, T), 1e-6f);  // a training forward (counted)
      m->zero_grad();
      const auto load = m->take_expert_load();
      m->update_expert_bias(load, gamma);
      if (step == 0) {
        for (size_t e = 0; e < load[0].size(); e++) window[0][e] = load[0][e];
        *initial = worst();
      }
      if (step == 280)
        for (auto& l : window) std::fill(l.begin(), l.end(), 0.0);
      if (step >= 280)
        for (size_t e = 0; e < load[0].size(); e++) window[0][e] += load[0][e];
    }
    return worst();
  };
  double init0 = 0, init1 = 0;
  const double frozen = ratio_after(0.0f, &init0), balanced = ratio_after(0.001f, &init1);
  std::printf("max/mean expert load: initially %.2f; after 300 steps gamma 0: %.2f, gamma 0.001: %.2f\n", init0, frozen,
              balanced);
  EXPECT_GT(init0, 2.0);
  EXPECT_GT(frozen, 1.5);
  EXPECT_LT(balanced, 1.5);
}

// The balance loss adds alpha · Σ_s T_s Σ_i f_i P_i to a training forward's loss sum, and nothing to an
// evaluation forward's.
TEST(MoeBalance, SeqAuxLossAddsToTrainingLoss) {
  const ModelConfig cfg = deepseek_style();
  MoeBatch b(cfg.vocab_size, 61);
  auto m0 = model_of(cfg, 62), m1 = model_of(cfg, 62, true, 0.5f);
  m0->plan(b.B, b.T);
  m1->plan(b.B, b.T);
  const AttentionParams ap = m0->attention(b.B, b.T);
  const double train0 = m0->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.05f);
  const double train1 = m1->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.05f);
  const double eval1 = m1->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.0f);
  EXPECT_EQ(eval1, train0);
  // Each of the 2 MoE layers adds 0.5 · T · Σ_i f_i P_i per sequence; Σ_i f_i P_i is at least about 1 (1 when
  // perfectly balanced), so the term is at least 2 · 2 · 9 · 0.5 · (a little under 1).
  EXPECT_GT(train1 - train0, 10.0);
  EXPECT_LT(train1 - train0, 18.0 * 16);
}
