// The RealNVP / NICE flow on the GPU backend (models/realnvp.h: the couplings' MLPs in bf16 on the device, the
// elementwise layers of kernels/flow.h fp32 there too) against the same flow on the CPU in fp32 (itself checked against PyTorch
// and finite differences in tests/test_realnvp.cpp): on the same weights, images and dequantisation noise the
// bits/dim, every parameter gradient and a few AdamW steps must agree within bf16 accuracy, sampling (the
// inverse) must match the CPU's on the same latents, and inverse(forward(x)) = x on the device. bf16 rounds each
// MLP input and product to 8 bits of mantissa (relative 2^-9 ≈ 0.2%), so fp32 agreement is not to be had; the
// tolerances below are a few times what the emulator shows (printed). Tiny flows: seconds on the emulator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/image_model.h"
#include "models/realnvp.h"
#include "tests/gpu/gpu_test_util.h"
#include "train/optimizer.h"

namespace kiln {
namespace {

// 4×4 images, one scale (a squeeze to 4×2×2, two channel couplings, a factor-out), two checkerboard couplings
// on either side: every layer kind, with MLPs of two hidden layers.
std::string tiny_json(bool additive) {
  RealNVPConfig c;
  c.image_size = 4, c.channels = 1, c.scales = 1, c.couplings = 2, c.final_couplings = 2, c.hidden = 32, c.depth = 2;
  c.additive = additive;
  return c.to_json();
}

struct Pair {
  std::unique_ptr<ImageModel> cpu, gpu;
};

// The same weights on both: the family's initialisation, then every value moved by N(0, 0.05²) so that the zero
// output layers do not hide the couplings; the actnorms marked initialised (both start from these weights).
Pair make_pair(bool additive, int B) {
  ImageModelOptions c, g;
  g.cuda = true, g.lowp = LowpType::BF16;
  const std::string json = tiny_json(additive);
  Pair p{make_image_model(json, "test", c), make_image_model(json, "test", g)};
  p.cpu->init_random(3), p.gpu->init_random(3);  // also the training dequantisation generator
  Rng r(11);
  float* h = p.cpu->host_params();
  for (size_t i = 0; i < p.cpu->table().total; i++) h[i] += 0.05f * r.normal();
  h[p.cpu->table().find("actnorm_initialized")->offset] = 1.0f;
  p.cpu->params_changed();
  std::copy_n(h, p.cpu->table().total, p.gpu->host_params());
  p.gpu->params_changed();
  p.cpu->plan(B), p.gpu->plan(B);
  return p;
}

std::vector<float> images(int B, int64_t P, uint64_t seed) {
  Rng r(seed);
  std::vector<float> x(size_t(B * P));
  for (float& v : x) v = std::round(127.5f * std::tanh(r.normal())) / 127.5f;  // on the 8-bit grid
  return x;
}

std::vector<float> grads_of(ImageModel& m) {
  const ParamBlocks b = m.blocks();
  std::vector<float> g(b.n);
  b.backend->download(g.data(), b.grads, b.n * 4);
  return g;
}

void check_loss_and_grads(bool additive) {
  const int B = 4;
  Pair p = make_pair(additive, B);
  const int64_t P = p.cpu->pixels();
  const std::vector<float> x = images(B, P, 5);
  const double lc = p.cpu->loss_forward(x.data(), nullptr, B, true);
  const double lg = p.gpu->loss_forward(x.data(), nullptr, B, true);
  std::printf("%s bits/dim: %.6f (gpu) vs %.6f (cpu)\n", additive ? "nice" : "realnvp", lg, lc);
  EXPECT_NEAR(lg, lc, 5e-3 * std::fabs(lc) + 1e-3);
  p.cpu->zero_grad(), p.gpu->zero_grad();
  p.cpu->loss_backward(), p.gpu->loss_backward();
  const std::vector<float> gc = grads_of(*p.cpu), gg = grads_of(*p.gpu);
  const double all = test::rel_l2(gg.data(), gc.data(), gc.size());
  EXPECT_LT(all, 2e-2) << "all gradients";
  // Per tensor, relative to the larger of its own norm and the norm a tensor of its size has at the overall RMS:
  // an actnorm bias's gradient is a sum of dy over positions that nearly cancels, so its own norm is a poor scale.
  double total = 0;
  for (float v : gc) total += double(v) * v;
  double worst = 0;
  for (const ParamSpec& s : p.cpu->table().specs) {
    if (!s.trainable) continue;
    double num = 0, den = 0;
    for (int64_t i = 0; i < s.numel(); i++) {
      const double a = gg[s.offset + size_t(i)], b = gc[s.offset + size_t(i)];
      num += (a - b) * (a - b), den += b * b;
    }
    const double e = std::sqrt(num / std::max(den, total * double(s.numel()) / double(gc.size())));
    EXPECT_LT(e, 5e-2) << s.name;
    worst = std::max(worst, e);
  }
  std::printf("%s gradients: relative L2 %.2e over all, worst tensor %.2e\n", additive ? "nice" : "realnvp", all,
              worst);
}

TEST(RealNVPGpu, AffineLikelihoodAndGradientsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  check_loss_and_grads(false);
}

TEST(RealNVPGpu, AdditiveLikelihoodAndGradientsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  check_loss_and_grads(true);
}

TEST(RealNVPGpu, AdamWStepsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  const int B = 4;
  Pair p = make_pair(false, B);
  const int64_t P = p.cpu->pixels();
  AdamWConfig ac;
  AdamW ad_c(p.cpu->table(), ac, p.cpu->blocks().backend), ad_g(p.gpu->table(), ac, p.gpu->blocks().backend);
  double first = 0, last = 0;
  for (int step = 1; step <= 3; step++) {
    const std::vector<float> x = images(B, P, 100 + uint64_t(step));
    double l[2];
    for (int side = 0; side < 2; side++) {
      ImageModel& m = side == 0 ? *p.cpu : *p.gpu;
      AdamW& ad = side == 0 ? ad_c : ad_g;
      l[side] = m.loss_forward(x.data(), nullptr, B, true);
      m.loss_backward();
      const ParamBlocks pb = m.blocks();
      ad.update(pb, 1e-2f, step, ad.grad_norm(pb), 1.0f, /*zero_grads=*/true);
    }
    if (step == 1) first = l[0];
    last = l[0];
    std::printf("adamw step %d: bits/dim %.6f (gpu) vs %.6f (cpu)\n", step, l[1], l[0]);
    EXPECT_NEAR(l[1], l[0], 5e-3 * std::fabs(l[0]) + 1e-3) << "step " << step;
  }
  EXPECT_LT(last, first);  // the steps train
  const double e = test::rel_l2(p.gpu->host_params(), p.cpu->host_params(), p.cpu->table().total);
  std::printf("adamw: parameters relative L2 %.2e after 3 steps\n", e);
  EXPECT_LT(e, 1e-2);
}

// Sampling: the same latents through the inverse on both backends.
TEST(RealNVPGpu, SamplingMatchesTheCpuOnTheSameNoise) {
  KILN_REQUIRE_GPU();
  for (bool additive : {false, true}) {
    const int B = 3;
    Pair p = make_pair(additive, B);
    const int64_t P = p.cpu->pixels();
    Rng r(7);
    std::vector<float> z(size_t(B * P)), xc(z.size()), xg(z.size());
    for (float& v : z) v = 0.8f * r.normal();
    p.cpu->generate(xc.data(), z.data(), nullptr, B);
    p.gpu->generate(xg.data(), z.data(), nullptr, B);
    const double e = test::rel_l2(xg.data(), xc.data(), xc.size());
    std::printf("%s samples: relative L2 %.2e\n", additive ? "nice" : "realnvp", e);
    EXPECT_LT(e, 2e-2);
  }
}

// inverse(forward(x)) = x on the device: the inverse runs the MLPs on the same conditioning values, so only the
// device's fp32 elementwise arithmetic separates the two.
TEST(RealNVPGpu, InverseOfForwardIsTheIdentity) {
  KILN_REQUIRE_GPU();
  RealNVPConfig c = RealNVPConfig::from_json(tiny_json(false), "test");
  std::unique_ptr<nn::Backend> be = nn::make_cuda_backend();
  RealNVP m(c, *be);
  m.init_random(3);
  Rng r(11);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] += 0.05f * r.normal();
  const int B = 3;
  const int64_t P = c.pixels();
  const std::vector<float> x = images(B, P, 9);
  std::vector<float> z(x.size()), back(x.size());
  std::vector<double> logp(static_cast<size_t>(B));
  m.forward(logp.data(), x.data(), B, z.data());
  m.inverse(back.data(), z.data(), B);
  double worst = 0;
  for (size_t i = 0; i < x.size(); i++) worst = std::max(worst, double(std::fabs(back[i] - x[i])));
  std::printf("inverse(forward(x)): max |error| %.2e\n", worst);
  EXPECT_LT(worst, 1e-5);  // the emulator shows 3.6e-7
  // A backward after an inverse is refused (the kept activations are the inverse's).
  std::vector<double> w(static_cast<size_t>(B), 1.0);
  EXPECT_THROW(m.backward(w.data()), Error);
}

}  // namespace
}  // namespace kiln
