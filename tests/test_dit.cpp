// The DiT (models/dit.h) against tests/peer/torch_dit.py (PyTorch, float64, written from the paper) on the same
// random weights and inputs: the output and every parameter's gradient; plus a directional finite difference
// of the model's own forward, the rearrangements' inverses, and the configuration's checks.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "core/error.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "models/dit.h"
#include "tests/io_test_helpers.h"
#include "tests/test_util.h"

namespace kiln {
namespace {

DiTConfig tiny() {
  DiTConfig c;
  c.image_size = 8, c.channels = 2, c.patch = 2, c.hidden = 32, c.depth = 2, c.heads = 2, c.classes = 3;
  c.freq_dim = 16;
  return c;
}

// Every parameter random (adaLN-Zero's zeros would hide the gradients of most of the model).
void randomize(DiT& m, uint64_t seed, float scale = 0.2f) {
  Rng r(seed);
  for (size_t i = 0; i < m.table().total; i++) m.params()[i] = scale * r.normal();
}

struct Inputs {
  std::vector<float> x, t, dout;
  std::vector<int32_t> y;
};
Inputs inputs(const DiTConfig& c, int B, uint64_t seed) {
  const size_t n = size_t(B) * c.channels * c.image_size * c.image_size;
  Inputs in{test::randn(n, seed), std::vector<float>(size_t(B)), test::randn(n, seed + 1), std::vector<int32_t>(size_t(B))};
  for (int b = 0; b < B; b++) {
    in.t[size_t(b)] = 0.25f * float(b) - 0.4f;  // EDM's c_noise = ln(σ)/4 is of this size
    in.y[size_t(b)] = b % (c.classes + 1);      // includes the null class
  }
  return in;
}

TEST(DiT, MatchesTorchForwardAndBackward) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no torch";
  const DiTConfig c = tiny();
  const int B = 4;
  auto be = nn::make_cpu_backend();
  DiT m(c, *be);
  randomize(m, 3);
  m.plan(B);
  Inputs in = inputs(c, B, 11);
  std::vector<float> out(in.x.size());
  m.forward(out.data(), in.x.data(), in.t.data(), in.y.data(), B);
  m.backward(in.dout.data());

  test::ScratchDir d("dit_torch");
  std::vector<Tensor> ts;
  for (const ParamSpec& s : m.table().specs) ts.push_back({s.name, DType::F32, s.shape, m.params() + s.offset});
  std::vector<float> yf(in.y.begin(), in.y.end());
  const int64_t H = c.image_size;
  ts.push_back({"x", DType::F32, Shape{B, c.channels, H, H}, in.x.data()});
  ts.push_back({"dout", DType::F32, Shape{B, c.channels, H, H}, in.dout.data()});
  ts.push_back({"c_noise", DType::F32, Shape{B}, in.t.data()});
  ts.push_back({"labels", DType::F32, Shape{B}, yf.data()});
  write_safetensors((d.path / "in.safetensors").string(), ts);
  std::ofstream((d.path / "config.json").string()) << c.to_json();
  const std::string cmd = "/usr/bin/python3 " KILN_SOURCE_DIR "/tests/peer/torch_dit.py " + (d.path / "config.json").string() +
                          " " + (d.path / "in.safetensors").string() + " " + (d.path / "out.safetensors").string();
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  SafeTensorsReader r((d.path / "out.safetensors").string());
  const Tensor& ref = r.get("out");
  EXPECT_TRUE(test::all_close(out.data(), ref.f32(), out.size(), 1e-4, 1e-5)) << "out";
  for (const ParamSpec& s : m.table().specs) {
    const Tensor& g = r.get("grad." + s.name);
    ASSERT_EQ(g.numel(), s.numel()) << s.name;
    // fp32 sums over up to B·T rows against float64: relative 1e-4 of the tensor's own scale.
    double rms = 0;
    for (int64_t i = 0; i < g.numel(); i++) rms += double(g.f32()[i]) * g.f32()[i];
    rms = std::sqrt(rms / double(g.numel()));
    EXPECT_GT(rms, 0) << s.name << ": the gradient is zero (the test would not see it)";
    EXPECT_TRUE(test::all_close(m.grads() + s.offset, g.f32(), size_t(s.numel()), 1e-3, 1e-4 * rms + 1e-7))
        << s.name;
  }
}

TEST(DiT, DirectionalFiniteDifference) {
  const DiTConfig c = tiny();
  const int B = 3;
  auto be = nn::make_cpu_backend();
  DiT m(c, *be);
  randomize(m, 5);
  m.plan(B);
  Inputs in = inputs(c, B, 21);
  std::vector<float> out(in.x.size());
  auto loss = [&] {
    m.forward(out.data(), in.x.data(), in.t.data(), in.y.data(), B);
    double s = 0;
    for (size_t i = 0; i < out.size(); i++) s += double(out[i]) * in.dout[i];
    return s;
  };
  loss();
  m.backward(in.dout.data());
  const std::vector<float> p0(m.params(), m.params() + m.table().total);
  const std::vector<float> dir = test::randn(p0.size(), 99);
  double analytic = 0;
  for (size_t i = 0; i < p0.size(); i++) analytic += double(m.grads()[i]) * dir[i];
  const double h = 1e-3;
  auto at = [&](double s) {
    for (size_t i = 0; i < p0.size(); i++) m.params()[i] = float(p0[i] + s * dir[i]);
    return loss();
  };
  const double fd = (at(h) - at(-h)) / (2 * h);
  EXPECT_NEAR(analytic, fd, 2e-3 * std::fabs(fd) + 1e-3) << "analytic " << analytic << " fd " << fd;
}

TEST(DiT, BlockRecomputationGivesIdenticalGradientsInLessMemory) {
  // --recompute block: the backward reruns each block's forward from its kept input; the same kernels on the same
  // inputs, so the output and every gradient are bit-identical, with a smaller activation plan.
  const DiTConfig c = tiny();
  const int B = 3;
  auto be = nn::make_cpu_backend();
  Inputs in = inputs(c, B, 23);
  std::vector<std::vector<float>> outs, grads;
  std::vector<size_t> bytes;
  for (bool rc : {false, true}) {
    DiT m(c, *be);
    randomize(m, 6);
    bytes.push_back(m.plan(B, rc));
    std::vector<float> out(in.x.size());
    m.forward(out.data(), in.x.data(), in.t.data(), in.y.data(), B);
    m.backward(in.dout.data());
    outs.push_back(out);
    grads.emplace_back(m.grads(), m.grads() + m.table().total);
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(grads[0], grads[1]);
  EXPECT_LT(bytes[1], bytes[0]);
}

TEST(DiT, RearrangementsAndConfig) {
  DiTConfig c = tiny();
  c.channels = 3;
  const int B = 2;
  const auto img = test::randn(size_t(B) * 3 * 64, 1);
  std::vector<float> tok(img.size()), back(img.size());
  dit_patchify_out(tok.data(), img.data(), B, c);
  dit_unpatchify(back.data(), tok.data(), B, c);
  EXPECT_EQ(back, img);
  // patchify: token (gi, gj), feature (c, i, j) = pixel (c, gi·p + i, gj·p + j).
  dit_patchify(tok.data(), img.data(), B, c);
  EXPECT_EQ(tok[(1 * 16 + 2 * 4 + 3) * 12 + (2 * 2 + 1) * 2 + 0], img[((1 * 3 + 2) * 8 + 2 * 2 + 1) * 8 + 3 * 2 + 0]);
  for (const char* p : {"DiT-S/2", "DiT-S/4", "DiT-B/2", "DiT-B/4"}) {
    DiTConfig k = DiTConfig::preset(p);
    EXPECT_NO_THROW(k.validate()) << p;
    EXPECT_EQ(DiTConfig::from_json(k.to_json(), "x").hidden, k.hidden);
  }
  EXPECT_EQ(DiTConfig::preset("DiT-S/2").hidden, 384);
  EXPECT_EQ(DiTConfig::preset("DiT-B/4").patch, 4);
  // DiT-S/2 on 28×28: the reference's parameter count (without learn_sigma, one channel, 10 classes).
  const ParamTable t = dit_param_table(DiTConfig::preset("DiT-S/2"));
  int64_t count = 0;
  for (const auto& s : t.specs) count += s.numel();
  const int64_t D = 384, F = 4 * D;
  const int64_t per_block = 3 * D * D + 3 * D + D * D + D + F * D + F + D * F + D + 6 * D * D + 6 * D;
  EXPECT_EQ(count, D * 4 + D + D * 256 + D + D * D + D + 11 * D + 12 * per_block + 4 * D + 4 + 2 * D * D + 2 * D);
  c.patch = 3;
  EXPECT_THROW(c.validate(), Error);
  EXPECT_THROW(DiTConfig::preset("DiT-L/2"), Error);
  auto be = nn::make_cpu_backend();
  DiT m(tiny(), *be);
  m.plan(2);
  Inputs in = inputs(tiny(), 2, 3);
  in.y[1] = 4;  // beyond the null class (3)
  std::vector<float> out(in.x.size());
  try {
    m.forward(out.data(), in.x.data(), in.t.data(), in.y.data(), 2);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("label 4 of sample 1 is out of range"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kiln
