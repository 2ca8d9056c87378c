// MTP self-drafting on the GPU decoder (models/transformer_mtp.cpp on the CUDA backend): with two chained modules,
// each draft's logits follow the CPU decoder's (itself checked against the training forward, tests/
// test_mtp_decode.cpp) within bf16 accuracy, through a round after the prompt, a rejection (entries that read a
// rejected draft run again), an acceptance and a round of one draft (module 2 catches up over two positions).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/family.h"
#include "models/model.h"
#include "tests/gpu/gpu_test_util.h"

namespace kiln {
namespace {

TEST(GpuMTP, ChainedDraftsFollowTheCpu) {
  KILN_REQUIRE_GPU();
  // Latent attention with the GPU kernels' dims (qk 48 + 16 = 64, v 32), two MTP modules.
  const ModelConfig cfg = parse_model_config(
      R"({"model_type":"deepseek_v3","hidden_size":64,"num_attention_heads":2,"num_hidden_layers":1,
          "intermediate_size":96,"vocab_size":96,"max_position_embeddings":64,"rms_norm_eps":1e-6,
          "q_lora_rank":32,"kv_lora_rank":32,"qk_nope_head_dim":48,"qk_rope_head_dim":16,"v_head_dim":32,
          "num_nextn_predict_layers":2,"hidden_act":"silu","tie_word_embeddings":false})",
      "gpu_mtp/config.json");
  auto m = make_model(cfg, ModelOptions{false, std::nullopt, false});
  m->init_random(21);
  Rng r(22);
  float* p = m->host_params();
  for (const ParamSpec& s : m->table().specs)
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + i] = s.shape.ndim == 1 ? p[s.offset + i] + 0.1f * r.normal()
                                                                                 : p[s.offset + i] * 2.0f;
  const int V = cfg.vocab_size;
  std::vector<int32_t> t(16);
  for (int32_t& x : t) x = int32_t(r.below(uint64_t(V)));
  DecoderOptions o;
  auto cpu = make_decoder(cfg, p, o);
  o.cuda = true;
  auto gpu = make_decoder(cfg, p, o);
  ASSERT_EQ(gpu->self_draft_depth(), 2);
  int compared = 0;
  auto both = [&](auto&& step, const std::string& where) {
    const float* c = step(*cpu);
    const std::vector<float> want(c, c + V);
    const float* g = step(*gpu);
    double scale = 0;
    for (float x : want) scale = std::max(scale, std::fabs(double(x)));
    for (int i = 0; i < V; i++) ASSERT_NEAR(g[i], want[size_t(i)], 0.05 * scale + 1e-3) << where << " logit " << i;
    compared++;
  };
  auto draft = [&](int k, int32_t token, const std::string& where) {
    both([&](IncrementalDecoder& d) { return d.self_draft(k, token); }, where + ", draft " + std::to_string(k));
  };
  auto feed = [&](const std::vector<int32_t>& x) {
    for (IncrementalDecoder* d : {cpu.get(), gpu.get()}) d->forward(x.data(), int(x.size()), true);
  };
  feed({t[0], t[1], t[2], t[3], t[4]});
  draft(1, t[5], "after the prompt");
  draft(2, t[6], "after the prompt");
  feed({t[5], t[6], t[7]});  // verification; keep t5 only (draft 1 rejected)
  cpu->truncate(6), gpu->truncate(6);
  draft(1, t[6], "after a rejection");
  draft(2, t[7], "after a rejection");
  feed({t[6], t[7], t[8]});  // both accepted
  draft(1, t[9], "after an acceptance");
  feed({t[9]});
  feed({t[10]});
  draft(1, t[11], "catching up");
  draft(2, t[12], "catching up");
  EXPECT_EQ(compared, 7);
}

}  // namespace
}  // namespace kiln
