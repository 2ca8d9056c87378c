// The image models on the GPU backend (make_image_model with cuda: the same DiT and ViT sources on bf16
// activations and products) against the same models on the CPU in fp32 (themselves checked against PyTorch in
// tests/test_dit.cpp and tests/test_vit.cpp): on the same weights, batch and noise the objective's loss, the
// network's output, every parameter gradient and a sampler's whole trajectory must agree within bf16 accuracy
// (the GPU's activations are bf16, so fp32 agreement is not to be had; observed on the emulator: 0.1-0.8%
// relative), and a few AdamW steps on the device must track the CPU's. Small shapes: seconds on the emulator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "core/gpu.h"
#include "core/rng.h"
#include "infer/diffusion_sampler.h"
#include "models/diffusion.h"
#include "models/image_model.h"
#include "models/recompute.h"
#include "tests/gpu/gpu_test_util.h"
#include "train/optimizer.h"

namespace kiln {
namespace {

// A DiT with head dim 64 (the GPU attention kernels take 64 and 128): 8×8 images, patch 2 (16 tokens), 2 blocks.
const char* kDiT = R"({"model_type": "dit", "image_size": 8, "channels": 1, "patch": 2, "hidden": 64, "depth": 2,
  "heads": 1, "mlp_ratio": 2, "classes": 3, "freq_dim": 32})";
const char* kViT = R"({"model_type": "vit", "image_size": 8, "channels": 1, "patch": 2, "hidden": 128, "depth": 2,
  "heads": 2, "mlp_ratio": 2, "classes": 3})";

struct Pair {
  std::unique_ptr<ImageModel> cpu, gpu;
};

// The same weights on both backends: the family's initialisation, then every value moved by N(0, 0.05²) so that
// adaLN-Zero's zero products and output layer do not hide a path.
Pair make_pair(const char* json, int B, bool with_grads = true) {
  ImageModelOptions c, g;
  c.with_grads = g.with_grads = with_grads;
  g.cuda = true, g.lowp = LowpType::BF16;
  Pair p{make_image_model(json, "test", c), make_image_model(json, "test", g)};
  p.cpu->init_random(3);
  Rng r(11);
  float* h = p.cpu->host_params();
  for (size_t i = 0; i < p.cpu->table().total; i++) h[i] += 0.05f * r.normal();
  p.cpu->params_changed();
  std::copy_n(h, p.cpu->table().total, p.gpu->host_params());
  p.gpu->params_changed();
  p.cpu->plan(B), p.gpu->plan(B);
  return p;
}

std::vector<float> grads_of(ImageModel& m) {
  const ParamBlocks b = m.blocks();
  std::vector<float> g(b.n);
  b.backend->download(g.data(), b.grads, b.n * 4);
  return g;
}

void expect_grads_match(ImageModel& cpu, ImageModel& gpu, double tol) {
  const std::vector<float> gc = grads_of(cpu), gg = grads_of(gpu);
  const double all = test::rel_l2(gg.data(), gc.data(), gc.size());
  EXPECT_LT(all, tol) << "all gradients";
  double worst = 0;
  for (const ParamSpec& s : cpu.table().specs) {
    const double e = test::rel_l2(gg.data() + s.offset, gc.data() + s.offset, size_t(s.numel()));
    EXPECT_LT(e, 4 * tol) << s.name;
    worst = std::max(worst, e);
  }
  std::printf("%s gradients: relative L2 %.2e over all, worst tensor %.2e\n", cpu.type().c_str(), all, worst);
}

TEST(ImageGpu, DiTLossOutputAndGradientsMatchTheCpu) {
  KILN_REQUIRE_GPU();
  const int B = 3;
  Pair p = make_pair(kDiT, B);
  const int64_t P = p.cpu->pixels();
  const Objective o = Objective::make("edm");
  Rng r(5);
  std::vector<float> x0(size_t(B * P)), eps(size_t(B * P)), in(size_t(B * P)), cn(static_cast<size_t>(B));
  for (auto& v : x0) v = 2 * r.uniform() - 1;
  for (auto& v : eps) v = r.normal();
  std::vector<double> lv(static_cast<size_t>(B));
  for (auto& v : lv) v = o.sample_level(r);
  objective_inputs(o, x0.data(), eps.data(), lv.data(), B, P, in.data(), cn.data());
  const std::vector<int32_t> labels = {0, 2, 3};  // 3: the null class
  std::vector<float> Fc(in.size()), Fg(in.size()), dc(in.size()), dg(in.size());
  p.cpu->denoise(Fc.data(), in.data(), cn.data(), labels.data(), B);
  p.gpu->denoise(Fg.data(), in.data(), cn.data(), labels.data(), B);
  const double eF = test::rel_l2(Fg.data(), Fc.data(), Fc.size());
  EXPECT_LT(eF, 1e-2);
  const double lc = objective_loss(o, x0.data(), eps.data(), lv.data(), Fc.data(), B, P, dc.data());
  const double lg = objective_loss(o, x0.data(), eps.data(), lv.data(), Fg.data(), B, P, dg.data());
  EXPECT_NEAR(lg, lc, 5e-3 * lc);
  std::printf("dit: output relative L2 %.2e, edm loss %.6f (gpu) vs %.6f (cpu)\n", eF, lg, lc);
  // The same upstream gradient on both sides: the backward is compared, not the loss's rounding.
  p.cpu->denoise_backward(dc.data());
  p.gpu->denoise_backward(dc.data());
  expect_grads_match(*p.cpu, *p.gpu, 2e-2);
}

TEST(ImageGpu, DiTSamplerTrajectoryMatchesTheCpu) {
  KILN_REQUIRE_GPU();
  const int B = 2;
  Pair p = make_pair(kDiT, B, /*with_grads=*/false);
  const int64_t P = p.cpu->pixels();
  const std::vector<int32_t> labels = {1, 3};
  for (const char* obj : {"edm", "flow"}) {
    const Objective o = Objective::make(obj);
    SamplerOptions s;
    s.name = std::string(obj) == "edm" ? "edm-heun" : "flow-heun";
    s.steps = 4, s.guidance = 2, s.null_class = 3;  // guidance: conditional and null rows through the network
    std::vector<float> xc(size_t(B * P)), xg(size_t(B * P));
    Rng rc(9), rg(9);
    const SampleResult a = sample(o, s, denoiser_net(*p.cpu, o, B), xc.data(), labels.data(), B, P, rng_noise(rc), true);
    const SampleResult b = sample(o, s, denoiser_net(*p.gpu, o, B), xg.data(), labels.data(), B, P, rng_noise(rg), true);
    EXPECT_EQ(a.nfe, b.nfe);
    ASSERT_EQ(a.trajectory.size(), b.trajectory.size());
    double worst = 0;
    for (size_t k = 0; k < a.trajectory.size(); k++) {
      const double e = test::rel_l2(b.trajectory[k].data(), a.trajectory[k].data(), a.trajectory[k].size());
      EXPECT_LT(e, 1e-2) << obj << " step " << k;
      worst = std::max(worst, e);
    }
    std::printf("%s: %zu steps, %d evaluations, worst step relative L2 %.2e\n", s.name.c_str(),
                a.trajectory.size(), a.nfe, worst);
  }
}

TEST(ImageGpu, DiTAdamWStepsTrackTheCpu) {
  KILN_REQUIRE_GPU();
  const int B = 2;
  Pair p = make_pair(kDiT, B);
  const int64_t P = p.cpu->pixels();
  const Objective o = Objective::make("flow");
  AdamWConfig ac;
  AdamW ad_c(p.cpu->table(), ac, p.cpu->blocks().backend), ad_g(p.gpu->table(), ac, p.gpu->blocks().backend);
  Rng r(21);
  std::vector<float> x0(size_t(B * P)), eps(size_t(B * P)), in(size_t(B * P)), cn(static_cast<size_t>(B)), F(in.size()),
      d(in.size());
  std::vector<double> lv(static_cast<size_t>(B));
  const std::vector<int32_t> labels = {0, 1};
  double first = 0, last_c = 0, last_g = 0;
  for (int step = 1; step <= 4; step++) {
    for (auto& v : x0) v = std::tanh(r.normal());
    for (auto& v : eps) v = r.normal();
    for (auto& v : lv) v = o.sample_level(r);
    objective_inputs(o, x0.data(), eps.data(), lv.data(), B, P, in.data(), cn.data());
    for (int side = 0; side < 2; side++) {
      ImageModel& m = side == 0 ? *p.cpu : *p.gpu;
      AdamW& ad = side == 0 ? ad_c : ad_g;
      m.denoise(F.data(), in.data(), cn.data(), labels.data(), B);
      const double l = objective_loss(o, x0.data(), eps.data(), lv.data(), F.data(), B, P, d.data());
      (side == 0 ? last_c : last_g) = l;
      if (step == 1 && side == 0) first = l;
      m.denoise_backward(d.data());
      const ParamBlocks pb = m.blocks();
      ad.update(pb, 3e-3f, step, ad.grad_norm(pb), 1.0f, /*zero_grads=*/true);
    }
    EXPECT_NEAR(last_g, last_c, 1e-2 * last_c) << "step " << step;
    std::printf("adamw step %d: flow loss %.6f (gpu) vs %.6f (cpu)\n", step, last_g, last_c);
  }
  EXPECT_GT(first, 0);
  // The device parameters come back through the host mirror (what a checkpoint writes).
  p.cpu->sync_to_host(), p.gpu->sync_to_host();
  EXPECT_LT(test::rel_l2(p.gpu->host_params(), p.cpu->host_params(), p.cpu->table().total), 1e-2);
}

// Block recomputation on the device reruns the same kernels on the same inputs: bit-identical gradients, and
// the VJP the likelihood uses (the input gradient) is the same with or without it.
TEST(ImageGpu, DiTRecomputationAndInputGradientOnTheDevice) {
  KILN_REQUIRE_GPU();
  const int B = 2;
  Pair p = make_pair(kDiT, B);
  Pair q = make_pair(kDiT, B);
  q.gpu->plan(B, RecomputePolicy::parse("block"));
  const int64_t P = p.cpu->pixels();
  Rng r(4);
  std::vector<float> x(size_t(B * P)), dout(x.size()), cn = {0.3f, -1.2f}, F(x.size());
  for (auto& v : x) v = r.normal();
  for (auto& v : dout) v = r.normal();
  const std::vector<int32_t> labels = {2, 0};
  std::vector<float> dx_plain(x.size()), dx_re(x.size()), dx_cpu(x.size());
  p.gpu->denoise(F.data(), x.data(), cn.data(), labels.data(), B);
  p.gpu->denoise_vjp(dx_plain.data(), dout.data());
  q.gpu->denoise(F.data(), x.data(), cn.data(), labels.data(), B);
  q.gpu->denoise_vjp(dx_re.data(), dout.data());
  EXPECT_EQ(grads_of(*p.gpu), grads_of(*q.gpu));
  EXPECT_EQ(dx_plain, dx_re);
  // And the device's input gradient is the CPU's within bf16 accuracy.
  p.cpu->denoise(F.data(), x.data(), cn.data(), labels.data(), B);
  p.cpu->denoise_vjp(dx_cpu.data(), dout.data());
  const double e = test::rel_l2(dx_plain.data(), dx_cpu.data(), dx_cpu.size());
  EXPECT_LT(e, 2e-2);
  std::printf("dit input gradient (vjp): gpu vs cpu relative L2 %.2e\n", e);
}

TEST(ImageGpu, ViTLossLogitsAndGradientsMatchTheCpu) {
  KILN_REQUIRE_GPU();
  const int B = 3;
  Pair p = make_pair(kViT, B);
  const int64_t P = p.cpu->pixels();
  Rng r(7);
  std::vector<float> x(size_t(B * P));
  for (auto& v : x) v = 2 * r.uniform() - 1;
  const std::vector<int32_t> labels = {0, 2, 1};
  const double lc = p.cpu->loss_forward(x.data(), labels.data(), B, true);
  const double lg = p.gpu->loss_forward(x.data(), labels.data(), B, true);
  EXPECT_NEAR(lg, lc, 1e-2 * lc);
  std::printf("vit: cross-entropy %.6f (gpu) vs %.6f (cpu)\n", lg, lc);
  p.cpu->loss_backward(), p.gpu->loss_backward();
  expect_grads_match(*p.cpu, *p.gpu, 2e-2);
  std::vector<float> lgc(size_t(B) * 3), lgg(lgc.size()), fc(size_t(B) * p.cpu->feature_dim()), fg(fc.size());
  p.cpu->predict(lgc.data(), fc.data(), x.data(), B);
  p.gpu->predict(lgg.data(), fg.data(), x.data(), B);
  EXPECT_LT(test::rel_l2(lgg.data(), lgc.data(), lgc.size()), 1e-2);
  EXPECT_LT(test::rel_l2(fg.data(), fc.data(), fc.size()), 1e-2);
}

TEST(ImageGpu, HeadDimsTheKernelsLackAreRefused) {
  KILN_REQUIRE_GPU();
  ImageModelOptions g;
  g.cuda = true, g.lowp = LowpType::BF16;
  // The default ViT (hidden 96, 4 heads: head dim 24).
  try {
    make_image_model(R"({"model_type": "vit"})", "test", g);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("head dim 24"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
