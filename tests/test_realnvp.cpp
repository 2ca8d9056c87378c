// The RealNVP flow (models/realnvp.h): inverse(forward(x)) = x; the log-determinant against the log|det| of the
// Jacobian taken by central finite differences; parameter and input gradients by finite differences; the whole
// forward, inverse, loss and gradients against tests/peer/torch_realnvp.py (float64, with autograd's full
// Jacobian); actnorm's data-dependent init; NICE's additive case; config errors.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/image_model.h"
#include "models/realnvp.h"
#include "tests/io_test_helpers.h"

namespace kiln {
namespace {

// 1×4×4 images (P = 16): one scale (checkerboard, squeeze to 4×2×2, channel couplings, factor out), then
// checkerboard couplings on 2×2×2.
RealNVPConfig tiny(bool additive = false) {
  RealNVPConfig c;
  c.image_size = 4, c.channels = 1, c.scales = 1, c.couplings = 2, c.final_couplings = 2, c.hidden = 8, c.depth = 2;
  c.additive = additive;
  return c;
}

// Every parameter random (the output layers too, so no coupling is the identity).
void randomize(RealNVP& m, uint64_t seed) {
  Rng r(seed);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] = 0.4f * (2 * r.uniform() - 1);
}

std::vector<float> images(int B, int64_t P, uint64_t seed) {
  Rng r(seed);
  std::vector<float> x(size_t(B * P));
  for (float& v : x) v = 2 * r.uniform() - 1;
  return x;
}

// log|det A| of an n×n matrix by LU with partial pivoting (double).
double logabsdet(std::vector<double> A, int n) {
  double s = 0;
  for (int c = 0; c < n; c++) {
    int p = c;
    for (int r = c + 1; r < n; r++)
      if (std::fabs(A[size_t(r * n + c)]) > std::fabs(A[size_t(p * n + c)])) p = r;
    for (int k = 0; k < n; k++) std::swap(A[size_t(c * n + k)], A[size_t(p * n + k)]);
    s += std::log(std::fabs(A[size_t(c * n + c)]));
    for (int r = c + 1; r < n; r++) {
      const double f = A[size_t(r * n + c)] / A[size_t(c * n + c)];
      for (int k = c; k < n; k++) A[size_t(r * n + k)] -= f * A[size_t(c * n + k)];
    }
  }
  return s;
}

TEST(RealNVP, InverseOfForwardIsIdentity) {
  for (bool additive : {false, true}) {
    const RealNVPConfig c = tiny(additive);
    auto be = nn::make_cpu_backend();
    RealNVP m(c, *be);
    randomize(m, 3);
    const int B = 5;
    const int64_t P = c.pixels();
    const std::vector<float> x = images(B, P, 7);
    std::vector<double> logp(static_cast<size_t>(B));
    std::vector<float> z(x.size()), back(x.size());
    m.forward(logp.data(), x.data(), B, z.data());
    m.inverse(back.data(), z.data(), B);
    double worst = 0, moved = 0;
    for (size_t i = 0; i < x.size(); i++) worst = std::max(worst, double(std::fabs(back[i] - x[i])));
    for (size_t i = 0; i < x.size(); i++) moved = std::max(moved, double(std::fabs(z[i] - x[i])));
    EXPECT_LT(worst, 1e-5) << (additive ? "additive" : "affine");
    EXPECT_GT(moved, 0.1) << "the map is not the identity";
  }
}

TEST(RealNVP, LogDetMatchesFiniteDifferenceJacobian) {
  for (bool additive : {false, true}) {
    const RealNVPConfig c = tiny(additive);
    auto be = nn::make_cpu_backend();
    RealNVP m(c, *be);
    randomize(m, 5);
    const int n = int(c.pixels());
    const std::vector<float> x = images(1, n, 9);
    std::vector<double> logp(1), logdet(1);
    m.forward(logp.data(), x.data(), 1, nullptr, logdet.data());
    // J[i][j] = ∂z_i/∂x_j by central differences (two forwards per column).
    const float h = 1e-2f;
    std::vector<double> J(size_t(n * n));
    std::vector<float> xp = x, zp(static_cast<size_t>(n)), zm(static_cast<size_t>(n));
    std::vector<double> lp(1);
    for (int j = 0; j < n; j++) {
      xp = x, xp[size_t(j)] += h;
      m.forward(lp.data(), xp.data(), 1, zp.data());
      xp = x, xp[size_t(j)] -= h;
      m.forward(lp.data(), xp.data(), 1, zm.data());
      for (int i = 0; i < n; i++) J[size_t(i * n + j)] = (double(zp[size_t(i)]) - zm[size_t(i)]) / (2.0 * h);
    }
    // Truncation h²/6·z''' and fp32 rounding ~1e-7/h per entry: ~1e-4 on the log-det.
    EXPECT_NEAR(logdet[0], logabsdet(J, n), 2e-3) << (additive ? "additive" : "affine");
    // log p is the standard normal of z plus the log-det.
    double q = 0;
    std::vector<float> z(static_cast<size_t>(n));
    m.forward(lp.data(), x.data(), 1, z.data());
    for (float v : z) q += double(v) * v;
    EXPECT_NEAR(logp[0], -0.5 * q - 0.5 * n * std::log(2 * M_PI) + logdet[0], 1e-9);
  }
}

TEST(RealNVP, GradientsMatchFiniteDifferences) {
  const RealNVPConfig c = tiny();
  auto be = nn::make_cpu_backend();
  RealNVP m(c, *be);
  randomize(m, 11);
  const int B = 3;
  const int64_t P = c.pixels();
  std::vector<float> x = images(B, P, 13);
  const std::vector<double> w = {0.7, -0.4, 1.1};
  std::vector<double> logp(static_cast<size_t>(B));
  auto loss = [&] {
    m.forward(logp.data(), x.data(), B);
    double s = 0;
    for (int b = 0; b < B; b++) s += w[size_t(b)] * logp[size_t(b)];
    return s;
  };
  loss();
  m.zero_grad();
  std::vector<float> dx(x.size());
  m.backward(w.data(), dx.data());
  const std::vector<float> g(m.grads(), m.grads() + m.table().total);
  // fp32 forwards: the loss carries ~1e-5 of rounding, so h = 1e-2 (truncation h^2/6 times the third derivative).
  const double h = 1e-2;
  // A few entries of every tensor.
  for (const ParamSpec& s : m.table().specs) {
    for (int64_t k = 0; k < std::min<int64_t>(3, s.numel()); k++) {
      const size_t i = s.offset + size_t((k * 7919) % s.numel());
      const float v = m.params()[i];
      m.params()[i] = float(v + h);
      const double up = loss();
      m.params()[i] = float(v - h);
      const double dn = loss();
      m.params()[i] = v;
      const double fd = (up - dn) / (2 * h);
      EXPECT_NEAR(g[i], fd, 2e-3 * std::max(1.0, std::fabs(fd))) << s.name << "[" << i - s.offset << "]";
    }
  }
  for (size_t i = 0; i < x.size(); i += 5) {
    const float v = x[i];
    x[i] = float(v + h);
    const double up = loss();
    x[i] = float(v - h);
    const double dn = loss();
    x[i] = v;
    const double fd = (up - dn) / (2 * h);
    EXPECT_NEAR(dx[i], fd, 2e-3 * std::max(1.0, std::fabs(fd))) << "dx[" << i << "]";
  }
}

TEST(RealNVP, MatchesTorchWithAutogradJacobian) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no torch";
  for (bool additive : {false, true}) {
    RealNVPConfig c = tiny(additive);
    c.image_size = 8, c.channels = 2, c.scales = 2;  // two scales: 2×8×8 -> 8×4×4 -> 4×4×4 -> 16×2×2 -> 8×2×2
    auto be = nn::make_cpu_backend();
    RealNVP m(c, *be);
    randomize(m, 17);
    const int B = 3;
    const int64_t P = c.pixels();
    const std::vector<float> x = images(B, P, 19);
    const std::vector<double> w = {0.5, -1.0, 0.25};
    std::vector<double> logp(static_cast<size_t>(B)), logdet(static_cast<size_t>(B));
    std::vector<float> z(x.size()), back(x.size()), dx(x.size());
    m.forward(logp.data(), x.data(), B, z.data(), logdet.data());
    m.zero_grad();
    m.backward(w.data(), dx.data());
    m.inverse(back.data(), z.data(), B);

    test::ScratchDir d(additive ? "realnvp_torch_add" : "realnvp_torch");
    std::vector<Tensor> ts;
    for (const ParamSpec& s : m.table().specs) ts.push_back({s.name, DType::F32, s.shape, m.params() + s.offset});
    std::vector<float> wf(w.begin(), w.end());
    const int64_t H = c.image_size;
    ts.push_back({"x", DType::F32, Shape{B, c.channels, H, H}, const_cast<float*>(x.data())});
    ts.push_back({"w", DType::F32, Shape{B}, wf.data()});
    write_safetensors(d / "in.safetensors", ts);
    std::ofstream(d / "config.json") << c.to_json();
    const std::string cmd = "/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/torch_realnvp.py " + d / "config.json" +
                            " " + d / "in.safetensors" + " " + d / "out.safetensors";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    SafeTensorsReader r(d / "out.safetensors");
    auto close = [](double a, double b, double tol) { return std::fabs(a - b) <= tol * std::max(1.0, std::fabs(b)); };
    const std::string tag = additive ? "additive " : "affine ";
    for (int64_t i = 0; i < B * P; i++) {
      EXPECT_TRUE(close(z[size_t(i)], r.get("z").f32()[i], 1e-5)) << tag << "z[" << i << "]";
      EXPECT_TRUE(close(back[size_t(i)], r.get("inverse").f32()[i], 1e-5)) << tag << "inverse[" << i << "]";
    }
    double loss = 0;
    for (int b = 0; b < B; b++) {
      loss += w[size_t(b)] * logp[size_t(b)];
      EXPECT_TRUE(close(logdet[size_t(b)], r.get("logdet").f32()[b], 1e-5)) << tag << "logdet " << b;
      // The layers' log-det against autograd's full Jacobian (slogdet of a 128×128 matrix).
      EXPECT_TRUE(close(logdet[size_t(b)], r.get("logdet_jacobian").f32()[b], 1e-5)) << tag << "jacobian " << b;
      EXPECT_TRUE(close(logp[size_t(b)], r.get("logp").f32()[b], 1e-5)) << tag << "logp " << b;
    }
    EXPECT_TRUE(close(loss, r.get("loss").f32()[0], 1e-5)) << tag << "loss";
    // Gradients: fp32 forwards through ~20 layers and sums over the batch and positions against float64 carry
    // ~1e-4 relative error (seen: up to 1.7e-4 on actnorm's logs), so 1e-3 of each value plus 1e-4 of the
    // tensor's RMS, as for the DiT.
    auto grad_close = [](const float* a, const float* b, int64_t n) {
      double rms = 0;
      for (int64_t i = 0; i < n; i++) rms += double(b[i]) * b[i];
      rms = std::sqrt(rms / double(n));
      bool ok = rms > 0;
      for (int64_t i = 0; i < n; i++) ok = ok && std::fabs(a[i] - b[i]) <= 1e-3 * std::fabs(b[i]) + 1e-4 * rms;
      return ok;
    };
    EXPECT_TRUE(grad_close(dx.data(), r.get("dx").f32(), B * P)) << tag << "dx";
    for (const ParamSpec& s : m.table().specs) {
      if (!s.trainable) continue;  // actnorm_initialized
      const Tensor& g = r.get("grad." + s.name);
      ASSERT_EQ(g.numel(), s.numel()) << s.name;
      EXPECT_TRUE(grad_close(m.grads() + s.offset, g.f32(), g.numel())) << tag << s.name;
    }
  }
}

TEST(RealNVP, ActnormDataDependentInit) {
  RealNVPConfig c = tiny();
  c.couplings = 0, c.scales = 0, c.final_couplings = 1;  // actnorm, checkerboard coupling
  auto be = nn::make_cpu_backend();
  RealNVP m(c, *be);
  m.init_random(1);
  const int B = 64;
  std::vector<float> x = images(B, c.pixels(), 23);
  for (float& v : x) v = 0.3f * v + 0.2f;
  EXPECT_FALSE(m.actnorm_initialized());
  m.init_actnorm(x.data(), B);
  EXPECT_TRUE(m.actnorm_initialized());
  // The coupling starts as the identity, so z is the actnorm's output: zero mean, unit variance.
  std::vector<double> logp(static_cast<size_t>(B));
  std::vector<float> z(x.size());
  m.forward(logp.data(), x.data(), B, z.data());
  double s = 0, ss = 0;
  for (float v : z) s += v, ss += double(v) * v;
  const double mean = s / double(z.size()), var = ss / double(z.size()) - mean * mean;
  EXPECT_NEAR(mean, 0, 1e-5);
  EXPECT_NEAR(var, 1, 1e-4);
}

TEST(RealNVP, ConfigErrors) {
  auto bad = [](const std::string& json, const char* needle) {
    try {
      RealNVPConfig::from_json(json, "cfg.json");
      ADD_FAILURE() << "no error for " << json;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  bad(R"({"model_type": "dit"})", "model_type");
  bad(R"({"model_type": "realnvp", "image_size": 28, "scales": 3})", "image_size");
  bad(R"({"model_type": "realnvp", "depth": 0})", "depth");
  bad(R"({"model_type": "realnvp", "hidden": "wide"})", "hidden");
  bad(R"({"model_type": "realnvp", "additive": 1})", "additive");
  bad("{", "not valid JSON");
  const RealNVPConfig c = RealNVPConfig::from_json(tiny(true).to_json(), "x");
  EXPECT_TRUE(c.additive);
  EXPECT_EQ(c.hidden, 8);
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

// The flow through the image-model factory (model_type realnvp, task density): the loss is bits/dim of the
// dequantised images. An untrained flow is the identity (zero output layers, actnorm not yet set), so its loss
// is that of N(0, I) on x + (u − ½)/127.5: E[(x + d)²] = x² + 1/(12·127.5²).
TEST(RealNVP, ImageModelLossIsBitsPerDim) {
  RealNVPConfig c = tiny();
  auto m = make_image_model(c.to_json(), "test", {});
  ASSERT_TRUE(m->provides(ImageTask::Density));
  EXPECT_FALSE(m->provides(ImageTask::Denoise));
  m->init_random(1);
  const int B = 32;
  const int64_t P = m->pixels();
  const std::vector<float> x = images(B, P, 5);
  m->plan(B);
  double q = 0;
  for (float v : x) q += double(v) * v + 1.0 / (12 * 127.5 * 127.5);
  const double nats = (0.5 * q / B + 0.5 * double(P) * std::log(2 * M_PI)) / double(P);
  const double want = nats / std::log(2.0) + std::log2(127.5);
  // Dequantisation's sampling error on Σx·d: ~√(B·P)·0.58·(1/255)/(B·P·ln 2) ≈ 1e-4.
  EXPECT_NEAR(m->loss_forward(x.data(), nullptr, B, /*train=*/false), want, 1e-3);
  // The same images evaluate the same (a fixed evaluation seed).
  EXPECT_EQ(m->loss_forward(x.data(), nullptr, B, false), m->loss_forward(x.data(), nullptr, B, false));
}

TEST(RealNVP, ImageModelTrainsByMaximumLikelihood) {
  // Correlated toy images: a shared value per image plus a little noise; the flow must learn the correlation.
  RealNVPConfig c = tiny();
  c.hidden = 16;
  auto m = make_image_model(c.to_json(), "test", {});
  m->init_random(2);
  const int B = 64;
  const int64_t P = m->pixels();
  Rng r(9);
  std::vector<float> x(size_t(B * P));
  for (int b = 0; b < B; b++) {
    const float s = 0.6f * (2 * r.uniform() - 1);
    for (int64_t i = 0; i < P; i++) x[size_t(b * P + i)] = s + 0.05f * (2 * r.uniform() - 1);
  }
  m->plan(B);
  const double first = m->loss_forward(x.data(), nullptr, B, true);
  m->loss_backward();
  const ParamBlocks pb = m->blocks();
  for (int step = 0; step < 200; step++) {
    for (size_t i = 0; i < pb.n; i++) pb.params[i] -= 0.02f * pb.grads[i], pb.grads[i] = 0;
    m->loss_forward(x.data(), nullptr, B, true);
    m->loss_backward();
  }
  const double last = m->loss_forward(x.data(), nullptr, B, false);
  EXPECT_LT(last, first - 1.0) << first << " -> " << last;
  // Latents map back to finite images.
  std::vector<float> z(size_t(4 * P), 0.0f), img(z.size());
  m->generate(img.data(), z.data(), nullptr, 4);
  for (float v : img) EXPECT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace kiln
