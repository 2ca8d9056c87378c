// The paged continuous-batching decoder (models/model.h BatchDecoder) on the GPU backend against the CPU one:
// sequences joining at different steps, blocks of 64 positions scattered over the pool, a prompt crossing a
// block boundary (FlashAttention, then the paged KV append), and a sequence reusing another's first block whose
// rest of the prompt goes through the paged decode attention in pieces of 16 queries. Logits within bf16's
// accuracy of the fp32 CPU decoder's.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"
#include "tests/gpu/gpu_test_util.h"

using namespace kiln;

TEST(GpuPagedDecoder, FollowsTheCpu) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = parse_model_config(
      R"({"model_type":"llama","hidden_size":128,"num_attention_heads":2,"num_key_value_heads":1,"head_dim":64,
          "num_hidden_layers":1,"intermediate_size":96,"vocab_size":64,"max_position_embeddings":256,
          "rms_norm_eps":1e-5,"rope_theta":10000.0,"hidden_act":"silu","tie_word_embeddings":false})",
      "config.json");
  ModelOptions mo;
  mo.with_grads = false;
  auto m = make_model(cfg, mo);
  m->init_random(4);
  Rng r(5);
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) m->host_params()[s.offset + i] += (s.shape.ndim == 1 ? 0.2f : 0.05f) * r.normal();
  BatchDecoderOptions o;
  o.block_size = 64;
  o.num_blocks = 8;
  auto cpu = make_batch_decoder(cfg, m->host_params(), o);
  o.cuda = true;
  auto gpu = make_batch_decoder(cfg, m->host_params(), o);
  const int V = cfg.vocab_size;
  std::vector<int32_t> a(80), b(12), c;
  for (auto& t : a) t = int32_t(r.below(uint64_t(V)));
  for (auto& t : b) t = int32_t(r.below(uint64_t(V)));
  c.assign(a.begin(), a.begin() + 64);  // shares a's first block
  for (int i = 0; i < 24; i++) c.push_back(int32_t(r.below(uint64_t(V))));
  const std::vector<int32_t> ba = {5, 2}, bb = {7}, bc = {5, 0};
  struct S {
    const std::vector<int32_t>* t;
    const std::vector<int32_t>* blocks;
    int prompt, start, past;
  };
  std::vector<S> seqs = {{&a, &ba, 70, 0, 0}, {&b, &bb, 4, 1, 0}, {&c, &bc, 84, 3, 64}};
  for (int step = 0; step < 10; step++) {
    std::vector<BatchRow> rows;
    std::vector<S*> who;
    for (S& s : seqs) {
      if (step < s.start || s.past >= int(s.t->size())) continue;
      rows.push_back({s.t->data() + s.past, s.past < s.prompt ? s.prompt - s.past : 1, s.past, s.blocks->data(),
                      int(s.blocks->size())});
      who.push_back(&s);
    }
    if (rows.empty()) break;
    const float* lc = cpu->forward(rows);
    const std::vector<float> want(lc, lc + rows.size() * size_t(V));
    const float* lg = gpu->forward(rows);
    for (size_t i = 0; i < rows.size(); i++) {
      double scale = 0;
      for (int v = 0; v < V; v++) scale = std::max(scale, std::fabs(double(want[i * V + v])));
      for (int v = 0; v < V; v++)
        ASSERT_NEAR(lg[i * V + v], want[i * V + v], 0.05 * scale + 1e-3)
            << "step " << step << " row " << i << " (past " << rows[i].past << ", n " << rows[i].n << ") logit " << v;
      who[i]->past += rows[i].n;
    }
  }
}
