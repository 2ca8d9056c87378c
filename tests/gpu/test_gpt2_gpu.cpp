// The GPU model and decoder against the CPU ones (which are checked against PyTorch and finite differences):
// a bf16 forward/backward of a small GPT-2 must agree with the fp32 CPU model within bf16 accuracy, for
// fixed rows and for packed sequences; the GPU decoder's logits must follow the CPU decoder's, and the
// CUDA-graph decode step must give exactly what the eager step gives.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "tests/gpt2_compat.h"
#include "train/optimizer.h"
#include "models/gpt2_cuda_decoder.h"
#include "infer/sampler.h"
#include "tests/gpt2_compat.h"
#include "models/gpt2_cuda.h"
#include "tests/gpu/gpu_test_util.h"
#ifdef KILN_TEST_EMULATED
#include "kernels/cuda/emu/simt_emu.h"
#endif

namespace kiln {
namespace {

GPT2Config small_config() {
  GPT2Config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 128;  // head_dim 64
  c.vocab_size = 250;  // not a multiple of 64: the logits' padded stride is exercised
  c.n_positions = 64;
  return c;
}

// ||a - b|| / ||b|| over a range.
double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Inputs {
  std::vector<int32_t> tokens, targets, pos, cu;
};

Inputs make_inputs(int N, int V, uint64_t seed, const std::vector<int32_t>& cu = {}) {
  Rng r(seed);
  Inputs in;
  for (int i = 0; i < N; i++) {
    in.tokens.push_back(int32_t(r.below(uint64_t(V))));
    in.targets.push_back(int32_t(r.below(uint64_t(V))));
  }
  in.targets[5] = -1;
  in.cu = cu;
  in.pos.resize(size_t(N));
  if (cu.empty()) return in;
  for (size_t s = 0; s + 1 < cu.size(); s++)
    for (int i = cu[s]; i < cu[s + 1]; i++) in.pos[size_t(i)] = i - cu[s];
  return in;
}

// Loss and every parameter gradient on the CPU (fp32) and on the GPU (bf16), same weights and batch.
void compare_step(const Inputs& in, int B, int T) {
  const GPT2Config cfg = small_config();
  const int64_t N = int64_t(in.tokens.size());
  GPT2 cpu(cfg);
  cpu.init_random(3);
  AttentionParams ap = cfg.attention(B, T);
  if (!in.cu.empty()) {
    ap.cu_seqlens = in.cu.data();
    ap.num_seqs = int(in.cu.size()) - 1;
  }
  cpu.plan(B, T);
  cpu.zero_grad();
  const float gs = 1.0f / float(N);
  const double loss_cpu = cpu.forward(in.tokens.data(), in.pos.data(), in.targets.data(), ap, gs);
  cpu.backward(in.tokens.data(), in.pos.data());

  GPT2Cuda gpu_model(cfg, cpu.table());
  gpu_model.upload_params(cpu.params());
  gpu_model.plan(N);
  const double loss_gpu = gpu_model.forward(in.tokens.data(), in.pos.data(), in.targets.data(), N, ap, gs);
  gpu_model.backward();
  EXPECT_NEAR(loss_gpu / double(N), loss_cpu / double(N), 0.01 * loss_cpu / double(N));

  std::vector<float> g(cpu.num_floats());
  gpu_model.download_grads(g.data());
  double sq = 0;
  for (size_t i = 0; i < cpu.num_floats(); i++) sq += double(cpu.grads()[i]) * cpu.grads()[i];
  std::unique_ptr<nn::Backend> be = nn::make_cuda_backend();
  AdamW opt(cpu.table(), AdamWConfig{}, be.get());
  EXPECT_NEAR(opt.grad_norm(gpu_model.blocks(be.get()), 1.0f), std::sqrt(sq), 0.03 * std::sqrt(sq));
  for (const ParamSpec& s : cpu.table().specs) {
    // The attention key bias has an exactly-zero gradient (softmax is shift-invariant per query): only noise.
    if (s.name.find("c_attn.bias") != std::string::npos) continue;
    EXPECT_LT(rel_l2(g.data() + s.offset, cpu.grads() + s.offset, size_t(s.numel())), 0.05) << s.name;
  }
}

TEST(GpuGPT2, ForwardBackwardTracksCpuFp32) {
  KILN_REQUIRE_GPU();
  const int B = 2, T = 32;
  compare_step(make_inputs(B * T, small_config().vocab_size, 4), B, T);
}

TEST(GpuGPT2, PackedSequencesTrackCpuFp32) {
  KILN_REQUIRE_GPU();
  compare_step(make_inputs(64, small_config().vocab_size, 5, {0, 1, 23, 50, 64}), 1, 64);
}

// A randomly initialised model on the host and its GPU copy, planned for max_tokens.
struct GpuModel {
  GPT2 host;
  std::unique_ptr<GPT2Cuda> dev;
  size_t plan_bytes = 0;
  GpuModel(const GPT2Config& cfg, uint64_t seed, int64_t max_tokens, bool recompute = false) : host(cfg, false) {
    host.init_random(seed);
    dev = std::make_unique<GPT2Cuda>(cfg, host.table());
    dev->upload_params(host.params());
    plan_bytes = dev->plan(max_tokens, recompute);
  }
};

// --recompute block on the GPU: each block's forward re-runs in the backward from its saved input; the
// gradients equal those of the run that kept every activation (up to the order of attention's dQ atomics),
// from far fewer activation bytes.
TEST(GpuGPT2, BlockRecomputationGivesTheSameGradients) {
  KILN_REQUIRE_GPU();
  GPT2Config cfg = small_config();
  cfg.n_layer = 3;
  const int B = 2, T = 32;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 11);
  std::vector<float> g[2];
  double loss[2];
  size_t bytes[2];
  for (int r = 0; r < 2; r++) {
    GpuModel gm(cfg, 6, B * T, /*recompute=*/r == 1);
    bytes[r] = gm.plan_bytes;
    loss[r] = gm.dev->forward(in.tokens.data(), in.pos.data(), in.targets.data(), B * T, cfg.attention(B, T), 0.01f);
    gm.dev->backward();
    g[r].resize(gm.host.num_floats());
    gm.dev->download_grads(g[r].data());
  }
  EXPECT_EQ(loss[0], loss[1]);
  EXPECT_LT(rel_l2(g[1].data(), g[0].data(), g[0].size()), 1e-5);
  EXPECT_LT(double(bytes[1]), 0.75 * double(bytes[0]));
  EXPECT_EQ(bytes[1], GPT2Cuda::plan_bytes(cfg, B * T, true));
}

#ifdef KILN_TEST_EMULATED

// After the plan, whole training steps (forward, backward, norm, AdamW) allocate no device memory.
TEST(GpuGPT2, StepsAllocateNothingAfterThePlan) {
  KILN_REQUIRE_GPU();
  const GPT2Config cfg = small_config();
  const int B = 2, T = 32;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 8);
  GpuModel g(cfg, 2, B * T);
  GPT2Cuda& m = *g.dev;
  const AttentionParams ap = cfg.attention(B, T);
  std::unique_ptr<nn::Backend> be = nn::make_cuda_backend();
  const ParamTable table = gpt2_table(cfg);
  AdamW opt(table, AdamWConfig{}, be.get());
  auto step = [&](int t) {
    m.forward(in.tokens.data(), in.pos.data(), in.targets.data(), B * T, ap, 1.0f / float(B * T));
    m.backward();
    opt.update(m.blocks(be.get()), 1e-3f, t, opt.grad_norm(m.blocks(be.get()), 1.0f), 1.0f);
  };
  step(1);  // first use of the matmul plans and their workspace
  const int64_t before = emu::malloc_count();
  for (int t = 2; t <= 4; t++) step(t);
  EXPECT_EQ(emu::malloc_count(), before);
}

// The attention kernels' shared-memory tiles are laid out so that every ldmatrix reads its 8 rows from 8
// disjoint bank groups (padded rows): a whole training step and a decode step incur no bank conflict.
TEST(GpuGPT2, TensorCoreTilesHaveNoBankConflicts) {
  KILN_REQUIRE_GPU();
  const GPT2Config cfg = small_config();
  const int B = 2, T = 48;
  Inputs in = make_inputs(B * T, cfg.vocab_size, 9);
  GpuModel g(cfg, 4, B * T);
  GPT2Cuda& m = *g.dev;
  const int64_t before = emu::ldmatrix_bank_conflicts();
  m.forward(in.tokens.data(), in.pos.data(), in.targets.data(), B * T, cfg.attention(B, T), 1.0f / float(B * T));
  m.backward();
  CudaDecoder dec(cfg.model(), g.host.params(), 1, 0, false);
  dec.forward(in.tokens.data(), 20);
  dec.forward(in.tokens.data() + 20, 1);
  EXPECT_EQ(emu::ldmatrix_bank_conflicts() - before, 0);
}
#endif

std::vector<float> random_params(const GPT2Config& cfg) {
  GPT2 m(cfg, false);
  m.init_random(9);
  return std::vector<float>(m.params(), m.params() + m.num_floats());
}

TEST(GpuDecoder, FollowsCpuDecoderAndGraphReplayIsExact) {
  KILN_REQUIRE_GPU();
  const GPT2Config cfg = small_config();
  const auto params = random_params(cfg);
  const int V = cfg.vocab_size, prompt = 12, steps = 6;
  Inputs in = make_inputs(prompt + steps, V, 6);
  Decoder cpu(cfg, params.data());
  CudaDecoder eager(cfg.model(), params.data(), 1, 0, /*use_graph=*/false);
  CudaDecoder graph(cfg.model(), params.data(), 1, 0, /*use_graph=*/true);
  const float* lc = cpu.forward(in.tokens.data(), prompt);
  const float* le = eager.forward(in.tokens.data(), prompt);
  const float* lg = graph.forward(in.tokens.data(), prompt);
  auto check = [&](const float* c, const float* e, const float* g, int pos) {
    double scale = 0;
    for (int i = 0; i < V; i++) scale = std::max(scale, std::fabs(double(c[i])));
    for (int i = 0; i < V; i++) {
      ASSERT_NEAR(e[i], c[i], 0.05 * scale + 1e-3) << "position " << pos << " logit " << i;
      ASSERT_EQ(e[i], g[i]) << "graph replay differs at position " << pos << " logit " << i;
    }
  };
  check(lc, le, lg, prompt - 1);
  for (int t = prompt; t < prompt + steps; t++) {
    lc = cpu.forward(&in.tokens[size_t(t)], 1);
    le = eager.forward(&in.tokens[size_t(t)], 1);
    lg = graph.forward(&in.tokens[size_t(t)], 1);
    check(lc, le, lg, t);
  }
  EXPECT_EQ(graph.length(), prompt + steps);
  const int32_t bad = V;
  EXPECT_THROW(graph.forward(&bad, 1), Error);
}

// A prompt longer than one prefill chunk: FlashAttention over the first 256 positions, then the rest of the
// prompt through decode attention 16 queries at a time, then single steps.
TEST(GpuDecoder, ChunkedPrefillFollowsTheCpu) {
  KILN_REQUIRE_GPU();
  GPT2Config cfg = small_config();
  cfg.n_layer = 1;
  cfg.n_positions = 300;
  const auto params = random_params(cfg);
  const int V = cfg.vocab_size, prompt = 280;
  static_assert(CudaDecoder::kMaxChunk < 280);
  Inputs in = make_inputs(prompt + 2, V, 10);
  Decoder cpu(cfg, params.data());
  CudaDecoder dev(cfg.model(), params.data());
  for (int step = 0; step < 3; step++) {
    const int n = step == 0 ? prompt : 1;
    const int32_t* t = in.tokens.data() + (step == 0 ? 0 : prompt + step - 1);
    const float* c = cpu.forward(t, n);
    std::vector<float> lc(c, c + V);
    const float* d = dev.forward(t, n);
    double scale = 0;
    for (int i = 0; i < V; i++) scale = std::max(scale, std::fabs(double(lc[size_t(i)])));
    for (int i = 0; i < V; i++) ASSERT_NEAR(d[i], lc[size_t(i)], 0.05 * scale + 1e-3) << "step " << step << " logit " << i;
  }
  EXPECT_EQ(dev.length(), prompt + 2);
}

// Greedy decoding on the device: the ids forward_argmax returns are the arg max of the logits the same
// decoder computes (over the sampling limit), eagerly and through the captured graph.
TEST(GpuDecoder, DeviceArgmaxIsTheArgmaxOfTheLogits) {
  KILN_REQUIRE_GPU();
  const GPT2Config cfg = small_config();
  const auto params = random_params(cfg);
  const int V = cfg.vocab_size, limit = 240, prompt = 7;
  Inputs in = make_inputs(prompt + 5, V, 13);
  CudaDecoder logits_dec(cfg.model(), params.data(), 1, 0, false);
  CudaDecoder greedy_dec(cfg.model(), params.data(), 1, 0, true);
  for (int step = 0; step < 6; step++) {
    const int n = step == 0 ? prompt : 1;
    const int32_t* t = in.tokens.data() + (step == 0 ? 0 : prompt + step - 1);
    const int32_t want = argmax(logits_dec.forward(t, n), limit);
    EXPECT_EQ(greedy_dec.forward_argmax(t, n, limit)[0], want) << "step " << step;
  }
}

TEST(GpuDecoder, AllLogitsOfAPromptFollowTheCpu) {
  KILN_REQUIRE_GPU();
  const GPT2Config cfg = small_config();
  const auto params = random_params(cfg);
  const int V = cfg.vocab_size, B = 2, n = 9;
  Inputs in = make_inputs(B * n, V, 7);
  Decoder cpu(cfg, params.data(), B);
  CudaDecoder dev(cfg.model(), params.data(), B);
  const float* c = cpu.forward(in.tokens.data(), n, true);
  std::vector<float> lc(c, c + size_t(B) * n * V);
  const float* d = dev.forward(in.tokens.data(), n, true);
  for (int r = 0; r < B * n; r++) {
    double scale = 0;
    for (int i = 0; i < V; i++) scale = std::max(scale, std::fabs(double(lc[size_t(r) * V + i])));
    for (int i = 0; i < V; i++)
      ASSERT_NEAR(d[size_t(r) * V + i], lc[size_t(r) * V + i], 0.05 * scale + 1e-3) << "row " << r << " logit " << i;
  }
}

}  // namespace
}  // namespace kiln
