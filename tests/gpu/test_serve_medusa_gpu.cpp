// Medusa heads in kiln serve on the GPU (the chain of the heads' top-1 tokens): the paged decoder keeps the
// final norm's rows of a device pass for the host heads, which must follow the CPU paged decoder's within bf16's
// accuracy; and the engine's greedy Medusa streams on the GPU give the fp32 CPU decoder's greedy tokens alone
// wherever that choice is clear of bf16's error (5% of the logits' scale), with the heads' guesses accepted.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/medusa_checkpoint.h"
#include "models/model.h"
#include "nn/medusa.h"
#include "serve/engine.h"
#include "tests/decode_test_util.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {

ModelConfig llama_small() { return test::gpu_llama_config(1, 1, 1, 64, 96, 60); }  // small for the emulator

std::unique_ptr<BatchDecoder> paged(const ModelConfig& cfg, const float* P, bool cuda) {
  BatchDecoderOptions o;
  o.block_size = 64;
  o.num_blocks = 8;
  o.keep_hidden = true;
  o.cuda = cuda;
  return make_batch_decoder(cfg, P, o);
}

double max_abs(const float* x, int n) {
  double m = 0;
  for (int i = 0; i < n; i++) m = std::max(m, std::fabs(double(x[i])));
  return m;
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
    const float* got = gpu->hidden();
    for (int r = 0; r < 2; r++) {
      const double scale = max_abs(want.data() + r * C, C);
      for (int i = 0; i < C; i++)
        ASSERT_NEAR(got[r * C + i], want[size_t(r * C + i)], 0.03 * scale + 1e-3)
            << "pass " << p << " row " << r << " element " << i;
    }
  }
}

// The fp32 CPU decoder's greedy tokens after `prompt`, and how many of the first choices are clear (the best
// logit ahead of the second by 5% of the largest |logit|) before the first that is not.
std::vector<int32_t> cpu_greedy(const ModelConfig& cfg, const float* P, const std::vector<int32_t>& prompt, int n,
                                int& clear) {
  auto dec = make_decoder(cfg, P);
  std::vector<int32_t> out;
  const float* lg = dec->forward(prompt.data(), int(prompt.size()));
  clear = -1;
  for (int i = 0; i < n; i++) {
    const int V = cfg.vocab_size;
    const int32_t best = int32_t(std::max_element(lg, lg + V) - lg);
    double second = -1e30;
    for (int j = 0; j < V; j++)
      if (j != best) second = std::max(second, double(lg[j]));
    if (clear < 0 && double(lg[best]) - second <= 0.05 * max_abs(lg, V)) clear = i;
    out.push_back(best);
    lg = dec->forward(&out.back(), 1);
  }
  if (clear < 0) clear = n;
  return out;
}

TEST(GpuServeMedusa, GreedyChainFollowsPlainGreedy) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = llama_small();
  auto model = test::random_model(cfg, 9);
  const float* P = model->host_params();
  const int K = 3;
  const nn::MedusaShape hs = medusa_shape(cfg, K);
  std::vector<float> hp(size_t(hs.total()));
  // Heads that are the LM head plus a little noise: they guess the next token again, right wherever the model
  // repeats itself.
  nn::MedusaHeads::init_from_lm_head(hs, hp.data(), lm_head_matrix(cfg, model->table(), P));
  Rng r(3);
  for (float& x : hp) x += 0.01f * float(r.normal());
  const nn::MedusaHeads heads{hs, hp.data(), nullptr};
  auto dec = paged(cfg, P, true);
  std::vector<std::string> pieces;
  for (int i = 0; i < 256; i++) pieces.push_back(std::string(1, char('A' + i)));
  const Tokenizer tok = Tokenizer::from_parts(pieces, {}, {});
  serve::EngineOptions eo;
  eo.parallel = 4;
  eo.medusa = &heads;
  eo.draft_tokens = K;
  serve::Metrics metrics;
  serve::Engine engine(*dec, tok, eo, metrics);
  engine.start();
  const std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4, 5}, {7, 3}, {30, 20, 10, 0, 11}};
  const int max_new = 20;
  serve::JobParams jp;
  jp.temperature = 0;
  std::vector<std::shared_ptr<serve::Job>> jobs;
  for (const auto& p : prompts) {
    jobs.push_back(std::make_shared<serve::Job>(std::vector<std::vector<int32_t>>{p}, std::vector<int>{max_new}, jp));
    engine.submit(jobs.back());
  }
  int compared = 0;
  for (size_t i = 0; i < jobs.size(); i++) {
    std::vector<serve::ChoiceEvent> ev;
    while (!jobs[i]->done()) jobs[i]->wait(ev, std::chrono::milliseconds(100));
    EXPECT_EQ(jobs[i]->error(), "");
    std::string text;
    for (const auto& e : ev) text += e.text;
    std::vector<int32_t> got;
    for (char c : text) got.push_back(int32_t(c - 'A'));
    int clear = 0;
    const std::vector<int32_t> want = cpu_greedy(cfg, P, prompts[i], max_new, clear);
    ASSERT_EQ(got.size(), want.size()) << "prompt " << i;
    for (int j = 0; j < clear; j++) EXPECT_EQ(got[size_t(j)], want[size_t(j)]) << "prompt " << i << " token " << j;
    compared += clear;
  }
  engine.stop();
  EXPECT_GT(compared, 10);
  EXPECT_GT(metrics.spec_rounds.load(), 0);
  EXPECT_GT(metrics.spec_accepted.load(), 0);
}

}  // namespace
}  // namespace kiln
