// Drafting in kiln serve on the GPU. Medusa heads: the paged decoder keeps the final norm's rows of a device pass
// for the host heads, which must follow the CPU paged decoder's within bf16's accuracy; candidate trees run through the
// device's tree attention over the paged cache and the accepted path is compacted in the device's blocks, both
// following the CPU paged decoder (whose trees equal each path decoded alone, tests/test_serve_medusa.cpp); and
// the engine's greedy Medusa streams on the GPU (the chain of the heads' top-1 tokens, and trees) give the fp32
// CPU decoder's greedy tokens alone wherever that choice is clear of bf16's error (5% of the logits' scale), with
// the heads' guesses accepted. MTP self-drafting: the paged decoder's latent attention (the absorbed form through
// the device's paged decode attention) and its MTP modules' passes follow the CPU paged decoder's (checked against
// the training forward, tests/test_serve_mtp.cpp) through prompts, a continuation and single steps, and the
// engine's greedy MTP streams on the GPU follow the CPU decoder alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "infer/medusa.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "nn/medusa.h"
#include "serve/engine.h"
#include "tests/decode_test_util.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/mtp_test_util.h"
#include "tests/serve_test_util.h"

namespace kiln {
namespace {

ModelConfig llama_small() { return test::gpu_llama_config(1, 1, 1, 64, 96, 60); }  // small for the emulator

std::unique_ptr<BatchDecoder> paged(const ModelConfig& cfg, const float* P, bool cuda, int num_blocks = 8) {
  BatchDecoderOptions o;
  o.block_size = 64;
  o.num_blocks = num_blocks;
  o.keep_hidden = true;
  o.cuda = cuda;
  return make_batch_decoder(cfg, P, o);
}

// Every row of `got` within bf16's error of `want` (rows of n values, 3% of each row's largest |value|).
void expect_rows_near(const float* got, const float* want, int rows, int n, const std::string& what) {
  for (int r = 0; r < rows; r++) {
    const double scale = test::max_abs(want + size_t(r) * n, n);
    for (int i = 0; i < n; i++)
      ASSERT_NEAR(got[size_t(r) * n + i], want[size_t(r) * n + i], 0.03 * scale + 1e-3)
          << what << " row " << r << " element " << i;
  }
}

// Two sequences: prompts together, then single steps and a 3-token continuation; every row's hidden state on the
// device against the CPU's.
TEST(GpuServeMedusa, DeviceHiddenStatesFollowTheCpu) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = llama_small();
  auto model = test::random_model(cfg, 4);
  const float* P = model->host_params();
  auto cpu = paged(cfg, P, false), gpu = paged(cfg, P, true);
  const int C = cfg.d_model;
  const std::vector<int32_t> a = {3, 14, 15, 9, 26, 5, 35, 8, 9, 7}, b = {2, 7, 18, 28, 18, 45, 4, 1};
  const int32_t ba[] = {1}, bb[] = {4};
  const std::vector<std::vector<std::pair<int, int>>> passes = {{{0, 5}, {0, 4}}, {{5, 1}, {4, 1}}, {{6, 3}, {5, 1}}};
  for (size_t p = 0; p < passes.size(); p++) {
    std::vector<BatchRow> rows(2);
    rows[0] = {a.data() + passes[p][0].first, passes[p][0].second, passes[p][0].first, ba, 1};
    rows[1] = {b.data() + passes[p][1].first, passes[p][1].second, passes[p][1].first, bb, 1};
    cpu->forward(rows);
    const std::vector<float> want(cpu->hidden(), cpu->hidden() + 2 * C);
    gpu->forward(rows);
    expect_rows_near(gpu->hidden(), want.data(), 2, C, "pass " + std::to_string(p) + " hidden states");
  }
}

// Two sequences (blocks of 64 scattered over the pool) check a tree of 10 nodes each in one pass, their slots
// crossing a block boundary, beside a third decoding one token: every node's logits and hidden state follow the
// CPU paged decoder's. Then each keeps a different path (compacted across the boundary, in both layers) and the
// next token's logits follow the CPU's after the same compaction.
TEST(GpuServeMedusa, TreeNodesAndTheKeptPathFollowTheCpu) {
  KILN_REQUIRE_GPU();
  ModelConfig cfg = test::gpu_llama_config(2, 2, 1, 128, 96, 60);
  cfg.max_positions = 192;
  auto model = test::random_model(cfg, 6);
  const float* P = model->host_params();
  auto cpu = paged(cfg, P, false, 12), gpu = paged(cfg, P, true, 12);
  const int V = cfg.vocab_size, C = cfg.d_model;
  const std::vector<int> parent = {-1, 0, 0, 0, 1, 1, 2, 4, 4, 7};
  const int n = int(parent.size());
  const test::TreeShape tree = test::tree_from_parents(parent);
  Rng r(8);
  auto tokens = [&](int count) {
    std::vector<int32_t> t(static_cast<size_t>(count));
    for (auto& x : t) x = int32_t(r.below(uint64_t(V)));
    return t;
  };
  const std::vector<std::vector<int32_t>> prompts = {tokens(60), tokens(125), tokens(7)};
  const std::vector<std::vector<int32_t>> trees = {tokens(n), tokens(n)};
  const std::vector<std::vector<int32_t>> blocks = {{9, 2}, {3, 11, 0}, {5}};
  std::vector<BatchRow> rows = test::prompt_rows(prompts, blocks);
  cpu->forward(rows);
  gpu->forward(rows);
  const int32_t single = 12;
  for (size_t s = 0; s < 2; s++) test::set_tree_row(rows[s], trees[s], int(prompts[s].size()), tree);
  rows[2].tokens = &single;
  rows[2].n = 1;
  rows[2].past = int(prompts[2].size());
  const int out_rows = 2 * n + 1;
  const float* lg = cpu->forward(rows);
  const std::vector<float> want(lg, lg + size_t(out_rows) * V);
  const std::vector<float> want_h(cpu->hidden(), cpu->hidden() + size_t(out_rows) * C);
  lg = gpu->forward(rows);
  expect_rows_near(lg, want.data(), out_rows, V, "tree logits");
  expect_rows_near(gpu->hidden(), want_h.data(), out_rows, C, "tree hidden states");
  const std::vector<std::vector<int32_t>> keep = {{0, 1, 4, 7, 9}, {0, 3}};
  const int32_t next[2] = {17, 21};
  std::vector<BatchRow> cont(2);
  for (size_t s = 0; s < 2; s++) {
    for (BatchDecoder* d : {cpu.get(), gpu.get()})
      d->keep_path(blocks[s].data(), int(blocks[s].size()), int(prompts[s].size()), keep[s].data(),
                   int(keep[s].size()));
    cont[s].tokens = &next[s];
    cont[s].n = 1;
    cont[s].past = int(prompts[s].size() + keep[s].size());
    cont[s].blocks = blocks[s].data();
    cont[s].n_blocks = int(blocks[s].size());
  }
  lg = cpu->forward(cont);
  const std::vector<float> after(lg, lg + size_t(2) * V);
  expect_rows_near(gpu->forward(cont), after.data(), 2, V, "logits after the kept path");
}

// Greedy streams served on the GPU by `eo`'s drafting against the fp32 CPU decoder alone: every choice clear of
// bf16's error equal; returns how many were compared.
int expect_served_greedy_follows_the_cpu(BatchDecoder& dec, const serve::EngineOptions& eo, const ModelConfig& cfg,
                                         const float* P, serve::Metrics& metrics) {
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {7, 3}, {30, 20, 10, 0, 11}};
  const int max_new = 20;
  serve::JobParams jp;
  jp.temperature = 0;
  const std::vector<test::Served> served = test::serve_jobs(dec, eo, prompts, max_new, jp, metrics);
  int compared = 0;
  for (size_t i = 0; i < prompts.size(); i++) {
    const std::vector<int32_t> got = test::letter_ids(served[i].text);
    int clear = 0;
    const std::vector<int32_t> want = test::cpu_greedy(cfg, P, prompts[i], max_new, clear);
    EXPECT_EQ(got.size(), want.size()) << "prompt " << i;
    for (int j = 0; j < clear && j < int(got.size()); j++)
      EXPECT_EQ(got[size_t(j)], want[size_t(j)]) << "prompt " << i << " token " << j;
    compared += clear;
  }
  EXPECT_GT(metrics.spec_rounds.load(), 0);
  EXPECT_GT(metrics.spec_accepted.load(), 0);
  return compared;
}

// Greedy Medusa streams served on the GPU (the heads' chain, or `tree`) against the fp32 CPU decoder alone.
void expect_greedy_medusa_follows_the_cpu(const MedusaTree* tree) {
  const ModelConfig cfg = llama_small();
  auto model = test::random_model(cfg, 9);
  const float* P = model->host_params();
  const int K = 3;
  const std::vector<float> hp = test::heads_from_lm_head(cfg, *model, K, 0.01f, 3);
  const nn::MedusaHeads heads{medusa_shape(cfg, K), hp.data(), nullptr};
  auto dec = paged(cfg, P, true);
  serve::EngineOptions eo;
  eo.parallel = 4;
  eo.medusa = &heads;
  eo.draft_tokens = K;
  if (tree) eo.medusa_tree = *tree;
  serve::Metrics metrics;
  EXPECT_GT(expect_served_greedy_follows_the_cpu(*dec, eo, cfg, P, metrics), 10);
}

TEST(GpuServeMedusa, GreedyChainFollowsPlainGreedy) {
  KILN_REQUIRE_GPU();
  expect_greedy_medusa_follows_the_cpu(nullptr);
}

TEST(GpuServeMedusa, GreedyTreeFollowsPlainGreedy) {
  KILN_REQUIRE_GPU();
  const MedusaTree tree = MedusaTree::parse("0;1;2;0,0;0,1;1,0;0,0,0");  // 7 nodes within the 3 heads
  expect_greedy_medusa_follows_the_cpu(&tree);
}

// DeepSeek-V3 with the GPU kernels' latent dims (qk 48 + 16, v 32, c_KV 32: cached rows of 48), a dense layer and
// an MoE layer (4 routed experts, 2 a token, one shared), two MTP modules.
ModelConfig deepseek_gpu() {
  return parse_model_config(
      R"({"model_type":"deepseek_v3","hidden_size":64,"num_attention_heads":2,"num_hidden_layers":2,
          "intermediate_size":96,"moe_intermediate_size":32,"n_routed_experts":4,"num_experts_per_tok":2,
          "n_shared_experts":1,"first_k_dense_replace":1,"vocab_size":60,"max_position_embeddings":192,
          "rms_norm_eps":1e-6,"q_lora_rank":32,"kv_lora_rank":32,"qk_nope_head_dim":48,"qk_rope_head_dim":16,
          "v_head_dim":32,"num_nextn_predict_layers":2,"hidden_act":"silu","tie_word_embeddings":false})",
      "gpu_serve_mtp/config.json");
}

std::unique_ptr<BatchDecoder> mtp_paged(const ModelConfig& cfg, const float* P, bool cuda) {
  BatchDecoderOptions o;
  o.block_size = 64;
  o.num_blocks = 12;
  o.self_draft = o.keep_stream = true;
  o.cuda = cuda;
  return make_batch_decoder(cfg, P, o);
}

TEST(GpuServeMTP, PagedLatentAttentionAndModulesFollowTheCpu) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = deepseek_gpu();
  auto m = test::mtp_model(cfg, 31, 2.0f);
  const float* P = m->host_params();
  auto cpu = mtp_paged(cfg, P, false), gpu = mtp_paged(cfg, P, true);
  ASSERT_EQ(gpu->self_draft_depth(), 2);
  const int V = cfg.vocab_size, C = cfg.d_model;
  Rng r(32);
  // Two sequences: a prompt of 70 (across a block boundary) and one of 5; then 3 and 1 more; then 1 each.
  struct Seq {
    std::vector<int32_t> t, blocks;
    int cached = 0;
    std::vector<float> h[2][2];  // [decoder: cpu, gpu][depth 0 (the stream), depth 1 (module 1's outputs)]
  };
  std::vector<Seq> seqs(2);
  seqs[0].blocks = {5, 2};
  seqs[1].blocks = {7};
  for (Seq& s : seqs) {
    s.t.resize(80);
    for (int32_t& x : s.t) x = int32_t(r.below(uint64_t(V)));
  }
  BatchDecoder* decs[2] = {cpu.get(), gpu.get()};
  int compared = 0;
  auto check = [&](const float* want, const float* got, int rows, const std::string& what) {
    expect_rows_near(got, want, rows, V, what);
    compared += rows;
  };
  auto feed = [&](const std::vector<int>& n, const std::string& what) {
    std::vector<BatchRow> rows;
    for (Seq& s : seqs)
      rows.push_back({s.t.data() + s.cached, n[rows.size()], s.cached, s.blocks.data(), int(s.blocks.size())});
    std::vector<float> want;
    for (int d = 0; d < 2; d++) {
      const float* lg = decs[d]->forward(rows);
      if (d == 0) want.assign(lg, lg + size_t(rows.size()) * V);
      else check(want.data(), lg, int(rows.size()), what + ": logits");
      size_t off = 0;
      for (size_t i = 0; i < seqs.size(); i++) {
        const float* st = decs[d]->stream() + off * size_t(C);
        seqs[i].h[d][0].insert(seqs[i].h[d][0].end(), st, st + size_t(n[i]) * C);
        off += size_t(n[i]);
      }
    }
    for (size_t i = 0; i < seqs.size(); i++) seqs[i].cached += n[i];
  };
  // Module k over positions [from[i], cached) of each sequence with the true tokens i + k.
  auto module = [&](int k, const std::vector<int>& from, const std::string& what) {
    std::vector<float> want;
    for (int d = 0; d < 2; d++) {
      std::vector<DraftRow> rows;
      std::vector<std::vector<int32_t>> toks(seqs.size());
      for (size_t i = 0; i < seqs.size(); i++) {
        Seq& s = seqs[i];
        for (int p = from[i]; p < s.cached; p++) toks[i].push_back(s.t[size_t(p + k)]);
        rows.push_back(test::draft_row(toks[i].data(), s.h[d][k - 1].data() + size_t(from[i]) * C, s.cached - from[i],
                                       from[i], s.blocks));
      }
      const float* lg = decs[d]->self_draft(k, rows);
      if (d == 0) want.assign(lg, lg + size_t(rows.size()) * V);
      else check(want.data(), lg, int(rows.size()), what + ": module " + std::to_string(k));
      if (k == 1) {
        size_t off = 0;
        for (size_t i = 0; i < seqs.size(); i++) {
          std::vector<float>& h = seqs[i].h[d][1];
          h.resize(size_t(from[i]) * C);
          const float* o = decs[d]->draft_hidden() + off * size_t(C);
          h.insert(h.end(), o, o + size_t(rows[i].n) * C);
          off += size_t(rows[i].n);
        }
      }
    }
  };
  feed({70, 5}, "the prompts");
  module(1, {0, 0}, "the prompts");
  module(2, {0, 0}, "the prompts");
  feed({3, 1}, "a continuation and a step");
  module(1, {70, 5}, "a continuation and a step");
  module(2, {70, 5}, "a continuation and a step");
  feed({1, 1}, "single steps");
  module(1, {73, 6}, "single steps");
  module(2, {73, 6}, "single steps");
  EXPECT_EQ(compared, 18);
}

TEST(GpuServeMTP, GreedyStreamsFollowPlainGreedy) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = deepseek_gpu();
  auto m = test::agreeing_mtp_model(cfg, 75, 0.3f);  // some drafts pass, some fail
  const float* P = m->host_params();
  auto dec = mtp_paged(cfg, P, true);
  serve::EngineOptions eo;
  eo.parallel = 4;
  eo.mtp = true;
  eo.draft_tokens = 2;
  serve::Metrics metrics;
  EXPECT_GT(expect_served_greedy_follows_the_cpu(*dec, eo, cfg, P, metrics), 10);
}

}  // namespace
}  // namespace kiln
