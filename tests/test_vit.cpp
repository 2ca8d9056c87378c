// The ViT classifier (models/vit.h): its gradient against a directional finite difference of its own loss, that
// it learns a small separable problem, and the Fréchet distance (train/classify_trainer.h) against
// tests/peer/torch_frechet.py.
#include <gtest/gtest.h>

#include <cmath>

#include "core/safetensors.h"
#include "models/vit.h"
#include "tests/io_test_helpers.h"
#include "tests/test_util.h"
#include "tests/tokenizer_test_util.h"
#include "train/classify_trainer.h"
#include "train/images.h"
#include "train/optimizer.h"

namespace kiln {
namespace {

ViTConfig tiny() {
  ViTConfig c;
  c.image_size = 8, c.channels = 1, c.patch = 2, c.hidden = 16, c.depth = 2, c.heads = 2, c.classes = 3;
  return c;
}

TEST(ViT, GradientMatchesFiniteDifference) {
  auto be = nn::make_cpu_backend();
  ViT m(tiny(), *be);
  Rng r(4);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] = 0.3f * r.normal();
  const int B = 5;
  m.plan(B);
  const auto x = test::randn(size_t(B) * 64, 8);
  const std::vector<int32_t> y = {0, 1, 2, 1, 0};
  std::vector<float> logits(size_t(B) * 3);
  m.forward(logits.data(), nullptr, x.data(), y.data(), B);
  m.backward();
  const std::vector<float> p0(m.params(), m.params() + m.table().total);
  const auto dir = test::randn(p0.size(), 5);
  double analytic = 0;
  for (size_t i = 0; i < p0.size(); i++) analytic += double(m.grads()[i]) * dir[i];
  auto at = [&](double s) {
    for (size_t i = 0; i < p0.size(); i++) m.params()[i] = float(p0[i] + s * dir[i]);
    ViT probe(tiny(), *be, false);  // no gradients: the forward alone
    std::copy(m.params(), m.params() + m.table().total, probe.params());
    probe.plan(B);
    return probe.forward(logits.data(), nullptr, x.data(), y.data(), B);
  };
  const double h = 1e-3, fd = (at(h) - at(-h)) / (2 * h);
  EXPECT_NEAR(analytic, fd, 2e-3 * std::fabs(fd) + 1e-4) << analytic << " vs " << fd;
}

TEST(ViT, LabelSmoothingLossAndGradient) {
  // The smoothed loss against the formula on the logits of a forward without labels, and its gradient against a
  // directional finite difference of that formula.
  auto be = nn::make_cpu_backend();
  const float eps = 0.2f;
  ViT m(tiny(), *be);
  Rng r(7);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] = 0.3f * r.normal();
  const int B = 4, K = 3;
  m.plan(B);
  m.set_label_smoothing(eps);
  const auto x = test::randn(size_t(B) * 64, 9);
  const std::vector<int32_t> y = {2, 0, 1, 2};
  std::vector<float> logits(size_t(B) * K);
  auto smoothed = [&](ViT& v) {  // −Σ t·log softmax, in double from the logits alone
    v.forward(logits.data(), nullptr, x.data(), nullptr, B);
    double s = 0;
    for (int b = 0; b < B; b++) {
      double z = 0;
      for (int k = 0; k < K; k++) z += std::exp(double(logits[size_t(b * K + k)]));
      for (int k = 0; k < K; k++)
        s -= ((k == y[size_t(b)] ? 1 - eps : 0) + eps / K) * (logits[size_t(b * K + k)] - std::log(z));
    }
    return s / B;
  };
  const double expect = smoothed(m);
  const double loss = m.forward(logits.data(), nullptr, x.data(), y.data(), B);
  EXPECT_NEAR(loss, expect, 1e-5);
  m.backward();
  const std::vector<float> p0(m.params(), m.params() + m.table().total);
  const auto dir = test::randn(p0.size(), 11);
  double analytic = 0;
  for (size_t i = 0; i < p0.size(); i++) analytic += double(m.grads()[i]) * dir[i];
  auto at = [&](double h) {
    ViT probe(tiny(), *be, false);
    for (size_t i = 0; i < p0.size(); i++) probe.params()[i] = float(p0[i] + h * dir[i]);
    probe.plan(B);
    return smoothed(probe);
  };
  const double h = 1e-3, fd = (at(h) - at(-h)) / (2 * h);
  EXPECT_NEAR(analytic, fd, 2e-3 * std::fabs(fd) + 1e-4) << analytic << " vs " << fd;
}

TEST(ViT, AugmentShiftsAndMirrors) {
  // A 1×3×4 image with distinct pixels: crop:1 shifts by the drawn (dy, dx) and fills with −1; flip mirrors.
  EXPECT_EQ(Augment::parse("crop:2,flip").crop, 2);
  EXPECT_TRUE(Augment::parse("flip").flip);
  EXPECT_FALSE(Augment::parse("none").any());
  EXPECT_THROW(Augment::parse("rotate"), Error);
  EXPECT_THROW(Augment::parse("crop:x"), Error);
  std::vector<float> src(12);
  for (int i = 0; i < 12; i++) src[size_t(i)] = float(i) / 10;
  for (uint64_t seed = 1; seed < 40; seed++) {
    Augment a = Augment::parse("crop:1,flip");
    std::vector<float> x = src;
    Rng r(seed), q(seed);  // q replays the draws: dy, dx, flip
    augment_batch(x.data(), 1, 1, 3, 4, a, r);
    const int dy = int(q.below(3)) - 1, dx = int(q.below(3)) - 1;
    const bool flip = q.uniform() < 0.5;
    for (int i = 0; i < 3; i++)
      for (int j = 0; j < 4; j++) {
        const int si = i + dy, sj = (flip ? 3 - j : j) + dx;
        const float want = si >= 0 && si < 3 && sj >= 0 && sj < 4 ? src[size_t(si * 4 + sj)] : -1.0f;
        EXPECT_EQ(x[size_t(i * 4 + j)], want) << seed << " " << i << " " << j;
      }
  }
}

TEST(ViT, LearnsASeparableProblem) {
  // Class c: a bright 4×4 quadrant c of an 8×8 image, plus noise.
  auto be = nn::make_cpu_backend();
  ViTConfig c = tiny();
  ViT m(c, *be);
  m.init_random(1);
  const int B = 24;
  m.plan(B);
  AdamWConfig ac;
  ac.weight_decay = 0;
  AdamW adam(m.table(), ac);
  Rng r(2);
  std::vector<float> x(size_t(B) * 64), logits(size_t(B) * 3);
  std::vector<int32_t> y(static_cast<size_t>(B));
  auto batch = [&] {
    for (int b = 0; b < B; b++) {
      y[size_t(b)] = int32_t(r.below(3));
      for (int i = 0; i < 64; i++) {
        const int q = (i / 8 >= 4) * 2 + (i % 8 >= 4);
        x[size_t(b) * 64 + i] = (q == y[size_t(b)] ? 0.8f : -0.8f) + 0.3f * r.normal();
      }
    }
  };
  double first = 0, last = 0;
  for (int s = 0; s < 60; s++) {
    batch();
    last = m.forward(logits.data(), nullptr, x.data(), y.data(), B);
    if (s == 0) first = last;
    m.backward();
    adam.update(m.params(), m.grads(), 3e-3f, s + 1, adam.grad_norm(m.grads()), 1.0f, true);
  }
  EXPECT_LT(last, 0.2 * first) << first << " -> " << last;
  batch();
  m.forward(logits.data(), nullptr, x.data(), nullptr, B);
  int right = 0;
  for (int b = 0; b < B; b++) {
    const float* l = logits.data() + b * 3;
    right += int(std::max_element(l, l + 3) - l) == y[size_t(b)];
  }
  EXPECT_GE(right, B - 1);
}

TEST(Frechet, MatchesTorchAndIsZeroOnItself) {
  const int D = 6, n = 400, m = 300;
  auto a = test::randn(size_t(n) * D, 1), b = test::randn(size_t(m) * D, 2);
  for (int i = 0; i < m; i++)
    for (int d = 0; d < D; d++) b[size_t(i) * D + d] = b[size_t(i) * D + d] * (0.5f + 0.2f * d) + 0.3f * (d % 2);
  for (int i = 0; i < n; i++) a[size_t(i) * D + 1] += 0.5f * a[size_t(i) * D];  // correlation
  EXPECT_NEAR(frechet_distance(a.data(), n, a.data(), n, D), 0.0, 1e-9);
  const double ours = frechet_distance(a.data(), n, b.data(), m, D);
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no torch";
  test::ScratchDir dir("frechet");
  write_safetensors((dir.path / "in.safetensors").string(),
                    {{"a", DType::F32, Shape{n, D}, a.data()}, {"b", DType::F32, Shape{m, D}, b.data()}});
  const auto out = test::run_capture("/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/torch_frechet.py " +
                                     (dir.path / "in.safetensors").string());
  ASSERT_TRUE(out.has_value());
  EXPECT_NEAR(ours, std::stod(*out), 1e-9 * (1 + ours)) << ours << " vs " << *out;
}

}  // namespace
}  // namespace kiln
