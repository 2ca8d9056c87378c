// Narrow weights on the GPU decoders (--device cuda --weights-dtype f16|q8_0): the matrices' narrow copies on the
// device, read by cuda::narrow_gemm with bf16 activations, against the CPU decoders with the same --weights-dtype
// (the same narrow copies, fp32 activations): logits within bf16's accuracy, the same greedy tokens while the
// CPU's choice is clear of that error, and on the device no fp32 or bf16 form of a converted matrix.
// GPT-2 (Conv1D weights transposed as they are converted, biases, tied head) and a Llama-family config (packed
// q/k/v and gate/up, an untied head, a d_ff that is not a multiple of q8_0's 32-value blocks).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {

ModelConfig narrow_gpt2() { return test::gpu_gpt2_config(1, 128, 256, 250); }
// q8_0 pads the down projection's rows (d_ff 200) to 224.
ModelConfig narrow_llama() { return test::gpu_llama_config(1, 4, 2, 128, 200, 250); }

std::vector<float> spread_params(const ModelConfig& cfg, uint64_t seed) {
  auto m = make_model(cfg, ModelOptions{false, std::nullopt, false});
  m->init_random(seed);
  // The 1-D tensors (norm gains, biases) moved off 1 and 0, the matrices a little larger than the init's, so
  // that the logits spread and greedy choices are clear.
  Rng r(seed + 1);
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) m->host_params()[s.offset + i] += (s.shape.ndim == 1 ? 0.1f : 0.04f) * r.normal();
  return std::vector<float>(m->host_params(), m->host_params() + m->table().total);
}

std::unique_ptr<IncrementalDecoder> decoder(const ModelConfig& cfg, const std::vector<float>& p, bool cuda,
                                            WeightFormat f, bool graph) {
  DecoderOptions o;
  o.cuda = cuda;
  o.cuda_graph = graph;
  o.weights = f;
  return make_decoder(cfg, p.data(), o);
}

int32_t argmax(const float* x, int n) { return int32_t(std::max_element(x, x + n) - x); }

// A 10-token prompt (every row's logits: the narrow product over many rows), then greedy single steps on the CPU's
// tokens: the eager GPU decoder's logits follow the CPU's, the CUDA-graph decoder's forward_argmax picks the eager
// one's arg max, and that is the CPU's token wherever the CPU's margin is clear of bf16's error.
TEST(GpuNarrowDecoder, FollowsTheCpuDecoderWithTheSameWeights) {
  KILN_REQUIRE_GPU();
#ifdef __SANITIZE_ADDRESS__
  // The sanitized build checks the memory accesses: the Llama config alone (its q8_0 rows are padded) keeps the
  // emulated run near a minute; the plain emulator build runs both.
  const std::vector<ModelConfig> configs = {narrow_llama()};
#else
  const std::vector<ModelConfig> configs = {narrow_gpt2(), narrow_llama()};
#endif
  for (const ModelConfig& cfg : configs) {
    const std::vector<float> params = spread_params(cfg, 21);
    const int V = cfg.vocab_size, prompt = 10;
    for (WeightFormat f : {WeightFormat::F16, WeightFormat::Q8_0}) {
      const std::string what = cfg.family + " " + weight_format_name(f);
      auto cpu = decoder(cfg, params, false, f, false), eager = decoder(cfg, params, true, f, false),
           graph = decoder(cfg, params, true, f, true);
      Rng r(3);
      std::vector<int32_t> toks(prompt);
      for (auto& t : toks) t = int32_t(r.below(uint64_t(V)));
      const float* c = cpu->forward(toks.data(), prompt, true);
      std::vector<float> want(c, c + size_t(prompt) * V);
      const float* g = eager->forward(toks.data(), prompt, true);
      for (int i = 0; i < prompt; i++)
        test::expect_close(g + size_t(i) * V, want.data() + size_t(i) * V, V,
                           what + " prompt row " + std::to_string(i));
      int32_t next = graph->forward_argmax(toks.data(), prompt, V)[0];
      EXPECT_EQ(next, argmax(g + size_t(prompt - 1) * V, V)) << what;
      int compared = 0;
      for (int step = 0; step < 8; step++) {
        const float* lc = step == 0 ? want.data() + size_t(prompt - 1) * V : cpu->forward(&toks.back(), 1);
        const float* lg = step == 0 ? nullptr : eager->forward(&toks.back(), 1);
        if (lg) {
          test::expect_close(lg, lc, V, what + " step " + std::to_string(step));
          const int32_t got = graph->forward_argmax(&toks.back(), 1, V)[0];
          EXPECT_EQ(got, argmax(lg, V)) << what << " step " << step;
          next = got;
        }
        const int32_t best = argmax(lc, V);
        double scale = 0, second = -1e30;
        for (int i = 0; i < V; i++) {
          scale = std::max(scale, std::fabs(double(lc[i])));
          if (i != best) second = std::max(second, double(lc[i]));
        }
        if (double(lc[best]) - second > 0.05 * scale) {  // clear of bf16's error: the GPU must pick it too
          EXPECT_EQ(next, best) << what << " step " << step;
          compared++;
        }
        toks.push_back(best);  // every decoder continues with the CPU's token
      }
      EXPECT_GT(compared, 2) << what;
    }
  }
}

// What the device holds: each converted matrix only as its narrow copy (narrow_bytes of it, computed here from the
// config), no bf16 copies at all (every other tensor here is an embedding, a norm or a bias, read in fp32), and
// in fp32 only those other tensors.
TEST(GpuNarrowDecoder, DeviceHoldsOnlyTheNarrowCopyOfEachMatrix) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {narrow_gpt2(), narrow_llama()}) {
    const std::vector<float> params = spread_params(cfg, 5);
    const ParamTable t = model_param_table(cfg);
    const int C = cfg.d_model;
    // [out, in] of every matrix the products read.
    std::vector<std::pair<int64_t, int64_t>> mats;
    for (int l = 0; l < cfg.n_layer; l++) {
      mats.push_back({cfg.qkv_dim(), C});
      mats.push_back({C, cfg.q_dim()});
      mats.push_back({(cfg.gated_ffn ? 2 : 1) * int64_t(cfg.d_ff), C});
      mats.push_back({C, cfg.d_ff});
    }
    mats.push_back({cfg.vocab_size, C});
    int64_t matrix_floats = 0;
    for (auto [o, i] : mats) matrix_floats += o * i;
    if (cfg.tie_embeddings) matrix_floats -= int64_t(cfg.vocab_size) * C;  // the lookup's fp32 embedding stays
    for (WeightFormat f : {WeightFormat::F16, WeightFormat::Q8_0}) {
      TransformerDecoder dec(cfg, params.data(), 1, 0, /*cuda=*/true, /*cuda_graph=*/false, f);
      size_t narrow = 0;
      for (auto [o, i] : mats) narrow += narrow_bytes(f, o, i);
      const DecoderWeights& w = dec.weights();
      EXPECT_EQ(w.narrow.bytes(), narrow) << cfg.family;
      EXPECT_EQ(w.params16.size(), 0u) << cfg.family;
      // The rest in fp32, with at most 16 floats of alignment per stretch between matrices.
      const size_t rest = (t.total - size_t(matrix_floats)) * sizeof(float);
      EXPECT_LE(w.params.size(), rest + mats.size() * 16 * sizeof(float)) << cfg.family;
      EXPECT_GE(w.params.size(), rest - mats.size() * 16 * sizeof(float)) << cfg.family;
    }
    // bf16 is the device's own products: the bf16 copies, no narrow one.
    TransformerDecoder bf(cfg, params.data(), 1, 0, true, false, WeightFormat::BF16);
    EXPECT_EQ(bf.weights().narrow.bytes(), 0u);
    EXPECT_EQ(bf.weights().params16.size(), t.total * sizeof(uint16_t));
  }
}

// The serving decoder with narrow weights: sequences joining at different steps (a prompt through FlashAttention,
// a batched single-token pass, a continuation through the paged decode attention) against the CPU's paged decoder
// with the same format.
TEST(GpuNarrowDecoder, PagedDecoderFollowsTheCpu) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = narrow_llama();
  const std::vector<float> params = spread_params(cfg, 8);
  const int V = cfg.vocab_size;
#ifdef __SANITIZE_ADDRESS__
  // Sanitized: q8_0 alone (the f16 products' accesses are checked by the test above).
  const std::vector<WeightFormat> formats = {WeightFormat::Q8_0};
#else
  const std::vector<WeightFormat> formats = {WeightFormat::F16, WeightFormat::Q8_0};
#endif
  for (WeightFormat f : formats) {
    BatchDecoderOptions o;
    o.block_size = 64;
    o.num_blocks = 4;
    o.weights = f;
    auto cpu = make_batch_decoder(cfg, params.data(), o);
    o.cuda = true;
    auto gpu = make_batch_decoder(cfg, params.data(), o);
    Rng r(9);
    std::vector<int32_t> a(30), b(20);
    for (auto& x : a) x = int32_t(r.below(uint64_t(V)));
    for (auto& x : b) x = int32_t(r.below(uint64_t(V)));
    const int32_t ba[] = {2}, bb[] = {0};
    int pa = 0, pb = 0;
    for (int step = 0; step < 6; step++) {
      std::vector<BatchRow> rows;
      rows.push_back({a.data() + pa, pa == 0 ? 20 : 1, pa, ba, 1});
      if (step >= 2) rows.push_back({b.data() + pb, pb == 0 ? 6 : (pb == 6 ? 5 : 1), pb, bb, 1});
      const float* lc = cpu->forward(rows);
      const std::vector<float> want(lc, lc + rows.size() * size_t(V));
      const float* lg = gpu->forward(rows);
      for (size_t i = 0; i < rows.size(); i++)
        test::expect_close(lg + i * V, want.data() + i * V, V,
                     std::string(weight_format_name(f)) + " step " + std::to_string(step) + " row " + std::to_string(i));
      pa += rows[0].n;
      if (rows.size() > 1) pb += rows[1].n;
    }
  }
}

}  // namespace
}  // namespace kiln
