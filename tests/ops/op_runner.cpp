// Runs the op table (tests/ops/op_table.h) as gtest cases: one test per op, mode and backend, e.g.
// OpsForward.layernorm_cuda, OpsGradient.attention_ref (ref:: backward against finite differences). Each test
// prints its cases' worst error as a fraction of the tolerance. The same source builds into the emulator
// binary (cpu, ref and cuda-on-emulator tests, label unit) and the CUDA one (cuda tests on the device).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/dtype.h"
#include "core/rng.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/ops/op_table.h"

namespace kiln::ops {

float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
std::vector<float> round_to(std::vector<float> v, DType dt) {
  if (dt == DType::BF16)
    for (auto& x : v) x = round_bf16(x);
  return v;
}
std::vector<float> randn(size_t n, uint64_t seed, float scale, DType dt) {
  Rng r(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = r.normal() * scale;
  return round_to(std::move(v), dt);
}
const char* dtype_name(DType dt) { return dt == DType::F32 ? "fp32" : "bf16"; }

namespace {

double unit_roundoff(DType dt) { return dt == DType::F32 ? 0x1p-24 : 0x1p-9; }

// Every input value moved by up to one rounding of its storage type: what a naive implementation at that
// precision reads (the yardstick's inputs).
Tensors perturbed(const Tensors& in, uint64_t seed) {
  Rng r(seed);
  Tensors p = in;
  for (auto& t : p)
    for (auto& x : t.v) x = float(double(x) * (1.0 + (2.0 * r.uniform() - 1.0) * unit_roundoff(t.dt)));
  return p;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, 4) == 0 || (std::isnan(a) && std::isnan(b)); }

// The worst error / tolerance ratio over a case's checks, and where it was.
struct Worst {
  double ratio = 0;
  std::string where;
  void add(double r, const std::string& w) {
    if (!(r <= ratio)) ratio = r, where = w;  // NaN counts as worst
  }
};

void compare(const OpCase& c, const Tensors& got, const Tensors& want, const Tensors& yard, Worst& w) {
  ASSERT_EQ(got.size(), want.size()) << c.op << " " << c.name << ": output count";
  for (size_t t = 0; t < want.size(); t++) {
    const auto& g = got[t].v;
    const auto& r = want[t].v;
    ASSERT_EQ(g.size(), r.size()) << c.op << " " << c.name << ": size of " << want[t].name;
    double rms = 0, rms_ref = 0;  // of yard − ref, and of ref
    if (!c.exact) {
      for (size_t i = 0; i < r.size(); i++) {
        rms += std::pow(double(yard[t].v[i]) - r[i], 2);
        rms_ref += double(r[i]) * r[i];
      }
      rms = std::sqrt(rms / double(std::max<size_t>(r.size(), 1)));
      rms_ref = std::sqrt(rms_ref / double(std::max<size_t>(r.size(), 1)));
    }
    const bool exact = c.exact || std::count(c.exact_outputs.begin(), c.exact_outputs.end(), int(t)) > 0;
    const double u = unit_roundoff(got[t].dt);  // the output's own rounding
    double worst = 0;
    size_t wi = 0;
    for (size_t i = 0; i < r.size(); i++) {
      double ratio;
      if (std::isnan(g[i]) || std::isnan(r[i]))
        ratio = std::isnan(g[i]) && std::isnan(r[i]) ? 0 : INFINITY;
      else if (exact)
        ratio = same_bits(g[i], r[i]) ? 0 : INFINITY;
      else {
        const double err = std::fabs(double(g[i]) - r[i]);
        const double tol =
            c.k * (std::fabs(double(yard[t].v[i]) - r[i]) + u * (std::fabs(double(r[i])) + rms_ref) + rms);
        ratio = err == 0 ? 0 : tol == 0 ? INFINITY : err / tol;
      }
      if (ratio > worst) worst = ratio, wi = i;
    }
    char where[160];
    std::snprintf(where, sizeof where, "%s[%zu]: %.9g vs %.9g", want[t].name.c_str(), wi, r.empty() ? 0.0 : g[wi],
                  r.empty() ? 0.0 : r[wi]);
    w.add(worst, where);
    EXPECT_LE(worst, 1.0) << c.op << " " << c.name << ": " << where << " (" << worst << " of the tolerance)";
  }
}

// Each gradient against a central difference of the loss along a random direction d: the analytic side is
// Σ g·(x₊ − x₋)/2h over the float inputs actually evaluated. The difference's own error is estimated from
// the same difference at h/2 plus the loss's rounding noise; the gradient's from one rounding of its
// storage type per term (Σ|g·d|, as if all errors had one sign). The factor 4 covers estimates that happen
// to come out small.
void fd_check(const OpCase& c, const Tensors& got, uint64_t seed, Worst& w) {
  for (const GradOf& gr : c.grads) {
    const auto& x0 = c.inputs[size_t(gr.in)].v;
    const auto& g = got[size_t(gr.out)].v;
    ASSERT_EQ(g.size(), x0.size()) << c.op << " " << c.name << ": gradient " << got[size_t(gr.out)].name;
    const auto d = randn(x0.size(), seed + uint64_t(gr.in));
    double rms = 0;
    for (float v : x0) rms += double(v) * v;
    rms = std::sqrt(rms / double(std::max<size_t>(x0.size(), 1)));
    double analytic = 0, analytic_abs = 0, noise_scale = 0;
    auto fd = [&](double h, bool keep) {
      Tensors xp = c.inputs, xm = c.inputs;
      auto& p = xp[size_t(gr.in)].v;
      auto& m = xm[size_t(gr.in)].v;
      double an = 0, an_abs = 0;
      for (size_t i = 0; i < x0.size(); i++) {
        p[i] = float(x0[i] + h * d[i]);
        m[i] = float(x0[i] - h * d[i]);
        const double gi = double(g[i]) - (gr.init >= 0 ? c.inputs[size_t(gr.init)].v[i] : 0.0);
        an += gi * (double(p[i]) - m[i]) / (2 * h);
        an_abs += std::fabs(double(g[i]) * d[i]);
      }
      double ap = 0, am = 0;
      const double lp = c.loss(xp, &ap), lm = c.loss(xm, &am);
      if (keep) analytic = an, analytic_abs = an_abs, noise_scale = std::max(ap, am);
      return (lp - lm) / (2 * h);
    };
    const double h = c.fd_h > 0 ? c.fd_h : c.fd_step * std::max(rms, 1e-3);
    const double f1 = fd(h, true), f2 = fd(h / 2, false);
    const DType gdt = got[size_t(gr.out)].dt;
    // The loss's outputs round independently: its error is about 2^-24·sqrt(Σ terms²), at h/2 twice the
    // difference's.
    const double tol =
        4 * (std::fabs(f1 - f2) + 0x1p-24 * std::sqrt(noise_scale) / (h / 2) + unit_roundoff(gdt) * analytic_abs);
    const double err = std::fabs(analytic - f1);
    const double ratio = err == 0 ? 0 : err / tol;
    char where[200];
    std::snprintf(where, sizeof where, "d%s·d: %.9g vs finite difference %.9g", c.inputs[size_t(gr.in)].name.c_str(),
                  analytic, f1);
    w.add(ratio, where);
    EXPECT_LE(ratio, 1.0) << c.op << " " << c.name << ": " << where << " (" << ratio << " of the tolerance)";
  }
}

enum class Backend { Ref, Cpu, Cuda };
const char* backend_name(Backend b) { return b == Backend::Ref ? "ref" : b == Backend::Cpu ? "cpu" : "cuda"; }

class OpTest : public ::testing::Test {
 public:
  OpTest(std::vector<const OpCase*> cases, Backend b) : cases_(std::move(cases)), b_(b) {}
  void TestBody() override {
    if (b_ == Backend::Cuda && !test::gpu_ready()) GTEST_SKIP() << "no GPU";
    const OpCase& first = *cases_.front();
    Worst all;
    for (const OpCase* c : cases_) {
      SCOPED_TRACE(c->op + " " + c->name);
      const uint64_t seed = std::hash<std::string>{}(c->op + c->name);
      const Tensors want = c->ref(c->inputs);
      Tensors got;
      try {
        got = b_ == Backend::Ref ? want : b_ == Backend::Cpu ? c->cpu(c->inputs) : c->cuda(c->inputs);
      } catch (const std::exception& e) {
        ADD_FAILURE() << c->op << " " << c->name << " on " << backend_name(b_) << ": " << e.what();
        continue;
      }
      Worst w;
      if (b_ != Backend::Ref) {
        Tensors yard;
        if (!c->exact) {
          yard = c->ref(perturbed(c->inputs, seed));
          // Rounded to what this backend stores each output as.
          for (size_t t = 0; t < yard.size() && t < got.size(); t++)
            yard[t].v = round_to(std::move(yard[t].v), got[t].dt);
        }
        compare(*c, got, want, yard, w);
      }
      if (c->mode == Mode::Gradient) fd_check(*c, got, seed, w);
      std::printf("  %-28s worst %.3f of tolerance (%s)\n", c->name.c_str(), w.ratio, w.where.c_str());
      all.add(w.ratio, c->name + ": " + w.where);
    }
    std::printf("[ops] %s %s %s: %zu cases, worst error %.3f of tolerance (%s)\n", first.op.c_str(), backend_name(b_),
                first.mode == Mode::Forward ? "forward" : "gradient", cases_.size(), all.ratio, all.where.c_str());
  }

 private:
  std::vector<const OpCase*> cases_;
  Backend b_;
};

}  // namespace
}  // namespace kiln::ops

int main(int argc, char** argv) {
  using namespace kiln::ops;
  ::testing::InitGoogleTest(&argc, argv);
  static const std::vector<OpCase> table = op_table();
  // One test per (mode, op, backend), in table order.
  std::vector<std::pair<std::string, Backend>> order;
  std::map<std::pair<std::string, Backend>, std::vector<const OpCase*>> groups;
  for (const OpCase& c : table) {
    const std::string key = std::string(c.mode == Mode::Forward ? "OpsForward." : "OpsGradient.") + c.op;
    std::vector<Backend> bs;
#ifdef KILN_TEST_EMULATED
    // The CPU kernels and the reference's own gradient check run once, in the emulator binary.
    if (c.mode == Mode::Gradient) bs.push_back(Backend::Ref);
    if (c.cpu) bs.push_back(Backend::Cpu);
#endif
    if (c.cuda) bs.push_back(Backend::Cuda);
    for (Backend b : bs) {
      auto& g = groups[{key, b}];
      if (g.empty()) order.push_back({key, b});
      g.push_back(&c);
    }
  }
  for (const auto& [key, b] : order) {
    const auto dot = key.find('.');
    const std::string suite = key.substr(0, dot), name = key.substr(dot + 1) + "_" + backend_name(b);
    std::vector<const OpCase*> cases = groups[{key, b}];
    const Backend be = b;
    ::testing::RegisterTest(suite.c_str(), name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                            [cases, be]() -> OpTest* { return new OpTest(cases, be); });
  }
  return RUN_ALL_TESTS();
}
