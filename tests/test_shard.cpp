// Sharded storage of the training Transformer (ZeRO stages 2 and 3, models/model.h ShardOptions) in one process:
// a model holding one segment [lo, hi) of the gradients (and at stage 3 of the parameters), with an exchange that
// stands in for the other ranks (fetch copies the unit from the whole parameter block, reduce adds the unit's part
// inside the segment), against the same model with whole blocks. Over two micro-batches the segment's gradients
// are the whole model's, for each recomputation policy, on GPT-2 (tied head, learned positions) and a
// mixture-of-experts model (untied head, the selection bias moved by a segment at stage 3).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"

using namespace kiln;

namespace {

const char* kShardGpt2 = R"({"model_type":"gpt2","n_layer":3,"n_head":2,"n_embd":16,"vocab_size":37,"n_positions":32})";
const char* kMoe = R"({"model_type":"qwen3_moe","hidden_size":16,"num_attention_heads":2,"num_key_value_heads":1,
  "head_dim":8,"num_hidden_layers":3,"intermediate_size":24,"vocab_size":37,"max_position_embeddings":32,
  "rms_norm_eps":1e-6,"rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false,"num_experts":4,
  "num_experts_per_tok":2,"moe_intermediate_size":8,"norm_topk_prob":true,"decoder_sparse_step":1,
  "mlp_only_layers":[1]})";

// The other ranks of a job, played from the whole model's blocks.
struct Loopback : ShardExchange {
  const float* params = nullptr;  // the whole parameter block
  float* seg_grads = nullptr;     // the sharded model's segment gradient
  size_t lo = 0, hi = 0;
  std::vector<std::pair<size_t, size_t>> units;
  std::vector<int> fetches, reduces;
  void fetch(int u, float* dst) override {
    fetches.push_back(u);
    std::memcpy(dst, params + units[size_t(u)].first, (units[size_t(u)].second - units[size_t(u)].first) * 4);
  }
  void wait_fetch(int) override {}
  void reduce(int u, float* src) override {
    reduces.push_back(u);
    const auto [ub, ue] = units[size_t(u)];
    for (size_t i = std::max(ub, lo); i < std::min(ue, hi); i++) seg_grads[i - lo] += src[i - ub];
  }
  void wait_reduce(int) override {}
};

struct Tokens {
  std::vector<int32_t> tokens, targets, pos;
  Tokens(int B, int T, int V, uint64_t seed) {
    Rng r(seed);
    for (int i = 0; i < B * T; i++) {
      tokens.push_back(int32_t(r.below(uint64_t(V))));
      targets.push_back(i % 7 == 3 ? -1 : int32_t(r.below(uint64_t(V))));
      pos.push_back(i % T);
    }
  }
};

void micro_batches(Model& m, int B, int T, const char* policy, double* loss) {
  m.plan(B, T, RecomputePolicy::parse(policy));
  for (uint64_t k = 0; k < 2; k++) {
    const Tokens t(B, T, m.config().vocab_size, 100 + k);
    *loss += m.forward(t.tokens.data(), t.pos.data(), t.targets.data(), m.attention(B, T), 0.05f);
    m.backward();
  }
}

struct Case {
  const char* json;
  int stage;
  const char* policy;
};

class Shard : public ::testing::TestWithParam<Case> {};

TEST_P(Shard, SegmentGradientsAreTheWholeModels) {
  const Case c = GetParam();
  const ModelConfig cfg = parse_model_config(c.json, "config.json");
  auto whole = make_model(cfg);
  whole->init_random(7);
  const ParamTable& t = whole->table();
  Rng r(8);
  for (const ParamSpec& s : t.specs)  // norm gains off 1, routers strong enough to vary
    if (s.shape.ndim == 1 || s.key.find("ffn_gate_inp") != std::string::npos)
      for (int64_t i = 0; i < s.numel(); i++) whole->host_params()[s.offset + size_t(i)] += 0.3f * r.normal();
  whole->params_changed();
  double want_loss = 0;
  micro_batches(*whole, 2, 9, c.policy, &want_loss);
  const ParamBlocks wb = whole->blocks();
  // Segments cutting through units: the first third, the middle, the end.
  const size_t n = t.total, third = n / 3 / 16 * 16;
  for (const auto& [lo, hi] : std::vector<std::pair<size_t, size_t>>{{0, third}, {third, 2 * third}, {2 * third, n}}) {
    ModelOptions o;
    o.shard = {c.stage, lo, hi};
    auto m = make_model(cfg, o);
    std::memcpy(m->host_params(), whole->host_params(), n * sizeof(float));
    m->params_changed();
    Loopback ex;
    ex.params = whole->host_params();
    ex.lo = lo;
    ex.hi = hi;
    ex.units = m->units();
    ex.seg_grads = m->blocks().grads;
    ASSERT_EQ(ex.units.size(), size_t(cfg.n_layer + 2));
    ASSERT_EQ(ex.units.front().first, 0u);
    ASSERT_EQ(ex.units.back().second, n);
    m->set_shard_exchange(&ex);
    double loss = 0;
    micro_batches(*m, 2, 9, c.policy, &loss);
    EXPECT_NEAR(loss, want_loss, 1e-9 * std::fabs(want_loss));
    const ParamBlocks b = m->blocks();
    ASSERT_EQ(b.offset, lo);
    ASSERT_EQ(b.n, hi - lo);
    double err = 0, ref = 0;
    for (size_t i = 0; i < hi - lo; i++) {
      err = std::max(err, double(std::fabs(b.grads[i] - wb.grads[lo + i])));
      ref = std::max(ref, double(std::fabs(wb.grads[lo + i])));
    }
    EXPECT_LE(err, 1e-6 * std::max(ref, 1e-3)) << "segment [" << lo << ", " << hi << ")";
    // Every unit reduced once per micro-batch; at stage 3 every layer fetched for the forward and the backward.
    EXPECT_EQ(ex.reduces.size(), 2 * ex.units.size());
    if (c.stage == 3) {
      EXPECT_GE(ex.fetches.size(), 2 * 2 * size_t(cfg.n_layer));
    }
    // A rank without tokens makes the same exchange calls.
    const size_t f0 = ex.fetches.size(), r0 = ex.reduces.size();
    std::vector<int> fetched(ex.fetches.end() - ptrdiff_t(f0 / 2), ex.fetches.end());
    m->idle_pass(true);
    EXPECT_EQ(ex.reduces.size() - r0, ex.units.size());
    EXPECT_EQ(std::vector<int>(ex.fetches.begin() + ptrdiff_t(f0), ex.fetches.end()), fetched);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, Shard,
                         ::testing::Values(Case{kShardGpt2, 2, "none"}, Case{kShardGpt2, 3, "none"},
                                           Case{kShardGpt2, 3, "every:2"}, Case{kShardGpt2, 3, "selective"},
                                           Case{kMoe, 2, "block"}, Case{kMoe, 3, "every:2"}));

TEST(Shard, BufferBytesAreWhatTheModelAllocates) {
  const ModelConfig cfg = parse_model_config(kShardGpt2, "config.json");
  const size_t n = model_param_table(cfg).total;
  for (int stage : {2, 3}) {
    ModelOptions o;
    o.shard = {stage, 0, n / 2};
    auto m = make_model(cfg, o);
    // Segment state (gradients; parameters at stage 3; the whole parameter block at stage 2) + the buffers.
    const size_t seg = (n / 2) * 4 * (stage == 3 ? 2 : 1) + (stage == 2 ? n * 4 : 0);
    EXPECT_EQ(m->state_bytes(), seg + shard_buffer_bytes(cfg, stage, false)) << "stage " << stage;
  }
}

}  // namespace
