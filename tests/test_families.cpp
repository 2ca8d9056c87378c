// The Llama-style families through the one Transformer, on the CPU: gradients against finite differences,
// recomputation policies bit-identical, packed sequences equal to separate ones, KV-cache decoding equal to
// full recomputation (one token at a time, chunked prefill, a batch), and config.json errors that name the
// field. Each family is a small config with its distinguishing feature switched on.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/checkpoint.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"
#include "test_util.h"

using namespace kiln;

namespace {

struct Case {
  const char* name;
  const char* json;
};

// llama: GQA 4/2, head_dim 12 != 32/4, Llama 3 rope scaling, untied head. mistral: window 3 < T. qwen2: q/k/v
// biases, tied head, linear rope scaling. qwen3: q/k norms, head_dim 10. gpt2 rides along as the baseline.
const Case kCases[] = {
    {"llama", R"({"model_type":"llama","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,
       "head_dim":12,"num_hidden_layers":3,"intermediate_size":40,"vocab_size":41,"max_position_embeddings":64,
       "rms_norm_eps":1e-5,"rope_theta":10000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
       "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":16},
       "hidden_act":"silu","tie_word_embeddings":false})"},
    {"mistral", R"({"model_type":"mistral","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":1,
       "num_hidden_layers":2,"intermediate_size":48,"vocab_size":37,"max_position_embeddings":64,
       "rms_norm_eps":1e-5,"rope_theta":1000000.0,"sliding_window":3,"hidden_act":"silu",
       "tie_word_embeddings":false})"},
    {"qwen2", R"({"model_type":"qwen2","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":4,
       "num_hidden_layers":2,"intermediate_size":36,"vocab_size":43,"max_position_embeddings":64,
       "rms_norm_eps":1e-6,"rope_theta":10000.0,"rope_scaling":{"type":"linear","factor":2.0},
       "hidden_act":"silu","tie_word_embeddings":true,"use_sliding_window":false})"},
    {"qwen3", R"({"model_type":"qwen3","hidden_size":32,"num_attention_heads":4,"num_key_value_heads":2,
       "head_dim":10,"num_hidden_layers":2,"intermediate_size":44,"vocab_size":39,"max_position_embeddings":64,
       "rms_norm_eps":1e-6,"rope_theta":1000000.0,"hidden_act":"silu","tie_word_embeddings":false})"},
    {"gpt2", R"({"model_type":"gpt2","n_layer":2,"n_head":2,"n_embd":32,"vocab_size":37,"n_positions":64})"},
    // Latent attention: the query bottleneck, yarn (mscale in the softmax scale), q/k heads 8 + 8, values 16
    // (the tiled kernel); and queries straight from x, values wider than q/k heads of 12 + 4, interleave off.
    {"deepseek_v3", R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":4,
       "num_key_value_heads":4,"num_hidden_layers":2,"intermediate_size":40,"vocab_size":41,
       "max_position_embeddings":64,"rms_norm_eps":1e-6,"rope_theta":10000.0,"q_lora_rank":24,
       "kv_lora_rank":20,"qk_nope_head_dim":8,"qk_rope_head_dim":8,"v_head_dim":16,"head_dim":8,
       "rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":16,"beta_fast":32,
       "beta_slow":1,"mscale":1.0,"mscale_all_dim":1.0},"first_k_dense_replace":2,
       "hidden_act":"silu","tie_word_embeddings":false})"},
    {"deepseek_v3_direct_q", R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
       "num_hidden_layers":2,"intermediate_size":36,"vocab_size":37,"max_position_embeddings":64,
       "rms_norm_eps":1e-6,"rope_theta":10000.0,"q_lora_rank":null,"kv_lora_rank":12,"qk_nope_head_dim":12,
       "qk_rope_head_dim":4,"v_head_dim":32,"rope_interleave":false,"hidden_act":"silu",
       "tie_word_embeddings":false})"},
    // Two multi-token-prediction modules (layers 2 and 3): their gradients, packing (the shifted targets stay
    // within each sequence) and recomputation; decoding ignores them.
    {"deepseek_v3_mtp", R"({"model_type":"deepseek_v3","hidden_size":32,"num_attention_heads":2,
       "num_hidden_layers":2,"intermediate_size":36,"vocab_size":37,"max_position_embeddings":64,
       "rms_norm_eps":1e-6,"q_lora_rank":16,"kv_lora_rank":16,"qk_nope_head_dim":16,"qk_rope_head_dim":16,
       "v_head_dim":16,"num_nextn_predict_layers":2,"hidden_act":"silu","tie_word_embeddings":true})"},
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

ModelConfig config_of(const Case& c) { return parse_model_config(c.json, std::string(c.name) + "/config.json"); }

// Random weights with non-trivial norm gains and biases (the GPT-2 init sets them to 1 and 0, which would hide
// a gain or bias applied to the wrong side).
std::unique_ptr<Model> model_of(const ModelConfig& cfg, uint64_t seed, bool grads = true) {
  ModelOptions o;
  o.with_grads = grads;
  auto m = make_model(cfg, o);
  m->init_random(seed);
  Rng r(seed + 1);
  for (const ParamSpec& s : m->table().specs)
    if (s.shape.ndim == 1)
      for (int64_t i = 0; i < s.numel(); i++) m->host_params()[s.offset + i] += 0.3f * r.normal();
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
    targets[4] = -1;  // an ignored target
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

class Families : public ::testing::TestWithParam<Case> {};

}  // namespace

TEST_P(Families, GradientsMatchFiniteDifferences) {
  const ModelConfig cfg = config_of(GetParam());
  Batch b(cfg.vocab_size, 5);
  auto m = model_of(cfg, 3);
  double loss = 0;
  std::vector<float> g = grads_of(*m, b, "none", &loss);
  float* p = m->host_params();
  auto loss_at = [&](size_t i, float delta) {
    const float old = p[i];
    p[i] = old + delta;
    m->params_changed();
    const double l = m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), m->attention(b.B, b.T), 0.0f);
    p[i] = old;
    m->params_changed();
    return l * 0.05;  // the gradient above is of 0.05 · sum of losses
  };
  Rng r(9);
  int checked = 0;
  for (const ParamSpec& s : m->table().specs) {
    for (int k = 0; k < 2; k++) {
      const size_t i = s.offset + size_t(r.below(uint64_t(s.numel())));
      const float h = 1e-2f;
      const double fd = (loss_at(i, h) - loss_at(i, -h)) / (2.0 * h);
      EXPECT_NEAR(g[i], fd, 2e-4 + 2e-2 * std::fabs(fd)) << s.name << " element " << i - s.offset;
      checked++;
    }
  }
  EXPECT_GE(checked, 2 * int(m->table().specs.size()));
}

TEST_P(Families, RecomputePoliciesGiveBitIdenticalGradients) {
  const ModelConfig cfg = config_of(GetParam());
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

// Two sequences packed into one row (cu_seqlens, positions restarting) give each sequence's loss and the
// gradients of running them as separate rows, up to summation order.
TEST_P(Families, PackedSequencesEqualSeparateRows) {
  const ModelConfig cfg = config_of(GetParam());
  Batch b(cfg.vocab_size, 7);
  auto m = model_of(cfg, 8);
  double separate = 0;
  const std::vector<float> g0 = grads_of(*m, b, "none", &separate);

  const int32_t cu[] = {0, b.T, 2 * b.T};
  AttentionParams ap = m->attention(1, 2 * b.T);
  ap.cu_seqlens = cu;
  ap.num_seqs = 2;
  ap.max_seqlen = b.T;
  m->plan(1, 2 * b.T);
  m->zero_grad();
  const double packed = m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.05f);
  m->backward();
  const ParamBlocks pb = m->blocks();
  EXPECT_NEAR(packed, separate, 1e-5 * std::fabs(separate));
  EXPECT_TRUE(test::all_close(pb.grads, g0.data(), pb.n, 1e-4, 1e-6));
}

// The KV cache is a mode of attention: logits from the decoder, fed one token at a time, in chunks, or all at
// once for a batch of two, equal the training forward's logits over the whole sequence.
TEST_P(Families, KvCacheLogitsEqualFullRecompute) {
  const ModelConfig cfg = config_of(GetParam());
  const int T = 11, V = cfg.vocab_size;
  auto m = model_of(cfg, 12, /*grads=*/false);
  Rng r(21);
  std::vector<int32_t> tok(2 * T), pos(2 * T);
  for (int i = 0; i < 2 * T; i++) tok[i] = int32_t(r.below(uint64_t(V))), pos[i] = i % T;
  m->plan(2, T);
  m->forward(tok.data(), pos.data(), nullptr, m->attention(2, T), 0.0f);
  const std::vector<float> full(m->logits(), m->logits() + size_t(2) * T * V);

  DecoderOptions one;
  auto d = make_decoder(cfg, m->host_params(), one);
  for (int t = 0; t < T; t++) {
    const float* l = d->forward(&tok[t], 1);
    EXPECT_TRUE(test::all_close(l, &full[size_t(t) * V], V, 1e-5, 1e-5)) << "token " << t;
  }
  d->reset();
  d->forward(tok.data(), 4);
  const float* rest = d->forward(tok.data() + 4, T - 4, /*all_logits=*/true);
  EXPECT_TRUE(test::all_close(rest, &full[size_t(4) * V], size_t(T - 4) * V, 1e-5, 1e-5)) << "chunked prefill";

  DecoderOptions two;
  two.batch = 2;
  auto d2 = make_decoder(cfg, m->host_params(), two);
  const float* all = d2->forward(tok.data(), T, /*all_logits=*/true);
  EXPECT_TRUE(test::all_close(all, full.data(), full.size(), 1e-5, 1e-5)) << "batch of two";
}

INSTANTIATE_TEST_SUITE_P(, Families, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

// Latent attention decodes in the absorbed-weights form (W_UK in the query, W_UV in the output, the cache read
// as one shared head) and in the plain one (the cache expanded through kv_b): the same logits step by step, the
// same greedy tokens, and a cache of kv_lora_rank + rope floats per token and layer.
TEST(LatentAttention, AbsorbedDecodingEqualsPlain) {
  for (const Case& c : kCases) {
    if (std::string(c.name).rfind("deepseek_v3", 0) != 0) continue;
    const ModelConfig cfg = config_of(c);
    const int V = cfg.vocab_size;
    auto m = model_of(cfg, 31, /*grads=*/false);
    TransformerDecoder absorbed(cfg, m->host_params(), 1, 40), plain(cfg, m->host_params(), 1, 40);
    plain.set_latent_absorbed(false);
    EXPECT_EQ(absorbed.cache_bytes(),
              size_t(cfg.n_layer) * 40 * (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_dim) * sizeof(float));
    std::vector<int32_t> prompt = {3, 1, 4, 1, 5};
    const float* la = absorbed.forward(prompt.data(), int(prompt.size()));
    const float* lp = plain.forward(prompt.data(), int(prompt.size()));
    EXPECT_TRUE(test::all_close(la, lp, size_t(V), 1e-5, 1e-5)) << c.name << " prompt";
    int32_t ta = 0, tp = 0;
    std::vector<int32_t> ga, gp;
    for (int step = 0; step < 30; step++) {
      ta = int32_t(std::max_element(la, la + V) - la);
      tp = int32_t(std::max_element(lp, lp + V) - lp);
      ga.push_back(ta);
      gp.push_back(tp);
      la = absorbed.forward(&ta, 1);
      lp = plain.forward(&tp, 1);
      ASSERT_TRUE(test::all_close(la, lp, size_t(V), 1e-4, 1e-5)) << c.name << " step " << step;
    }
    EXPECT_EQ(ga, gp) << c.name;
  }
}

// Dropping the MTP modules (the same main weights in a model without them) leaves the main logits unchanged, and
// the model with them reports that same main loss beside its MTP term.
TEST(MultiTokenPrediction, DroppingTheModulesLeavesMainLogits) {
  const Case* c = nullptr;
  for (const Case& k : kCases)
    if (std::string(k.name) == "deepseek_v3_mtp") c = &k;
  ASSERT_TRUE(c);
  const ModelConfig cfg = config_of(*c);
  ModelConfig main_only = cfg;
  main_only.mtp_depth = 0;
  auto m = model_of(cfg, 41, /*grads=*/false);
  auto m0 = model_of(main_only, 42, /*grads=*/false);
  for (const ParamSpec& s : m0->table().specs) {
    const ParamSpec& from = m->table().get_key(s.key);
    std::memcpy(m0->host_params() + s.offset, m->host_params() + from.offset, sizeof(float) * size_t(s.numel()));
  }
  m0->params_changed();
  EXPECT_GT(m->table().specs.size(), m0->table().specs.size());
  // The parameter count includes the modules: the table's tensors add up to it.
  for (const ModelConfig* k : std::initializer_list<const ModelConfig*>{&cfg, &main_only}) {
    int64_t n = 0;
    for (const ParamSpec& s : model_param_table(*k).specs) n += s.numel();
    EXPECT_EQ(n, k->num_params()) << k->mtp_depth << " MTP modules";
  }
  Batch b(cfg.vocab_size, 43);
  m->plan(b.B, b.T);
  m0->plan(b.B, b.T);
  const AttentionParams ap = m->attention(b.B, b.T);
  m->forward(b.tokens.data(), b.pos.data(), nullptr, ap, 0.0f);
  m0->forward(b.tokens.data(), b.pos.data(), nullptr, ap, 0.0f);
  const size_t n = size_t(b.B) * b.T * cfg.vocab_size;
  EXPECT_EQ(0, std::memcmp(m->logits(), m0->logits(), n * sizeof(float)));
  const double main0 = m0->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.0f);
  const double total = m->forward(b.tokens.data(), b.pos.data(), b.targets.data(), ap, 0.0f);
  const auto parts = m->loss_parts();
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[0].first, "main_loss");
  EXPECT_EQ(parts[0].second, main0);
  EXPECT_NEAR(total, main0 + double(0.3f) * parts[1].second, 1e-9 * std::fabs(total));  // λ = 0.3 by default
  EXPECT_GT(parts[1].second, 0.0);
}

// The decoder's draft (the first MTP module over the cached positions, with its own KV cache) gives the MTP
// logits of the training forward: after a prompt and then token by token, in both latent decoding forms. (With
// one module and no gradient the training forward's logits() are that module's: its head runs last.)
TEST(MultiTokenPrediction, DraftLogitsEqualTrainingForward) {
  const Case* c = nullptr;
  for (const Case& k : kCases)
    if (std::string(k.name) == "deepseek_v3_mtp") c = &k;
  ASSERT_TRUE(c);
  ModelConfig cfg = config_of(*c);
  cfg.mtp_depth = 1;
  const int T = 12, V = cfg.vocab_size;
  auto m = model_of(cfg, 51, /*grads=*/false);
  Rng r(52);
  std::vector<int32_t> t(T + 1), pos(T);
  for (int i = 0; i <= T; i++) t[size_t(i)] = int32_t(r.below(uint64_t(V)));
  for (int i = 0; i < T; i++) pos[size_t(i)] = i;
  m->plan(1, T);
  m->forward(t.data(), pos.data(), t.data() + 1, m->attention(1, T), 0.0f);
  const std::vector<float> mtp(m->logits(), m->logits() + size_t(T) * V);
  for (bool absorbed : {true, false}) {
    TransformerDecoder d(cfg, m->host_params(), 1, 32);
    d.set_latent_absorbed(absorbed);
    d.forward(t.data(), 5);
    const float* l = d.self_draft(1, t[5]);
    EXPECT_TRUE(test::all_close(l, &mtp[size_t(4) * V], size_t(V), 1e-5, 1e-5)) << "prompt, absorbed " << absorbed;
    for (int i = 5; i < T - 1; i++) {
      d.forward(&t[size_t(i)], 1);
      l = d.self_draft(1, t[size_t(i + 1)]);
      EXPECT_TRUE(test::all_close(l, &mtp[size_t(i) * V], size_t(V), 1e-5, 1e-5)) << "position " << i;
    }
    EXPECT_THROW(d.self_draft(2, t[0]), Error);  // one module
  }
}

// config.json errors: one line naming the file and the field.
TEST(FamilyConfig, BadConfigsNameTheField) {
  auto error_of = [](const std::string& json) -> std::string {
    try {
      ModelConfig c = parse_model_config(json, "m/config.json");
      c.validate("m/config.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  const std::string llama = R"("hidden_size":32,"num_attention_heads":4,"num_hidden_layers":1,
      "intermediate_size":40,"vocab_size":41,"max_position_embeddings":64)";
  auto expect = [&](const std::string& json, std::initializer_list<const char*> words) {
    const std::string e = error_of(json);
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
    EXPECT_NE(e.find("m/config.json"), std::string::npos) << e;
    for (const char* w : words) EXPECT_NE(e.find(w), std::string::npos) << "'" << w << "' not in: " << e;
  };
  expect(R"({"model_type":"falcon",)" + llama + "}", {"model_type", "falcon", "llama"});
  expect(R"({"model_type":"llama","num_key_value_heads":3,)" + llama + "}", {"num_key_value_heads"});
  expect(R"({"model_type":"llama","rope_scaling":{"rope_type":"yarn","factor":4.0},)" + llama + "}",
         {"rope_scaling", "yarn"});
  expect(R"({"model_type":"llama","hidden_size":30,"num_attention_heads":4,"num_hidden_layers":1,
      "intermediate_size":40,"vocab_size":41,"max_position_embeddings":64})",
         {"hidden_size", "num_attention_heads"});
  expect(R"({"model_type":"llama","num_attention_heads":4,"num_hidden_layers":1,"intermediate_size":40,
      "vocab_size":41,"max_position_embeddings":64})",
         {"hidden_size"});
  expect(R"({"model_type":"qwen2","hidden_act":"swish2",)" + llama + "}", {"hidden_act", "swish2"});
  // deepseek_v3: the latent attention's fields, the MoE layers and the MTP layer this build lacks.
  const std::string ds = llama + R"(,"kv_lora_rank":16,"qk_nope_head_dim":8,"v_head_dim":8)";
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,)" + llama + "}", {"kv_lora_rank"});
  expect(R"({"model_type":"deepseek_v3",)" + ds + "}", {"qk_rope_head_dim"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":7,)" + ds + "}", {"qk_rope_head_dim", "even"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,"v_head_dim":0,)" + llama +
             R"(,"kv_lora_rank":16,"qk_nope_head_dim":8})",
         {"v_head_dim"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,"attention_bias":true,)" + ds + "}",
         {"attention_bias"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,"n_routed_experts":4,"num_experts_per_tok":2,
      "moe_intermediate_size":8,"n_group":3,)" + ds + "}",
         {"n_group"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,"n_routed_experts":4,"num_experts_per_tok":2,
      "moe_intermediate_size":8,"scoring_func":"softmax",)" + ds + "}",
         {"scoring_func"});
  expect(R"({"model_type":"deepseek_v3","qk_rope_head_dim":8,"rope_scaling":{"type":"yarn","factor":4,
      "beta_fast":0},)" + ds + "}",
         {"yarn", "beta_fast"});
  expect(R"({"model_type":"llama","hidden_size":"wide","num_attention_heads":4,"num_hidden_layers":1,
      "intermediate_size":40,"vocab_size":41,"max_position_embeddings":64})",
         {"hidden_size"});
  expect("{not json", {"config.json"});
}

// Sharded saves: Hugging Face's file names and index, every tensor back bit for bit, and the other form removed
// so a later load cannot pick up stale weights.
TEST(FamilyCheckpoint, ShardedSaveLoadsBackExactly) {
  namespace fs = std::filesystem;
  const ModelConfig cfg = config_of(kCases[0]);
  auto m = model_of(cfg, 31, /*grads=*/false);
  const ParamTable& t = m->table();
  const std::string dir = ::testing::TempDir() + "kiln_sharded_" + std::to_string(::getpid());
  fs::remove_all(dir);
  save_model_checkpoint(dir, cfg, t, m->host_params(), DType::F32);  // first one file...
  ASSERT_TRUE(fs::exists(dir + "/model.safetensors"));
  save_model_checkpoint(dir, cfg, t, m->host_params(), DType::F32, 8000);  // ...then shards of at most 8000 B
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  const nlohmann::json index = nlohmann::json::parse(std::ifstream(dir + "/model.safetensors.index.json"));
  std::set<std::string> files;
  for (auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GT(files.size(), 3u);
  EXPECT_EQ(*files.begin(), "model-00001-of-" + std::string(5 - std::to_string(files.size()).size(), '0') +
                                std::to_string(files.size()) + ".safetensors");
  EXPECT_EQ(index["weight_map"].size(), t.specs.size());
  size_t total = 0;
  for (const ParamSpec& s : t.specs) total += size_t(s.numel()) * 4;
  EXPECT_EQ(index["metadata"]["total_size"].get<size_t>(), total);
  for (const std::string& f : files) {
    const auto bytes = fs::file_size(dir + "/" + f);
    EXPECT_TRUE(bytes <= 8000 + 4096) << f << ": " << bytes;  // the tensors' bytes plus the header
  }
  std::vector<float> back(t.total, -1.0f);
  load_model_weights(dir, cfg, t, back.data());
  for (const ParamSpec& s : t.specs)
    EXPECT_EQ(0, std::memcmp(back.data() + s.offset, m->host_params() + s.offset, size_t(s.numel()) * 4)) << s.name;
  // Back to one file: the index and the shards go.
  save_model_checkpoint(dir, cfg, t, m->host_params(), DType::BF16);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir + "/" + *files.begin()));
  EXPECT_EQ(parse_byte_size("5GB", "x"), size_t(5000000000));
  EXPECT_EQ(parse_byte_size("2MiB", "x"), size_t(2) << 20);
  EXPECT_EQ(parse_byte_size("0", "x"), size_t(0));
  EXPECT_THROW(parse_byte_size("5 GB", "--max-shard-size"), Error);
  EXPECT_THROW(parse_byte_size("GB", "--max-shard-size"), Error);
  fs::remove_all(dir);
}

// A sharded checkpoint with a tensor missing, an extra one, a misshaped one, or an index naming a missing file:
// one line naming the file and the tensor, and the parameter block untouched.
TEST(FamilyCheckpoint, BadShardsNameTheFileAndTensor) {
  namespace fs = std::filesystem;
  const ModelConfig cfg = config_of(kCases[3]);
  auto m = model_of(cfg, 32, /*grads=*/false);
  const ParamTable& t = m->table();
  const std::string base = ::testing::TempDir() + "kiln_badshards_" + std::to_string(::getpid());
  fs::remove_all(base);
  save_model_checkpoint(base + "/good", cfg, t, m->host_params(), DType::F32, 6000);
  const nlohmann::json index = nlohmann::json::parse(std::ifstream(base + "/good/model.safetensors.index.json"));
  const std::string victim = "model.layers.1.self_attn.k_norm.weight";
  const std::string shard = index["weight_map"][victim].get<std::string>();

  // Rewrites the shard holding `victim` with its tensors changed by `edit`.
  auto variant = [&](const std::string& name, auto edit) {
    const std::string dir = base + "/" + name;
    fs::copy(base + "/good", dir, fs::copy_options::recursive);
    SafeTensorsReader r(dir + "/" + shard);
    std::vector<std::vector<float>> keep;
    std::vector<Tensor> ts;
    keep.reserve(r.tensors().size());
    for (const Tensor& e : r.tensors()) {
      keep.emplace_back(e.f32(), e.f32() + e.numel());
      ts.push_back(Tensor{e.name, DType::F32, e.shape, keep.back().data()});
    }
    edit(ts, keep);
    write_safetensors(dir + "/" + shard, ts, {{"format", "pt"}});
    return dir;
  };
  auto expect_error = [&](const std::string& dir, std::initializer_list<std::string> words) {
    std::vector<float> block(t.total, 7.0f);
    try {
      load_model_weights(dir, cfg, t, block.data());
      ADD_FAILURE() << dir << ": no error";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
      for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
    }
    EXPECT_TRUE(std::all_of(block.begin(), block.end(), [](float x) { return x == 7.0f; })) << dir;
  };
  std::vector<float> extra(5, 1.0f);
  expect_error(variant("missing", [&](auto& ts, auto&) {
                 std::erase_if(ts, [&](const Tensor& x) { return x.name == victim; });
               }),
               {"missing tensor", victim});
  expect_error(variant("extra", [&](auto& ts, auto&) {
                 ts.push_back(Tensor{"model.layers.9.mlp.up_proj.weight", DType::F32, Shape{5}, extra.data()});
               }),
               {shard, "unexpected tensor", "model.layers.9.mlp.up_proj.weight"});
  expect_error(variant("misshaped", [&](auto& ts, auto&) {
                 for (Tensor& x : ts)
                   if (x.name == victim) x.shape = Shape{x.shape.numel() / 2};
               }),
               {shard, victim, "shape"});
  const std::string gone = base + "/gone";
  fs::copy(base + "/good", gone, fs::copy_options::recursive);
  fs::remove(gone + "/" + shard);
  expect_error(gone, {"model.safetensors.index.json", shard, "does not exist"});
  fs::remove_all(base);
}
