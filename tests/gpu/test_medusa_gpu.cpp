// Medusa's verification on the GPU decoder: tree attention through the CUDA decode-attention kernel (its SIMT
// path with node masks) and the accepted path compacted in the device cache. Every tree node's logits and
// hidden state must equal those of its path decoded alone by plain causal decoding on the GPU (within bf16
// accuracy: the two take different kernels), for GPT-2 and a Llama-family config (GQA, rotary, q/k norms); the
// compacted cache must continue like a plain one; and greedy Medusa decoding on the GPU must give the GPU's
// plain greedy tokens for as long as plain greedy's choice is clear of bf16's error (2% of the logits' scale).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "infer/generate.h"
#include "infer/medusa.h"
#include "infer/sampler.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "nn/medusa.h"
#include "tests/decode_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {

// Small enough for the SIMT emulator (head_dim 64: the GPU attention kernels take 64 and 128).
ModelConfig gpt2_small() {
  ModelConfig c;
  c.family = "gpt2";
  c.n_layer = 1;
  c.d_model = 64;
  c.n_head = 1;
  c.n_kv_head = 1;
  c.head_dim = 64;
  c.d_ff = 128;
  c.vocab_size = 96;
  c.max_positions = 64;
  c.qkv_bias = c.attn_out_bias = c.ffn_bias = true;
  c.layout = WeightLayout::InOut;
  return c;
}

ModelConfig llama_small() {  // no sliding window: tree attention takes none
  ModelConfig c;
  c.family = "qwen3";
  c.n_layer = 1;
  c.d_model = 64;
  c.n_head = 2;
  c.n_kv_head = 1;  // GQA
  c.head_dim = 64;
  c.d_ff = 96;
  c.vocab_size = 96;
  c.max_positions = 64;
  c.norm = NormKind::RMSNorm;
  c.norm_bias = false;
  c.norm_eps = 1e-6f;
  c.positions = PositionKind::Rotary;
  c.rope_theta = 10000.0;
  c.qk_norm = true;
  c.gated_ffn = true;
  c.activation = Activation::Silu;
  c.tie_embeddings = false;
  return c;
}

// Random weights scaled up (outputs that vary with the context), 1-D tensors moved off 1 and 0.
std::vector<float> params_of(const ModelConfig& cfg, uint64_t seed, float scale) {
  auto m = make_model(cfg, ModelOptions{false, std::nullopt, false});
  m->init_random(seed);
  Rng r(seed + 1);
  float* p = m->host_params();
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + i] = s.shape.ndim == 1 ? p[s.offset + i] + 0.1f * r.normal()
                                                                                 : p[s.offset + i] * scale;
  return std::vector<float>(p, p + m->table().total);
}

std::unique_ptr<IncrementalDecoder> gpu_decoder(const ModelConfig& cfg, const std::vector<float>& params) {
  DecoderOptions o;
  o.cuda = true;
  return make_decoder(cfg, params.data(), o);
}

TEST(GpuMedusa, TreeNodeLogitsEqualTheirPathDecodedAlone) {
  KILN_REQUIRE_GPU();
  // Parents of nodes 1..19 (node 0 the root; depths follow): 20 nodes, more than the tensor-core kernel's 16
  // queries. GPT-2 with the first 10 nodes only.
  const std::vector<int> all = {-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 7, 8, 9, 9, 10, 3, 3, 15, 16, 18};
  for (const ModelConfig& cfg : {gpt2_small(), llama_small()}) {
    const std::vector<int> parent(all.begin(), all.begin() + (cfg.family == "gpt2" ? 10 : 20));
    const int n = int(parent.size()), V = cfg.vocab_size, C = cfg.d_model;
    SCOPED_TRACE(cfg.family + " tree of " + std::to_string(n));
    const auto [depth, mask] = test::tree_from_parents(parent);
    std::vector<int32_t> tokens(static_cast<size_t>(n));
    for (int i = 0; i < n; i++) tokens[size_t(i)] = int32_t((37 * i + 11) % V);
    const std::vector<int32_t> prompt = {4, 8, 15, 16, 23};
    const auto params = params_of(cfg, 3, 4.0f);
    auto dec = gpu_decoder(cfg, params);
    dec->forward(prompt.data(), int(prompt.size()));
    const float* tl = dec->forward_tree(tokens.data(), n, depth.data(), mask.data());
    const std::vector<float> tree(tl, tl + size_t(n) * V), hid(dec->hidden(), dec->hidden() + size_t(n) * C);
    EXPECT_EQ(dec->length(), int(prompt.size()) + n);
    // Decoded alone: the prompt through FlashAttention once, then each node's path (its ancestors and
    // itself) one step at a time after it.
    auto alone = gpu_decoder(cfg, params);
    alone->forward(prompt.data(), int(prompt.size()));
    for (int i = 0; i < n; i++) {
      std::vector<int32_t> path;
      for (int j = i; j >= 0; j = parent[size_t(j)]) path.insert(path.begin(), tokens[size_t(j)]);
      alone->truncate(int(prompt.size()));
      const float* want = nullptr;
      for (int32_t t : path) want = alone->forward(&t, 1);
      test::expect_close(tree.data() + size_t(i) * V, want, V, "node " + std::to_string(i) + " logits");
      test::expect_close(hid.data() + size_t(i) * C, alone->hidden(), C, "node " + std::to_string(i) + " hidden");
    }
    // Keep the path 0 -> 1 -> 4 -> 7 and continue: the compacted cache decodes like a plain one.
    const std::vector<int32_t> keep = {0, 1, 4, 7};
    dec->keep_path(int(prompt.size()), keep.data(), int(keep.size()));
    EXPECT_EQ(dec->length(), int(prompt.size()) + 4);
    const int32_t next = 42;
    const float* g = dec->forward(&next, 1);
    const std::vector<float> got(g, g + V);
    std::vector<int32_t> seq = prompt;
    for (int k : keep) seq.push_back(tokens[size_t(k)]);
    seq.push_back(next);
    alone->truncate(0);
    test::expect_close(got.data(), alone->forward(seq.data(), int(seq.size())), V, "after keep_path");
  }
}

TEST(GpuMedusa, GreedyFollowsPlainGreedy) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {llama_small()}) {
    SCOPED_TRACE(cfg.family);
    const int V = cfg.vocab_size;
    const auto params = params_of(cfg, 5, 4.0f);
    auto model = make_model(cfg, ModelOptions{false, std::nullopt, false});
    std::copy(params.begin(), params.end(), model->host_params());
    // Heads that start as the LM head (their guesses: the next token again), a little noise on top.
    const std::vector<float> hp = test::heads_from_lm_head(cfg, *model, 3, 0.01f, 9);
    nn::MedusaHeads heads{medusa_shape(cfg, 3), hp.data(), nullptr};
    const std::vector<int32_t> prompt = {90, 17, 33, 8, 61};
    const int steps = 16;
    // Plain greedy on the GPU, with each choice's margin over the runner-up against the logits' scale.
    auto dec = gpu_decoder(cfg, params);
    std::vector<int32_t> want;
    std::vector<bool> clear;
    const float* l = dec->forward(prompt.data(), int(prompt.size()));
    for (int t = 0; t < steps; t++) {
      const int32_t best = argmax(l, V);
      double second = -1e30, scale = 0;
      for (int i = 0; i < V; i++) {
        scale = std::max(scale, std::fabs(double(l[i])));
        if (i != best) second = std::max(second, double(l[i]));
      }
      want.push_back(best);
      clear.push_back(l[best] - second > 0.02 * scale);
      if (t + 1 < steps) l = dec->forward(&best, 1);
    }
    SamplingParams sp;
    sp.temperature = 0;
    Sampler greedy(sp);
    MedusaParams mp;  // the default tree, greedy acceptance
    GenerateLimits lim;
    lim.max_new = steps;
    std::vector<int32_t> got;
    MedusaStats st;
    auto mdec = gpu_decoder(cfg, params);
    generate_medusa(*mdec, heads, greedy, prompt, lim, mp, [&](int32_t t) { got.push_back(t); return true; }, &st);
    ASSERT_EQ(got.size(), want.size());
    int compared = 0;
    for (int t = 0; t < steps && clear[size_t(t)]; t++, compared++) EXPECT_EQ(got[size_t(t)], want[size_t(t)]) << t;
    EXPECT_GT(compared, 0);
    EXPECT_GT(st.accepted, 0);  // paths past the root were kept: keep_path moved device cache rows
    EXPECT_LT(st.rounds, steps);
  }
}

}  // namespace
}  // namespace kiln
