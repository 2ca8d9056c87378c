// The GPU model and decoder (make_model / make_decoder with --device cuda: the one Transformer composition on
// the CUDA backend) against the same composition on the CPU in fp32 (itself checked against PyTorch and finite
// differences): on the same weights, a bf16 forward/backward must agree with fp32 within bf16 accuracy, for
// GPT-2 (Conv1D weights, LayerNorm, learned positions, tied head) and for a Llama-family config that turns on
// every feature the families use (GQA, rotary with Llama 3 scaling, q/k/v biases, Qwen3's q/k norms, Mistral's
// sliding window, SwiGLU, an untied head); for fixed rows and packed sequences; under each recomputation
// policy; through AdamW steps. The GPU decoder's KV-cache logits must follow the CPU decoder's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/gpu.h"
#include "core/rng.h"
#include "infer/sampler.h"
#include "models/family.h"
#include "models/model.h"
#include "models/transformer.h"
#include "tests/gpu/gpu_test_util.h"
#include "train/optimizer.h"
#ifdef KILN_TEST_EMULATED
#include "kernels/cuda/emu/simt_emu.h"
#endif

namespace kiln {
namespace {

// GPT-2 in miniature: head_dim 64 (the GPU attention kernels take 64 and 128).
ModelConfig gpt2_config() {
  ModelConfig c;
  c.family = "gpt2";
  c.n_layer = 2;
  c.d_model = 128;
  c.n_head = 2;
  c.n_kv_head = 2;
  c.head_dim = 64;
  c.d_ff = 512;
  c.vocab_size = 250;  // not a multiple of 64: the logits' padded stride is exercised
  c.max_positions = 64;
  c.qkv_bias = c.attn_out_bias = c.ffn_bias = true;
  c.layout = WeightLayout::InOut;
  return c;
}

// Every Llama-family feature at once (the table follows the flags, whatever the family's name).
ModelConfig llama_config() {
  ModelConfig c;
  c.family = "qwen3";
  c.n_layer = 2;
  c.d_model = 128;
  c.n_head = 4;
  c.n_kv_head = 2;     // GQA
  c.head_dim = 64;     // q_dim 256 != d_model
  c.d_ff = 192;
  c.vocab_size = 250;
  c.max_positions = 64;
  c.norm = NormKind::RMSNorm;
  c.norm_bias = false;
  c.norm_eps = 1e-6f;
  c.positions = PositionKind::Rotary;
  c.rope_theta = 500000.0;
  c.rope_scaling.kind = RopeScaling::Llama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.original_max_positions = 16;  // the tiny context spans all three frequency bands
  c.qkv_bias = true;
  c.qk_norm = true;
  c.sliding_window = 8;
  c.gated_ffn = true;
  c.activation = Activation::Silu;
  c.tie_embeddings = false;
  return c;
}

struct Inputs {
  std::vector<int32_t> tokens, targets, pos, cu;
};

Inputs make_inputs(int N, int V, uint64_t seed, const std::vector<int32_t>& cu = {}, int T = 0) {
  Rng r(seed);
  Inputs in;
  for (int i = 0; i < N; i++) {
    in.tokens.push_back(int32_t(r.below(uint64_t(V))));
    in.targets.push_back(int32_t(r.below(uint64_t(V))));
  }
  in.targets[5] = -1;
  in.cu = cu;
  in.pos.resize(size_t(N));
  if (cu.empty()) {
    for (int i = 0; i < N; i++) in.pos[size_t(i)] = T ? i % T : i;
    return in;
  }
  for (size_t s = 0; s + 1 < cu.size(); s++)
    for (int i = cu[s]; i < cu[s + 1]; i++) in.pos[size_t(i)] = i - cu[s];
  return in;
}

// Random weights; the 1-D tensors (norm gains, biases) moved off 1 and 0 so that they matter.
void init_weights(Model& m, uint64_t seed) {
  m.init_random(seed);
  Rng r(seed + 100);
  float* p = m.host_params();
  for (const ParamSpec& s : m.table().specs) {
    if (s.shape.ndim != 1) continue;
    for (int64_t i = 0; i < s.numel(); i++) p[s.offset + size_t(i)] += 0.1f * r.normal();
  }
  m.params_changed();
}

std::unique_ptr<Model> gpu_model(const ModelConfig& cfg, const Model& from_weights_of) {
  ModelOptions o;
  o.cuda = true;
  auto m = make_model(cfg, o);
  Model& src = const_cast<Model&>(from_weights_of);
  std::copy(src.host_params(), src.host_params() + src.table().total, m->host_params());
  m->params_changed();
  return m;
}

std::vector<float> device_grads(Model& m) {
  const ParamBlocks b = m.blocks();
  std::vector<float> g(b.n);
  gpu::copy_to_host(g.data(), b.grads, b.n * sizeof(float));
  return g;
}

AttentionParams attention_of(const Model& m, const Inputs& in, int B, int T) {
  AttentionParams ap = m.attention(B, T);
  if (!in.cu.empty()) {
    ap.cu_seqlens = in.cu.data();
    ap.num_seqs = int(in.cu.size()) - 1;
  }
  return ap;
}

// Loss and every parameter gradient on the CPU (fp32) and on the GPU (bf16), same weights and batch.
void compare_step(const ModelConfig& cfg, const Inputs& in, int B, int T) {
  const int64_t N = int64_t(in.tokens.size());
  auto cpu = make_model(cfg);
  init_weights(*cpu, 3);
  auto gpu = gpu_model(cfg, *cpu);
  const AttentionParams ap = attention_of(*cpu, in, B, T);
  const float gs = 1.0f / float(N);
  cpu->plan(B, T);
  cpu->zero_grad();
  const double loss_cpu = cpu->forward(in.tokens.data(), in.pos.data(), in.targets.data(), ap, gs);
  cpu->backward();
  gpu->plan(B, T);
  gpu->zero_grad();
  const double loss_gpu = gpu->forward(in.tokens.data(), in.pos.data(), in.targets.data(), ap, gs);
  gpu->backward();
  EXPECT_NEAR(loss_gpu / double(N), loss_cpu / double(N), 0.01 * loss_cpu / double(N));

  const std::vector<float> g = device_grads(*gpu);
  const float* gc = cpu->blocks().grads;
  double sq = 0;
  for (size_t i = 0; i < g.size(); i++) sq += double(gc[i]) * gc[i];
  AdamW opt(gpu->table(), AdamWConfig{}, gpu->blocks().backend);
  EXPECT_NEAR(opt.grad_norm(gpu->blocks(), 1.0f), std::sqrt(sq), 0.03 * std::sqrt(sq));
  for (const ParamSpec& s : cpu->table().specs) {
    // Without q/k norms the key bias has an exactly-zero gradient (softmax is shift-invariant per query): noise.
    if (s.name.find("c_attn.bias") != std::string::npos || (!cfg.qk_norm && s.key.find("attn_k.bias") != std::string::npos))
      continue;
    EXPECT_LT(test::rel_l2(g.data() + s.offset, gc + s.offset, size_t(s.numel())), 0.05) << s.key;
  }
}

TEST(GpuGPT2, ForwardBackwardTracksCpuFp32) {
  KILN_REQUIRE_GPU();
  const int B = 2, T = 32;
  compare_step(gpt2_config(), make_inputs(B * T, 250, 4, {}, T), B, T);
}

TEST(GpuGPT2, PackedSequencesTrackCpuFp32) {
  KILN_REQUIRE_GPU();
  compare_step(gpt2_config(), make_inputs(64, 250, 5, {0, 1, 23, 50, 64}), 1, 64);
}

TEST(GpuLlama, ForwardBackwardTracksCpuFp32) {
  KILN_REQUIRE_GPU();
  const int B = 2, T = 24;
  compare_step(llama_config(), make_inputs(B * T, 250, 14, {}, T), B, T);
}

TEST(GpuLlama, PackedSequencesTrackCpuFp32) {
  KILN_REQUIRE_GPU();
  compare_step(llama_config(), make_inputs(48, 250, 15, {0, 20, 21, 48}), 1, 48);
}

// Each recomputation policy on the GPU re-runs the same kernels on the same inputs: the loss and gradients equal
// those of the run that kept every activation, from fewer activation bytes.
void recompute_policies_agree(ModelConfig cfg) {
  cfg.n_layer = 3;
  const int B = 1, T = 16;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 11, {}, T);
  auto host = make_model(cfg);
  init_weights(*host, 6);
  const char* policies[] = {"none", "selective", "block", "every:2"};
  std::vector<float> g0;
  double loss0 = 0;
  size_t bytes0 = 0;
  for (const char* name : policies) {
    const RecomputePolicy pol = RecomputePolicy::parse(name);
    auto m = gpu_model(cfg, *host);
    const size_t bytes = m->plan(B, T, pol);
    EXPECT_EQ(bytes, Transformer::plan_bytes(cfg, B * T, pol, 0, /*device=*/true)) << name;
    m->zero_grad();
    const double loss = m->forward(in.tokens.data(), in.pos.data(), in.targets.data(), m->attention(B, T), 0.01f);
    m->backward();
    const std::vector<float> g = device_grads(*m);
    if (pol.kind == RecomputePolicy::None) {
      g0 = g, loss0 = loss, bytes0 = bytes;
      continue;
    }
    EXPECT_EQ(loss, loss0) << name;
    EXPECT_LT(test::rel_l2(g.data(), g0.data(), g0.size()), 1e-5) << name;
    EXPECT_LT(bytes, bytes0) << name;
  }
  // The LM head 5 rows at a time (the loss gradient of each chunk as it exists): the same values, the head's
  // weight gradient summed over the chunks in another order.
  auto m = gpu_model(cfg, *host);
  m->plan(B, T, {}, 5);
  m->zero_grad();
  const double loss = m->forward(in.tokens.data(), in.pos.data(), in.targets.data(), m->attention(B, T), 0.01f);
  m->backward();
  EXPECT_NEAR(loss, loss0, 1e-5 * loss0);
  const std::vector<float> g = device_grads(*m);
  EXPECT_LT(test::rel_l2(g.data(), g0.data(), g0.size()), 1e-4);
}

TEST(GpuGPT2, RecomputationPoliciesGiveTheSameGradients) {
  KILN_REQUIRE_GPU();
  recompute_policies_agree(gpt2_config());
}

TEST(GpuLlama, RecomputationPoliciesGiveTheSameGradients) {
  KILN_REQUIRE_GPU();
  recompute_policies_agree(llama_config());
}

// AdamW steps on the device (moments there, the bf16 copy refreshed by the fused kernel) follow the CPU's fp32
// steps: the losses along the way and the weights brought back by sync_to_host.
void adamw_steps_track(const ModelConfig& cfg) {
  const int B = 2, T = 16, steps = 3;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 21, {}, T);
  auto cpu = make_model(cfg);
  init_weights(*cpu, 8);
  const std::vector<float> init(cpu->host_params(), cpu->host_params() + cpu->table().total);
  auto gpu = gpu_model(cfg, *cpu);
  cpu->plan(B, T);
  gpu->plan(B, T);
  AdamWConfig ac;
  AdamW opt_cpu(cpu->table(), ac, cpu->blocks().backend), opt_gpu(gpu->table(), ac, gpu->blocks().backend);
  const AttentionParams ap = cpu->attention(B, T);
  const float gs = 1.0f / float(B * T);
  for (int t = 1; t <= steps; t++) {
    double loss[2];
    Model* models[2] = {cpu.get(), gpu.get()};
    AdamW* opts[2] = {&opt_cpu, &opt_gpu};
    for (int k = 0; k < 2; k++) {
      models[k]->zero_grad();
      loss[k] = models[k]->forward(in.tokens.data(), in.pos.data(), in.targets.data(), ap, gs);
      models[k]->backward();
      const ParamBlocks b = models[k]->blocks();
      opts[k]->update(b, 3e-3f, t, opts[k]->grad_norm(b, 1.0f), 1.0f);
    }
    EXPECT_NEAR(loss[1], loss[0], 0.01 * loss[0]) << "step " << t;
  }
  // The weights moved the same way: the change each made, compared.
  gpu->sync_to_host();
  std::vector<float> dc(init.size()), dg(init.size());
  for (size_t i = 0; i < init.size(); i++) {
    dc[i] = cpu->host_params()[i] - init[i];
    dg[i] = gpu->host_params()[i] - init[i];
  }
  EXPECT_LT(test::rel_l2(dg.data(), dc.data(), dc.size()), 0.25);
}

TEST(GpuGPT2, AdamWStepsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  adamw_steps_track(gpt2_config());
}

TEST(GpuLlama, AdamWStepsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  adamw_steps_track(llama_config());
}

// The GPU's activation plan as kiln memory reports it: the workspace the model allocates, plus the ops' scratch.
TEST(GpuLlama, MemoryPlanCoversTheModelsWorkspace) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = llama_config();
  ModelOptions o;
  o.cuda = true;
  auto m = make_model(cfg, o);
  const size_t ws = m->plan(2, 16, RecomputePolicy::parse("selective"));
  const MemoryPlan p = plan_memory(cfg, true, 32, RecomputePolicy::parse("selective"), 0);
  EXPECT_GT(p.activations, ws);
  EXPECT_EQ(p.activations - ws, nn::make_cuda_backend()->scratch_bytes(training_scratch(cfg, 32)));
}

// Shapes the GPU kernels do not take are refused when the model or decoder is made, in one line naming the field.
TEST(GpuLlama, UnsupportedShapesFailInOneLine) {
  KILN_REQUIRE_GPU();
  ModelConfig cfg = llama_config();
  cfg.head_dim = 32;
  ModelOptions o;
  o.cuda = true;
  DecoderOptions d;
  d.cuda = true;
  const std::vector<float> params(model_param_table(cfg).total, 0.0f);
  for (int k = 0; k < 2; k++) {
    try {
      if (k == 0) make_model(cfg, o);
      else make_decoder(cfg, params.data(), d);
      ADD_FAILURE() << "head_dim 32 accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("head_dim"), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
}

#ifdef KILN_TEST_EMULATED

// After the plan, whole training steps (forward, backward, norm, AdamW) allocate no device memory.
TEST(GpuGPT2, StepsAllocateNothingAfterThePlan) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {gpt2_config(), llama_config()}) {
    const int B = 1, T = 16;
    Inputs in = make_inputs(B * T, cfg.vocab_size, 8, {}, T);
    ModelOptions o;
    o.cuda = true;
    auto m = make_model(cfg, o);
    init_weights(*m, 2);
    m->plan(B, T);
    const AttentionParams ap = m->attention(B, T);
    AdamW opt(m->table(), AdamWConfig{}, m->blocks().backend);
    auto step = [&](int t) {
      m->forward(in.tokens.data(), in.pos.data(), in.targets.data(), ap, 1.0f / float(B * T));
      m->backward();
      opt.update(m->blocks(), 1e-3f, t, opt.grad_norm(m->blocks(), 1.0f), 1.0f, /*zero_grads=*/true);
    };
    step(1);  // first use of the matmul plans, their workspace and the norm's scratch
    const int64_t before = emu::malloc_count();
    step(2);
    EXPECT_EQ(emu::malloc_count(), before) << cfg.family;
  }
}

// The attention kernels' shared-memory tiles are laid out so that every ldmatrix reads its 8 rows from 8
// disjoint bank groups (padded rows): a whole training step and a decode step incur no bank conflict.
TEST(GpuGPT2, TensorCoreTilesHaveNoBankConflicts) {
  KILN_REQUIRE_GPU();
  const ModelConfig cfg = gpt2_config();
  const int B = 2, T = 48;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 9, {}, T);
  ModelOptions o;
  o.cuda = true;
  auto m = make_model(cfg, o);
  init_weights(*m, 4);
  m->plan(B, T);
  const int64_t before = emu::ldmatrix_bank_conflicts();
  m->forward(in.tokens.data(), in.pos.data(), in.targets.data(), m->attention(B, T), 1.0f / float(B * T));
  m->backward();
  DecoderOptions d;
  d.cuda = true;
  auto dec = make_decoder(cfg, m->host_params(), d);
  dec->forward(in.tokens.data(), 20);
  dec->forward(in.tokens.data() + 20, 1);
  EXPECT_EQ(emu::ldmatrix_bank_conflicts() - before, 0);
}
#endif

// ---- decoding ----

std::vector<float> random_params(const ModelConfig& cfg, uint64_t seed = 9) {
  auto m = make_model(cfg, ModelOptions{false, std::nullopt, false});
  init_weights(*m, seed);
  return std::vector<float>(m->host_params(), m->host_params() + m->table().total);
}

std::unique_ptr<IncrementalDecoder> decoder(const ModelConfig& cfg, const std::vector<float>& params, bool cuda,
                                            int batch = 1, bool graph = true) {
  DecoderOptions o;
  o.cuda = cuda;
  o.batch = batch;
  o.cuda_graph = graph;
  return make_decoder(cfg, params.data(), o);
}

// A prompt through FlashAttention (longer than the sliding window), then single steps through the KV cache:
// the eager GPU decoder follows the CPU's logits, and the CUDA-graph step replays exactly the eager one.
TEST(GpuDecoder, FollowsTheCpuDecoderAndGraphReplayIsExact) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {gpt2_config(), llama_config()}) {
    const auto params = random_params(cfg);
    const int V = cfg.vocab_size, prompt = 12, steps = 6;  // prompt > the sliding window of 8
    Inputs in = make_inputs(prompt + steps, V, 6);
    auto cpu = decoder(cfg, params, false), eager = decoder(cfg, params, true, 1, false),
         graph = decoder(cfg, params, true, 1, true);
    for (int t = 0; t < prompt + steps; t = t == 0 ? prompt : t + 1) {
      const int n = t == 0 ? prompt : 1;
      const std::string where = cfg.family + " position " + std::to_string(t + n - 1);
      const float* c = cpu->forward(&in.tokens[size_t(t)], n);
      const std::vector<float> lc(c, c + V);
      const float* e = eager->forward(&in.tokens[size_t(t)], n);
      const std::vector<float> le(e, e + V);
      const float* g = graph->forward(&in.tokens[size_t(t)], n);
      test::expect_close(le.data(), lc.data(), V, where);
      for (int i = 0; i < V; i++) ASSERT_EQ(g[i], le[size_t(i)]) << "graph replay differs at " << where << " logit " << i;
    }
    EXPECT_EQ(graph->length(), prompt + steps);
    const int32_t bad = V;
    EXPECT_THROW(graph->forward(&bad, 1), Error);
    EXPECT_EQ(graph->length(), prompt + steps);
  }
}

// A prompt longer than one prefill chunk: FlashAttention over the first 256 positions, then the rest of the
// prompt through decode attention 16 queries at a time, then single steps.
TEST(GpuDecoder, ChunkedPrefillFollowsTheCpu) {
  KILN_REQUIRE_GPU();
  ModelConfig cfg = llama_config();
  cfg.n_layer = 1;
  cfg.max_positions = 300;
  const auto params = random_params(cfg);
  const int V = cfg.vocab_size, prompt = 280;
  static_assert(TransformerDecoder::kMaxChunk < 280);
  Inputs in = make_inputs(prompt + 2, V, 10);
  auto cpu = decoder(cfg, params, false), dev = decoder(cfg, params, true);
  for (int step = 0; step < 3; step++) {
    const int n = step == 0 ? prompt : 1;
    const int32_t* t = in.tokens.data() + (step == 0 ? 0 : prompt + step - 1);
    const float* c = cpu->forward(t, n);
    std::vector<float> lc(c, c + V);
    test::expect_close(dev->forward(t, n), lc.data(), V, "step " + std::to_string(step));
  }
  EXPECT_EQ(dev->length(), prompt + 2);
}

// Greedy decoding: the ids forward_argmax returns on the device (through the captured step) are the arg max of
// the logits the eager decoder computes, and they are the CPU decoder's greedy tokens for as long as the CPU's choice is clear of bf16's error.
TEST(GpuDecoder, GreedyTokensMatchTheCpu) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {gpt2_config(), llama_config()}) {
    const auto params = random_params(cfg, 17);
    const int V = cfg.vocab_size, limit = 240, prompt = 7;
    Inputs in = make_inputs(prompt, V, 13);
    auto cpu = decoder(cfg, params, false), logits_dec = decoder(cfg, params, true, 1, /*graph=*/false),
         greedy = decoder(cfg, params, true);  // its steps through the captured graph
    std::vector<int32_t> tc(in.tokens), tg(in.tokens);
    bool diverged = false;
    int compared = 0;
    for (int step = 0; step < 8; step++) {
      const int n = step == 0 ? prompt : 1;
      const int at = step == 0 ? 0 : prompt + step - 1;
      const int32_t want_dev = argmax(logits_dec->forward(tg.data() + at, n), limit);
      const int32_t got = greedy->forward_argmax(tg.data() + at, n, limit)[0];
      EXPECT_EQ(got, want_dev) << cfg.family << " step " << step;
      const float* c = cpu->forward(tc.data() + at, n);
      const int32_t want_cpu = argmax(c, limit);
      // The CPU's margin between its best and second-best id, against the logits' scale.
      double best = -1e30, second = -1e30, scale = 0;
      for (int i = 0; i < limit; i++) {
        scale = std::max(scale, std::fabs(double(c[i])));
        if (i == want_cpu) best = c[i];
        else second = std::max(second, double(c[i]));
      }
      if (!diverged && best - second > 0.05 * scale) {
        EXPECT_EQ(got, want_cpu) << cfg.family << " step " << step;
        compared++;
      } else {
        diverged = true;  // the sequences may part from here on
      }
      tc.push_back(want_cpu);
      tg.push_back(got);
    }
    EXPECT_GT(compared, 0) << cfg.family;
  }
}

TEST(GpuDecoder, AllLogitsOfAPromptFollowTheCpu) {
  KILN_REQUIRE_GPU();
  for (const ModelConfig& cfg : {gpt2_config(), llama_config()}) {
    const auto params = random_params(cfg);
    const int V = cfg.vocab_size, B = 2, n = 9;
    Inputs in = make_inputs(B * n, V, 7);
    auto cpu = decoder(cfg, params, false, B), dev = decoder(cfg, params, true, B);
    const float* c = cpu->forward(in.tokens.data(), n, true);
    std::vector<float> lc(c, c + size_t(B) * n * V);
    const float* d = dev->forward(in.tokens.data(), n, true);
    for (int r = 0; r < B * n; r++)
      test::expect_close(d + size_t(r) * V, lc.data() + size_t(r) * V, V, cfg.family + " row " + std::to_string(r));
    // Then a batched step through the cache.
    const int32_t next[2] = {3, 4};
    c = cpu->forward(next, 1);
    lc.assign(c, c + size_t(B) * V);
    d = dev->forward(next, 1);
    for (int b = 0; b < B; b++) test::expect_close(d + b * V, lc.data() + b * V, V, cfg.family + " batched step");
  }
}

}  // namespace
}  // namespace kiln
