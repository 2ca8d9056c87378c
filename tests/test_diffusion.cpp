// The objectives (models/diffusion.h): each loss on one batch and noise against tests/peer/torch_objectives.py
// (the papers' own forms, PyTorch float64), the loss gradient by finite differences, the estimates' inversion, and
// the one-line errors.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/safetensors.h"
#include "models/diffusion.h"
#include "models/dit.h"
#include "tests/io_test_helpers.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

const char* kObjectives[] = {"ddpm", "ve", "edm", "flow", "gvp"};

TEST(Objectives, LossesMatchTorch) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no torch";
  DiTConfig c;
  c.image_size = 8, c.channels = 1, c.patch = 2, c.hidden = 32, c.depth = 2, c.heads = 2, c.classes = 3;
  c.freq_dim = 16;
  const int B = 6;
  const int64_t P = 64;
  auto be = nn::make_cpu_backend();
  DiT m(c, *be);
  Rng pr(7);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] = 0.2f * pr.normal();
  m.plan(B);
  auto x0 = test::randn(size_t(B * P), 1, 0.5f), eps = test::randn(size_t(B * P), 2);
  std::vector<int32_t> y = {0, 1, 2, 3, 1, 0};
  std::vector<float> yf(y.begin(), y.end());
  test::ScratchDir d("objectives");
  std::vector<Tensor> ts;
  for (const ParamSpec& s : m.table().specs) ts.push_back({s.name, DType::F32, s.shape, m.params() + s.offset});
  ts.push_back({"x0", DType::F32, Shape{B, 1, 8, 8}, x0.data()});
  ts.push_back({"eps", DType::F32, Shape{B, 1, 8, 8}, eps.data()});
  ts.push_back({"labels", DType::F32, Shape{B}, yf.data()});
  std::map<std::string, double> ours;
  std::vector<std::vector<float>> level_store;
  for (const char* name : kObjectives) {
    const Objective o = Objective::make(name);
    Rng r(42);
    std::vector<double> lv(B);
    std::vector<float> lf(B);
    // Levels rounded to fp32 once, so both sides read the same numbers.
    for (int b = 0; b < B; b++) lf[size_t(b)] = float(o.sample_level(r)), lv[size_t(b)] = lf[size_t(b)];
    std::vector<float> in(size_t(B * P)), cn(B), F(size_t(B * P)), dF(size_t(B * P));
    objective_inputs(o, x0.data(), eps.data(), lv.data(), B, P, in.data(), cn.data());
    m.forward(F.data(), in.data(), cn.data(), y.data(), B);
    ours[name] = objective_loss(o, x0.data(), eps.data(), lv.data(), F.data(), B, P, dF.data());
    // dL/dF by a central difference on a few elements.
    for (int64_t j : {int64_t(0), int64_t(77), int64_t(B * P - 1)}) {
      auto Fp = F, Fm = F;
      Fp[size_t(j)] += 1e-2f, Fm[size_t(j)] -= 1e-2f;
      const double fd = (objective_loss(o, x0.data(), eps.data(), lv.data(), Fp.data(), B, P, nullptr) -
                         objective_loss(o, x0.data(), eps.data(), lv.data(), Fm.data(), B, P, nullptr)) /
                        2e-2;
      EXPECT_NEAR(dF[size_t(j)], fd, 1e-5 * std::fabs(fd) + 1e-7) << name << " dF[" << j << "]";
    }
    level_store.push_back(lf);
  }
  for (size_t i = 0; i < 5; i++)
    ts.push_back({std::string("levels.") + kObjectives[i], DType::F32, Shape{B}, level_store[i].data()});
  write_safetensors((d.path / "in.safetensors").string(), ts);
  std::ofstream((d.path / "config.json").string()) << c.to_json();
  const std::string cmd = "/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/torch_objectives.py " +
                          (d.path / "config.json").string() + " " + (d.path / "in.safetensors").string() + " " +
                          (d.path / "out.json").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream f((d.path / "out.json").string());
  const nlohmann::json ref = nlohmann::json::parse(f);
  for (const char* name : kObjectives) {
    const double r = ref[name].get<double>();
    std::printf("[objectives] %-4s kiln %.9f torch %.9f |diff| %.2e\n", name, ours[name], r, std::fabs(ours[name] - r));
    EXPECT_NEAR(ours[name], r, 1e-5) << name;
    EXPECT_GT(r, 0.01) << name;  // a loss worth comparing
  }
}

TEST(Objectives, EstimatesInvertTheTarget) {
  // For x_t and F built from known (x₀, ε), the estimates return them, for every objective and a few levels.
  for (const char* name : kObjectives) {
    const Objective o = Objective::make(name);
    Rng r(3);
    for (int i = 0; i < 20; i++) {
      const Coefficients k = o.at(o.sample_level(r));
      const double x0 = 0.7, eps = -1.3, xt = k.a * x0 + k.s * eps, F = k.tx * x0 + k.te * eps;
      double ex, ee;
      Objective::estimates(k, xt, F, ex, ee);
      EXPECT_NEAR(ex, x0, 1e-9 * (1 + k.s)) << name;
      EXPECT_NEAR(ee, eps, 1e-9 * (1 + k.s)) << name;
    }
  }
  // The ddpm schedule: ᾱ at the ends, computed here from the β's definition.
  const Objective o = Objective::make("ddpm");
  EXPECT_NEAR(o.alpha_bar[0], 1 - 1e-4, 1e-15);
  double p = 1;
  for (int i = 0; i < 1000; i++) p *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999.0);
  EXPECT_NEAR(o.alpha_bar[999], p, 1e-15);
  EXPECT_THROW(Objective::make("ddim"), Error);
  EXPECT_THROW(Objective::make("edm", "logit-normal"), Error);
  EXPECT_THROW(o.at(1000), Error);
}

}  // namespace
}  // namespace kiln

// ------------------------------------------------------------------------------------ training and resume
#include <filesystem>

#include "models/realnvp.h"
#include "train/classify_trainer.h"
#include "train/diffusion_trainer.h"
#include "train/images.h"

namespace kiln {
namespace {

namespace fs = std::filesystem;

// A small image set under d/data: 8×8 one-channel images of 3 classes; and a tiny DiT config at d/dit.json.
void tiny_image_setup(const test::ScratchDir& d) {
  // A small image set: 8×8 one-channel images of 3 classes (bright squares in class-dependent corners).
  {
    const int N = 60;
    std::string im = std::string("\0\0\x08\x03", 4), lb = std::string("\0\0\x08\x01", 4);
    auto be32 = [](uint32_t v) { return std::string{char(v >> 24), char(v >> 16), char(v >> 8), char(v)}; };
    im += be32(N) + be32(8) + be32(8), lb += be32(N);
    for (int n = 0; n < N; n++) {
      const int c = n % 3;
      for (int i = 0; i < 64; i++) im += char((i / 8 < 4) == (c == 0) && (i % 8 < 4) == (c == 1) ? 230 : 20 + n % 7);
      lb += char(c);
    }
    std::ofstream(d.path / "img", std::ios::binary) << im;
    std::ofstream(d.path / "lab", std::ios::binary) << lb;
    ImagePrepareOptions po;
    po.idx = {(d.path / "img").string() + ":" + (d.path / "lab").string()};
    po.out = (d.path / "data").string();
    po.val_fraction = 0.2;
    prepare_images(po);
  }
  DiTConfig c;
  c.patch = 2, c.hidden = 32, c.depth = 2, c.heads = 2, c.freq_dim = 16;
  std::ofstream(d.path / "dit.json") << c.to_json();
}

double last_loss(const std::string& metrics) {
  std::ifstream f(metrics);
  std::string line, last;
  while (std::getline(f, line))
    if (!line.empty()) last = line;
  return nlohmann::json::parse(last)["loss"].get<double>();
}

// A flow (RealNVP, and NICE's additive case) by maximum likelihood with an EMA: resumed from the state at step 3
// of a 6-step run it ends with the uninterrupted run's weights, EMA and moments, bit for bit (the trainer's and
// the flow's dequantisation generators travel in the state); the EMA is what sample and likelihood read.
TEST(ImageTraining, FlowResumeWithEmaIsExact) {
  test::ScratchDir d("flow_resume");
  tiny_image_setup(d);
  for (bool additive : {false, true}) {
    RealNVPConfig c;
    c.image_size = 8, c.scales = 1, c.couplings = 2, c.final_couplings = 2, c.hidden = 16, c.depth = 1;
    c.additive = additive;
    const std::string tag = additive ? "nice" : "realnvp";
    std::ofstream(d.path / (tag + ".json")) << c.to_json();
    TrainOptions o;
    o.model = (d.path / (tag + ".json")).string();
    o.data = (d.path / "data").string();
    o.batch = 8, o.steps = 6, o.lr = 3e-3f, o.lr_schedule = "cosine", o.warmup = 1, o.threads = 1;
    o.out = (d.path / (tag + "_a")).string(), o.save_every = 3, o.keep_checkpoints = 0, o.progress = false;
    ImageTrainOptions io;
    io.ema_decay = 0.8f, io.loss_model_ema = true;
    train_classifier(o, io, ImageTask::Density);
    const fs::path a = d.path / (tag + "_a"), b = d.path / (tag + "_b");
    ASSERT_TRUE(fs::exists(a / "step_00000003" / "train_state.safetensors"));
    fs::create_directories(b);
    fs::copy(a / "step_00000003", b / "step_00000003", fs::copy_options::recursive);
    fs::create_directory_symlink("step_00000003", b / "latest");
    o.out = b.string(), o.resume = true;
    train_classifier(o, io, ImageTask::Density);
    for (const char* f : {"model.safetensors", "ema.safetensors", "step_00000006/train_state.safetensors"})
      EXPECT_EQ(test::slurp((a / f).string()), test::slurp((b / f).string())) << tag << " " << f;
    // The EMA differs from the weights and is what a density load reads by default.
    EXPECT_NE(test::slurp((a / "model.safetensors").string()), test::slurp((a / "ema.safetensors").string()));
    const nlohmann::json ev = nlohmann::json::parse(test::slurp((a / "eval.json").string()));
    EXPECT_TRUE(ev.contains("test_loss_ema")) << ev.dump();
    // A resume from a directory without a state is refused.
    o.out = (d.path / (tag + "_c")).string();
    EXPECT_THROW(train_classifier(o, io, ImageTask::Density), Error);
  }
}

TEST(ImageTraining, ResumeIsExact) {
  test::ScratchDir d("image_train");
  tiny_image_setup(d);
  TrainOptions o;
  o.model = (d.path / "dit.json").string();
  o.data = (d.path / "data").string();
  o.batch = 8, o.steps = 6, o.lr = 1e-3f, o.lr_schedule = "cosine", o.warmup = 1, o.threads = 1;
  o.out = (d.path / "a").string(), o.save_every = 3, o.keep_checkpoints = 0, o.progress = false;
  o.metrics = (d.path / "a.jsonl").string();
  ImageTrainOptions io;
  io.objective = "flow";
  io.ema_decay = 0.9f;
  train_images(o, io);
  // Resume from step 3 of the same run in another directory: the same weights, EMA and moments at step 6.
  fs::create_directories(d.path / "b");
  fs::copy(d.path / "a" / "step_00000003", d.path / "b" / "step_00000003", fs::copy_options::recursive);
  fs::create_directory_symlink("step_00000003", d.path / "b" / "latest");
  o.out = (d.path / "b").string(), o.resume = true, o.metrics = "";
  train_images(o, io);
  for (const char* f : {"model.safetensors", "ema.safetensors", "train_state.safetensors"}) {
    EXPECT_EQ(test::slurp((d.path / "a" / "step_00000006" / f).string()),
              test::slurp((d.path / "b" / "step_00000006" / f).string()))
        << f;
  }
  // The checkpoint is what kiln sample reads; asking it for a sampler of another objective is one line.
  const ImageModelFiles mf = find_image_model((d.path / "a").string());
  EXPECT_EQ(mf.objective.name, "flow");
  const std::unique_ptr<ImageModel> m = load_image_model(mf);
  EXPECT_EQ(m->geometry().classes, 3);
  EXPECT_EQ(m->geometry().image_size, 8);
  EXPECT_TRUE(m->provides(ImageTask::Denoise));
  EXPECT_FALSE(m->provides(ImageTask::Classify));
  // The factory's errors: a model that does not denoise, an unknown model_type.
  std::ofstream(d.path / "vit.json") << "{\"model_type\": \"vit\", \"hidden\": 16, \"depth\": 1, \"heads\": 2}";
  TrainOptions ov = o;
  ov.model = (d.path / "vit.json").string(), ov.resume = false, ov.out = "";
  EXPECT_THROW(train_images(ov, io), Error);
  EXPECT_THROW(make_image_model("{\"model_type\": \"gan\"}", "x.json"), Error);
  // Bad flags.
  io.objective = "score";
  EXPECT_THROW(train_images(o, io), Error);
}

TEST(ImageTraining, Bf16TracksFp32AndResumesExactly) {
  // Mixed precision (--dtype bf16: 16-bit products, fp32 master weights): the loss after a few steps of the same
  // run stays near fp32's, and resume is exact in bf16 too.
  test::ScratchDir d("image_train_bf16");
  tiny_image_setup(d);
  TrainOptions o;
  o.model = (d.path / "dit.json").string();
  o.data = (d.path / "data").string();
  o.batch = 8, o.steps = 6, o.lr = 1e-3f, o.warmup = 1, o.threads = 1, o.progress = false;
  o.out = (d.path / "f32").string(), o.save_every = 3, o.metrics = (d.path / "f32.jsonl").string();
  ImageTrainOptions io;
  io.objective = "edm";
  train_images(o, io);
  o.dtype = "bf16", o.out = (d.path / "a").string(), o.metrics = (d.path / "bf16.jsonl").string();
  train_images(o, io);
  const double l32 = last_loss((d.path / "f32.jsonl").string()), l16 = last_loss((d.path / "bf16.jsonl").string());
  EXPECT_NE(l32, l16);  // the products did run in 16 bits
  EXPECT_NEAR(l16, l32, 0.05 * l32) << "bf16 " << l16 << " fp32 " << l32;
  fs::create_directories(d.path / "b");
  fs::copy(d.path / "a" / "step_00000003", d.path / "b" / "step_00000003", fs::copy_options::recursive);
  fs::create_directory_symlink("step_00000003", d.path / "b" / "latest");
  o.out = (d.path / "b").string(), o.resume = true, o.metrics = "";
  train_images(o, io);
  for (const char* f : {"model.safetensors", "ema.safetensors", "train_state.safetensors"})
    EXPECT_EQ(test::slurp((d.path / "a" / "step_00000006" / f).string()),
              test::slurp((d.path / "b" / "step_00000006" / f).string()))
        << f;
  o.dtype = "fp16";
  EXPECT_THROW(train_images(o, io), Error);
  o.dtype = "bf16", o.device = "cuda";
  EXPECT_THROW(train_images(o, io), Error);
}

TEST(ImageTraining, ClassifierAndJudgeThroughTheFactory) {
  // The loss-model trainer on the tiny set (classes: a bright corner), with augmentation, label smoothing and bf16;
  // the judge reads the directory back and classifies the held-out images as well as the trainer reported.
  test::ScratchDir d("image_classify");
  tiny_image_setup(d);
  std::ofstream(d.path / "vit.json") << "{\"model_type\": \"vit\", \"patch\": 2, \"hidden\": 16, \"depth\": 1, "
                                        "\"heads\": 2}";
  TrainOptions o;
  o.model = (d.path / "vit.json").string();
  o.data = (d.path / "data").string();
  o.batch = 16, o.steps = 40, o.lr = 3e-3f, o.warmup = 2, o.threads = 1, o.progress = false, o.dtype = "bf16";
  o.out = (d.path / "vit").string();
  ImageTrainOptions io;
  io.augment = "flip", io.label_smoothing = 0.1f;
  const double acc = train_classifier(o, io);
  EXPECT_GT(acc, 0.6);
  ImageJudge judge(o.out, 8);
  EXPECT_EQ(judge.feature_dim(), 16);
  const ImageSet val = load_images(o.data, "val");
  std::vector<int32_t> pred(size_t(val.size()));
  std::vector<float> feats(size_t(val.size()) * 16);
  judge.run(val.images.data(), val.size(), pred.data(), feats.data());
  int right = 0;
  for (int64_t i = 0; i < val.size(); i++) right += pred[size_t(i)] == val.labels[size_t(i)];
  // The judge runs in fp32, the trainer's figure in bf16: close, not equal.
  EXPECT_NEAR(double(right) / double(val.size()), acc, 0.15);
  // A denoiser computes no loss of its own; a bad augmentation is one line.
  o.model = (d.path / "dit.json").string();
  EXPECT_THROW(train_classifier(o, io), Error);
  o.model = (d.path / "vit.json").string(), io.augment = "rotate";
  EXPECT_THROW(train_classifier(o, io), Error);
}

}  // namespace
}  // namespace kiln
