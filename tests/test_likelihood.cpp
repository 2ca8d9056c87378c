// The probability-flow likelihood (infer/likelihood.h) driven by exact models whose densities are known in closed
// form: Gaussian data N(μ, Σ) (the denoiser of tests/test_samplers.cpp: E[x₀|x] = μ + aΣM⁻¹(x − aμ), M = a²Σ + s²I)
// and a mixture of two diagonal Gaussians (a nonlinear denoiser: the components' posteriors weighted by their
// responsibilities). At the path's start ℓ₀ the marginal is analytic, N(x; aμ, M) (per component), so the ODE's
// log p(x) must equal it: to integration and finite-difference error with the exact trace, and within the
// estimator's standard error with Hutchinson's; both for the finite-difference JVP (--jacobian fd) and the
// vector-Jacobian product (--jacobian vjp; here the analytic network's Jacobian by a central difference in
// double precision, error ~1e-10). Then a small DiT: its VJP through the backward pass against finite
// differences of its forward, and the likelihood by either Jacobian path.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>

#include "core/error.h"
#include "infer/likelihood.h"
#include "models/image_model.h"

namespace kiln {
namespace {

// A mixture of Gaussians with full covariances Σ_m = L_m·L_mᵀ in P dimensions; M⁻¹ by Cholesky per call.
struct Mixture {
  int P = 0;
  std::vector<double> weight;                  // π_m
  std::vector<std::vector<double>> mu, L;      // [P], [P·P] lower triangular

  // Σ_m and the Cholesky factor C of M = a²Σ_m + s²I; returns log det M.
  double factor(int m, double a, double s, std::vector<double>& S, std::vector<double>& C) const {
    S.assign(size_t(P * P), 0), C.assign(size_t(P * P), 0);
    for (int i = 0; i < P; i++)
      for (int j = 0; j < P; j++)
        for (int k = 0; k < P; k++) S[size_t(i * P + j)] += L[size_t(m)][size_t(i * P + k)] * L[size_t(m)][size_t(j * P + k)];
    double logdet = 0;
    for (int i = 0; i < P; i++)
      for (int j = 0; j <= i; j++) {
        double v = a * a * S[size_t(i * P + j)] + (i == j ? s * s : 0.0);
        for (int k = 0; k < j; k++) v -= C[size_t(i * P + k)] * C[size_t(j * P + k)];
        if (i == j) {
          C[size_t(i * P + i)] = std::sqrt(v);
          logdet += 2 * std::log(C[size_t(i * P + i)]);
        } else {
          C[size_t(i * P + j)] = v / C[size_t(j * P + j)];
        }
      }
    return logdet;
  }
  // y = M⁻¹r by the two triangular solves.
  void solve(const std::vector<double>& C, const double* r, double* y) const {
    for (int i = 0; i < P; i++) {
      double v = r[i];
      for (int k = 0; k < i; k++) v -= C[size_t(i * P + k)] * y[k];
      y[i] = v / C[size_t(i * P + i)];
    }
    for (int i = P - 1; i >= 0; i--) {
      double v = y[i];
      for (int k = i + 1; k < P; k++) v -= C[size_t(k * P + i)] * y[k];
      y[i] = v / C[size_t(i * P + i)];
    }
  }
  // log p_ℓ(x) of x_ℓ = a·x₀ + s·ε, and the posterior means E[x₀|x], E[ε|x].
  double density(const double* x, double a, double s, double* x0 = nullptr, double* eps = nullptr) const {
    const int Mn = int(weight.size());
    std::vector<double> logw(static_cast<size_t>(Mn)), S, C, r(static_cast<size_t>(P)), y(static_cast<size_t>(P));
    std::vector<std::vector<double>> ex0(static_cast<size_t>(Mn), std::vector<double>(static_cast<size_t>(P))), eeps = ex0;
    double top = -1e300;
    for (int m = 0; m < Mn; m++) {
      const double logdet = factor(m, a, s, S, C);
      for (int i = 0; i < P; i++) r[size_t(i)] = x[i] - a * mu[size_t(m)][size_t(i)];
      solve(C, r.data(), y.data());
      double q = 0;
      for (int i = 0; i < P; i++) q += r[size_t(i)] * y[size_t(i)];
      logw[size_t(m)] = std::log(weight[size_t(m)]) - 0.5 * (P * std::log(2 * M_PI) + logdet + q);
      top = std::max(top, logw[size_t(m)]);
      for (int i = 0; i < P; i++) {
        double sy = 0;
        for (int j = 0; j < P; j++) sy += S[size_t(i * P + j)] * y[size_t(j)];
        ex0[size_t(m)][size_t(i)] = mu[size_t(m)][size_t(i)] + a * sy;
        eeps[size_t(m)][size_t(i)] = s * y[size_t(i)];
      }
    }
    double z = 0;
    for (int m = 0; m < Mn; m++) z += std::exp(logw[size_t(m)] - top);
    if (x0)
      for (int i = 0; i < P; i++) {
        x0[i] = eps[i] = 0;
        for (int m = 0; m < Mn; m++) {
          const double w = std::exp(logw[size_t(m)] - top) / z;
          x0[i] += w * ex0[size_t(m)][size_t(i)], eps[i] += w * eeps[size_t(m)][size_t(i)];
        }
      }
    return top + std::log(z);
  }
  // Draws n samples of x₀.
  std::vector<float> draw(int n, Rng& r) const {
    std::vector<float> x(static_cast<size_t>(n) * P);
    for (int b = 0; b < n; b++) {
      const double u = r.uniform();
      int m = 0;
      for (double c = weight[0]; m + 1 < int(weight.size()) && u > c; c += weight[size_t(++m)]) {
      }
      std::vector<double> e(static_cast<size_t>(P));
      for (auto& v : e) v = r.normal();
      for (int i = 0; i < P; i++) {
        double v = mu[size_t(m)][size_t(i)];
        for (int k = 0; k <= i; k++) v += L[size_t(m)][size_t(i * P + k)] * e[size_t(k)];
        x[size_t(b * P + i)] = float(v);
      }
    }
    return x;
  }
};

// The Gaussian of tests/test_samplers.cpp (P = 3, correlated) and a two-component mixture in P = 2.
Mixture gaussian() {
  return {3, {1.0}, {{0.5, -0.3, 0.2}}, {{0.5, 0, 0, 0.2, 0.4, 0, -0.1, 0.15, 0.3}}};
}
Mixture mixture() {
  return {2, {0.3, 0.7}, {{-0.6, 0.4}, {0.5, -0.2}}, {{0.2, 0, 0.05, 0.15}, {0.25, 0, -0.1, 0.2}}};
}

// The exact network of objective o for data d: F = tx·E[x₀|x] + te·E[ε|x], in double for one sample.
void exact_F(const Objective& o, const Mixture& d, double level, const double* x, double* F) {
  const Coefficients k = o.at(level);
  std::vector<double> x0(static_cast<size_t>(d.P)), eps(static_cast<size_t>(d.P));
  d.density(x, k.a, k.s, x0.data(), eps.data());
  for (int i = 0; i < d.P; i++) F[i] = k.tx * x0[size_t(i)] + k.te * eps[size_t(i)];
}

DiffusionNet exact_net(const Objective& o, const Mixture& d) {
  return [&o, &d](float* F, const float* xt, double level, const int32_t*, int B) {
    const int P = d.P;
    std::vector<double> x(static_cast<size_t>(P)), f(static_cast<size_t>(P));
    for (int b = 0; b < B; b++) {
      for (int i = 0; i < P; i++) x[size_t(i)] = xt[b * P + i];
      exact_F(o, d, level, x.data(), f.data());
      for (int i = 0; i < P; i++) F[b * P + i] = float(f[size_t(i)]);
    }
  };
}

// Its vector-Jacobian product v = zᵀ·∂F/∂x, the Jacobian's columns by central differences in double (h = 1e-6
// times the level's scale: truncation ~1e-12, rounding ~1e-10).
DiffusionVJP exact_vjp(const Objective& o, const Mixture& d) {
  return [&o, &d](float* F, float* v, const float* xt, const float* z, double level, const int32_t*, int B) {
    const int P = d.P;
    const Coefficients k = o.at(level);
    const double h = 1e-6 * std::sqrt(k.a * k.a + k.s * k.s);
    std::vector<double> x(static_cast<size_t>(P)), f(static_cast<size_t>(P)), fp = f, fm = f;
    for (int b = 0; b < B; b++) {
      for (int i = 0; i < P; i++) x[size_t(i)] = xt[b * P + i];
      exact_F(o, d, level, x.data(), f.data());
      for (int i = 0; i < P; i++) F[b * P + i] = float(f[size_t(i)]), v[b * P + i] = 0;
      for (int j = 0; j < P; j++) {  // column j of J: ∂F/∂x_j; v_j = Σ_i z_i·J_ij
        const double xj = x[size_t(j)];
        x[size_t(j)] = xj + h, exact_F(o, d, level, x.data(), fp.data());
        x[size_t(j)] = xj - h, exact_F(o, d, level, x.data(), fm.data());
        x[size_t(j)] = xj;
        double s = 0;
        for (int i = 0; i < P; i++) s += double(z[b * P + i]) * (fp[size_t(i)] - fm[size_t(i)]) / (2 * h);
        v[b * P + j] = float(s);
      }
    }
  };
}

// The analytic log-density at the path's start (the level the ODE reads the data at).
std::vector<double> analytic(const Objective& o, const Mixture& d, const std::vector<float>& x, double level) {
  const Coefficients k = o.at(level);
  std::vector<double> out, xi(static_cast<size_t>(d.P));
  for (size_t b = 0; b * d.P < x.size(); b++) {
    for (int i = 0; i < d.P; i++) xi[size_t(i)] = x[b * d.P + size_t(i)];
    out.push_back(d.density(xi.data(), k.a, k.s));
  }
  return out;
}

double start_level(const std::string& obj) { return obj == "ve" ? 0.02 : obj == "edm" ? 0.002 : 1e-3; }

TEST(Likelihood, ExactTraceMatchesAnalyticDensity) {
  for (const char* jac : {"fd", "vjp"})
  for (const Mixture& d : {gaussian(), mixture()}) {
    for (const char* name : {"flow", "gvp", "edm", "ve"}) {
      const Objective o = Objective::make(name);
      Rng r(7);
      const int B = 64;
      const std::vector<float> x = d.draw(B, r);
      std::vector<int32_t> labels(static_cast<size_t>(B), 0);
      LikelihoodOptions opt;
      opt.trace = "exact", opt.steps = 48, opt.jacobian = jac;
      // ve/edm: the N(0, σ_max²) prior ignores the data's mean, an error of about μ·x/σ_max² ~ |μ|/σ_max nats
      // (0.02 at σ_max = 80 here); at σ_max = 5000 it is below 1e-3, and the path (ln σ from ln 0.002) is
      // 14.7 long: 96 steps (48 leave 4e-3 of RK4 error, 96 under 2e-3).
      if (std::string(name) == "ve" || std::string(name) == "edm") opt.level_max = 5000, opt.steps = 96;
      const LikelihoodResult res = log_likelihood(o, opt, exact_net(o, d), x.data(), labels.data(), B, d.P,
                                                  rng_noise(r), exact_vjp(o, d));
      const std::vector<double> want = analytic(o, d, x, start_level(name));
      double worst = 0;
      for (int b = 0; b < B; b++) worst = std::max(worst, std::fabs(res.log_density[size_t(b)] - want[size_t(b)]));
      EXPECT_LT(worst, 2e-3) << name << " P=" << d.P << " " << jac;
      const bool vjp = std::string(jac) == "vjp";
      EXPECT_EQ(res.nfe, 4 * opt.steps * (vjp ? d.P : 1 + 2 * d.P)) << name;
      EXPECT_EQ(res.vjps, vjp ? 4 * opt.steps * d.P : 0) << name;
    }
  }
}

TEST(Likelihood, HutchinsonAgreesWithExactTraceWithinItsError) {
  const Mixture d = mixture();
  for (const char* jac : {"fd", "vjp"})
  for (const char* probe : {"rademacher", "gaussian"}) {
    for (const char* name : {"flow", "edm"}) {
      const Objective o = Objective::make(name);
      Rng r(11);
      const int B = 400;
      const std::vector<float> x = d.draw(B, r);
      std::vector<int32_t> labels(static_cast<size_t>(B), 0);
      LikelihoodOptions opt;
      opt.steps = 24, opt.probe = probe, opt.probes = 2, opt.jacobian = jac;
      if (std::string(name) == "edm") opt.level_max = 5000;
      const LikelihoodResult h = log_likelihood(o, opt, exact_net(o, d), x.data(), labels.data(), B, d.P,
                                                rng_noise(r), exact_vjp(o, d));
      EXPECT_EQ(h.nfe, 4 * opt.steps * (std::string(jac) == "vjp" ? 2 : 5));
      const std::vector<double> want = analytic(o, d, x, start_level(name));
      std::vector<double> diff;
      for (int b = 0; b < B; b++) diff.push_back(h.log_density[size_t(b)] - want[size_t(b)]);
      const MeanSE m = mean_se(diff);
      // Unbiased: the mean error is within 4 standard errors of zero, and the estimator does scatter.
      EXPECT_LT(std::fabs(m.mean), 4 * m.se + 1e-3) << name << " " << probe << " " << jac << " mean " << m.mean
                                                     << " se " << m.se;
      EXPECT_GT(m.se, 1e-4) << name << " " << probe;
    }
  }
}

TEST(Likelihood, BitsPerDimOfDequantisedData) {
  // A density uniform over [-1, 1]^P (log p = −P·ln 2) spends log₂ 255... here exactly: 256 bins of width
  // 1/127.5 on a range 2 + 1/127.5 wide; the bound gives log₂(2·127.5) = log₂ 255 bits per value.
  EXPECT_NEAR(bits_per_dim(-3 * std::log(2.0), 3), std::log2(255.0), 1e-12);
  // Dequantisation stays within half a bin.
  Rng r(3);
  std::vector<float> x(1000, 0.2f);
  dequantize(x.data(), int64_t(x.size()), r);
  for (float v : x) EXPECT_LE(std::fabs(v - 0.2f), 0.5f / 127.5f + 1e-7f);
  const MeanSE m = mean_se({1, 2, 3, 4});
  EXPECT_DOUBLE_EQ(m.mean, 2.5);
  EXPECT_NEAR(m.se, std::sqrt(5.0 / 3.0 / 4.0), 1e-12);
}

// A small DiT (random weights moved off adaLN-Zero's zeros so every path carries signal).
std::unique_ptr<ImageModel> small_dit(int planned) {
  auto m = make_image_model(R"({"model_type": "dit", "image_size": 4, "channels": 1, "patch": 2, "hidden": 16,
    "depth": 1, "heads": 2, "mlp_ratio": 2, "classes": 2, "freq_dim": 16})", "test");
  m->init_random(5);
  Rng r(6);
  float* p = m->host_params();
  for (size_t i = 0; i < m->table().total; i++) p[i] += 0.2f * r.normal();
  m->params_changed();
  m->plan(planned);
  return m;
}

TEST(Likelihood, DiTVjpMatchesFiniteDifferencesOfItsForward) {
  const int B = 2;
  auto m = small_dit(B);
  const int64_t P = m->pixels();
  const Objective o = Objective::make("edm");
  const double level = 0.7;
  Rng r(8);
  std::vector<float> x(size_t(B * P)), z(x.size()), F(x.size()), v(x.size());
  for (auto& e : x) e = r.normal();
  for (auto& e : z) e = r.normal();
  const std::vector<int32_t> labels = {0, 2};
  denoiser_vjp(*m, o, B)(F.data(), v.data(), x.data(), z.data(), level, labels.data(), B);
  // Every entry of v = zᵀ·J against the Jacobian's columns by central differences of the fp32 forward (h = 1e-2:
  // truncation ~1e-5, rounding ~1e-5 relative).
  const DiffusionNet net = denoiser_net(*m, o, B);
  std::vector<float> F0(x.size()), Fp(x.size()), Fm(x.size());
  net(F0.data(), x.data(), level, labels.data(), B);
  for (size_t i = 0; i < F.size(); i++) EXPECT_NEAR(F[i], F0[i], 1e-6);  // the same forward
  const double h = 1e-2;
  double worst = 0, scale = 0;
  for (int64_t j = 0; j < P; j++) {
    std::vector<float> xp = x, xm = x;
    for (int b = 0; b < B; b++) xp[size_t(b * P + j)] += float(h), xm[size_t(b * P + j)] -= float(h);
    net(Fp.data(), xp.data(), level, labels.data(), B);
    net(Fm.data(), xm.data(), level, labels.data(), B);
    for (int b = 0; b < B; b++) {
      double s = 0;
      for (int64_t i = 0; i < P; i++) s += double(z[size_t(b * P + i)]) * (double(Fp[size_t(b * P + i)]) - Fm[size_t(b * P + i)]) / (2 * h);
      worst = std::max(worst, std::fabs(s - v[size_t(b * P + j)]));
      scale = std::max(scale, std::fabs(s));
    }
  }
  EXPECT_GT(scale, 1e-2);
  EXPECT_LT(worst, 2e-3 * scale) << "worst " << worst << " of " << scale;
}

TEST(Likelihood, DiTDensityByVjpMatchesFiniteDifferences) {
  const int B = 2;
  const Objective o = Objective::make("flow");
  auto m = small_dit(B * 16);
  const int64_t P = m->pixels();
  Rng r(9);
  std::vector<float> x(size_t(B * P));
  for (auto& e : x) e = 0.5f * r.normal();
  const std::vector<int32_t> labels = {1, 2};
  LikelihoodOptions opt;
  opt.trace = "exact", opt.steps = 4;
  double ld[2];
  for (int k = 0; k < 2; k++) {
    opt.jacobian = k == 0 ? "vjp" : "fd";
    Rng rn(1);
    const LikelihoodResult res = log_likelihood(o, opt, denoiser_net(*m, o, B * 16), x.data(), labels.data(), B, P,
                                                rng_noise(rn), denoiser_vjp(*m, o, B * 16));
    ld[k] = res.log_density[0] + res.log_density[1];
  }
  // The difference quotient's error (~1e-4 of the trace, infer/likelihood.h) bounds the disagreement.
  EXPECT_NEAR(ld[0], ld[1], 1e-3 * std::fabs(ld[1]) + 1e-3) << ld[0] << " vs " << ld[1];
}

TEST(Likelihood, OneLineErrors) {
  const Mixture d = gaussian();
  auto bad = [&](const char* obj, LikelihoodOptions opt, const char* needle) {
    const Objective o = Objective::make(obj);
    std::vector<float> x(3, 0.f);
    std::vector<int32_t> labels(1, 0);
    Rng r(1);
    try {
      log_likelihood(o, opt, exact_net(o, d), x.data(), labels.data(), 1, 3, rng_noise(r));
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    }
  };
  LikelihoodOptions o;
  bad("ddpm", o, "ddpm");
  o.trace = "approx";
  bad("flow", o, "--trace");
  o = {}, o.probe = "sphere";
  bad("flow", o, "--probe");
  o = {}, o.probes = 0;
  bad("edm", o, "--probes");
  o = {}, o.level_min = 2;
  bad("flow", o, "--level-min");
  o = {}, o.jacobian = "reverse";
  bad("flow", o, "--jacobian");
  o = {};  // vjp, the default, of a network that has none
  bad("flow", o, "--jacobian vjp");
}

}  // namespace
}  // namespace kiln
