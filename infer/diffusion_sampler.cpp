// The samplers of infer/diffusion_sampler.h.
#include "infer/diffusion_sampler.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "core/error.h"

namespace kiln {

namespace {

bool one_of(const std::string& s, std::initializer_list<const char*> names) {
  for (const char* n : names)
    if (s == n) return true;
  return false;
}

// The guided network and the estimates it implies.
struct Guided {
  Guided(const Objective& ob, const SamplerOptions& so, const DiffusionNet& n, const int32_t* l, int b, int64_t p)
      : o(ob), s(so), net(n), labels(l), B(b), P(p) {}
  const Objective& o;
  const SamplerOptions& s;
  const DiffusionNet& net;
  const int32_t* labels;
  int B;
  int64_t P;
  int nfe = 0;
  std::vector<float> F, x2, F2;
  std::vector<int32_t> labels2;
  // F at level l for x into F. Guidance runs the conditional and the unconditional rows as one batch of 2B (the
  // network splits it by its plan): one call's fixed costs instead of two, and larger products.
  void eval(const float* x, double l) {
    const size_t n = size_t(B * P);
    F.resize(n);
    if (s.guidance == 1) {
      net(F.data(), x, l, labels, B);
    } else {
      x2.resize(2 * n), F2.resize(2 * n);
      std::copy(x, x + n, x2.begin());
      std::copy(x, x + n, x2.begin() + std::ptrdiff_t(n));
      if (labels2.empty()) {
        labels2.assign(labels, labels + B);
        labels2.resize(size_t(2 * B), s.null_class);
      }
      net(F2.data(), x2.data(), l, labels2.data(), 2 * B);
      const float* Fc = F2.data();
      const float* Fu = F2.data() + n;
      for (size_t i = 0; i < n; i++) F[i] = Fu[i] + float(s.guidance) * (Fc[i] - Fu[i]);
    }
    nfe++;
  }
  // x̂₀ and ε̂ of element i (after eval at level l).
  void est(const Coefficients& k, const float* x, int64_t i, double& x0, double& eps) const {
    Objective::estimates(k, x[i], F[size_t(i)], x0, eps);
  }
};

}  // namespace

NoiseSource rng_noise(Rng& r) {
  return [&r](float* z, int64_t n) {
    for (int64_t i = 0; i < n; i++) z[i] = r.normal();
  };
}

DiffusionNet denoiser_net(ImageModel& model, const Objective& o, int planned) {
  KILN_CHECK(model.provides(ImageTask::Denoise), "a ", model.type(), " model is not a denoiser: the diffusion "
             "samplers need one");
  // The scaled input and the levels are kept between calls (the samplers call once per evaluation).
  auto in = std::make_shared<std::vector<float>>(), cn = std::make_shared<std::vector<float>>();
  return [&model, o, planned, in, cn](float* F, const float* xt, double level, const int32_t* labels, int B) {
    const int64_t P = model.pixels();
    const Coefficients k = o.at(level);
    in->resize(size_t(planned) * P);
    cn->assign(size_t(planned), float(k.c_noise));
    for (int b0 = 0; b0 < B; b0 += planned) {
      const int nb = std::min(planned, B - b0);
      for (int64_t j = 0; j < nb * P; j++) (*in)[size_t(j)] = float(k.c_in * xt[b0 * P + j]);
      model.denoise(F + b0 * P, in->data(), cn->data(), labels + b0, nb);
    }
  };
}

std::vector<double> edm_sigmas(int N, double smin, double smax, double rho) {
  std::vector<double> s;
  for (int i = 0; i < N; i++) {
    const double f = N == 1 ? 0.0 : double(i) / (N - 1);
    s.push_back(std::pow(std::pow(smax, 1 / rho) + f * (std::pow(smin, 1 / rho) - std::pow(smax, 1 / rho)), rho));
  }
  s.push_back(0.0);
  return s;
}

void check_sampler(const Objective& o, const SamplerOptions& s) {
  const bool ddpm = one_of(s.name, {"ddpm", "ddim"});
  const bool sigma = one_of(s.name, {"euler-maruyama", "edm-euler", "edm-heun"});
  const bool flow = one_of(s.name, {"flow-euler", "flow-midpoint", "flow-heun"});
  KILN_CHECK(ddpm || sigma || flow, "--sampler '", s.name, "': expected ddpm, ddim, euler-maruyama, edm-euler, "
             "edm-heun, flow-euler, flow-midpoint or flow-heun");
  if (ddpm)
    KILN_CHECK(o.kind == ObjectiveKind::DDPM, "--sampler ", s.name, ": needs a model trained with --objective ddpm, "
               "this one is ", o.name);
  if (sigma)
    KILN_CHECK(o.kind == ObjectiveKind::VE || o.kind == ObjectiveKind::EDM, "--sampler ", s.name,
               ": needs a σ-parametrized model (--objective ve or edm), this one is ", o.name);
  if (flow)
    KILN_CHECK(o.kind == ObjectiveKind::Flow || o.kind == ObjectiveKind::GVP, "--sampler ", s.name,
               ": needs a velocity model (--objective flow or gvp), this one is ", o.name);
  KILN_CHECK(s.steps >= 1, "--steps ", s.steps, ": must be positive");
  if (ddpm) KILN_CHECK(s.steps <= o.ddpm_steps, "--steps ", s.steps, ": at most the model's ", o.ddpm_steps);
  KILN_CHECK(s.eta >= 0 && s.eta <= 1, "--eta ", s.eta, ": must be in [0, 1]");
  KILN_CHECK(s.churn >= 0, "--churn ", s.churn, ": must be non-negative");
  KILN_CHECK(s.guidance == 1 || s.null_class >= 0, "--guidance ", s.guidance, ": the model has no null class");
}

SampleResult sample(const Objective& o, const SamplerOptions& s, const DiffusionNet& net, float* x,
                    const int32_t* labels, int B, int64_t P, const NoiseSource& noise, bool record) {
  check_sampler(o, s);
  const int64_t n = int64_t(B) * P;
  const int N = s.steps;
  Guided g(o, s, net, labels, B, P);
  SampleResult res;
  std::vector<float> z(static_cast<size_t>(n));
  auto keep = [&] {
    if (record) res.trajectory.emplace_back(x, x + n);
  };

  if (s.name == "ddpm" || s.name == "ddim") {
    // N of the 1000 steps: τ_i = floor(i·1000/N), from τ_{N−1} down to τ_0 = 0, then x̂₀ of the last.
    std::vector<int> tau;
    for (int i = 0; i < N; i++) tau.push_back(int(int64_t(i) * o.ddpm_steps / N));
    noise(x, n);
    for (int i = N - 1; i >= 0; i--) {
      const int t = tau[size_t(i)];
      const Coefficients k = o.at(t);
      g.eval(x, t);
      const double ab = o.alpha_bar[size_t(t)];
      const double abp = i > 0 ? o.alpha_bar[size_t(tau[size_t(i - 1)])] : 1.0;  // ᾱ of the next (earlier) step
      if (i > 0 && (s.name == "ddpm" || s.eta > 0)) noise(z.data(), n);
      for (int64_t j = 0; j < n; j++) {
        double x0, eps;
        g.est(k, x, j, x0, eps);
        if (i == 0) {
          x[j] = float(x0);
        } else if (s.name == "ddpm") {
          // The posterior q(x_{t'} | x_t, x₀) over the skipped steps: α = ᾱ/ᾱ', β = 1 − α.
          const double alpha = ab / abp, beta = 1 - alpha;
          const double mean = std::sqrt(abp) * beta / (1 - ab) * x0 + std::sqrt(alpha) * (1 - abp) / (1 - ab) * x[j];
          const double var = beta * (1 - abp) / (1 - ab);
          x[j] = float(mean + std::sqrt(var) * z[size_t(j)]);
        } else {
          const double sig = s.eta * std::sqrt((1 - abp) / (1 - ab)) * std::sqrt(1 - ab / abp);
          double v = std::sqrt(abp) * x0 + std::sqrt(std::max(0.0, 1 - abp - sig * sig)) * eps;
          if (s.eta > 0) v += sig * z[size_t(j)];
          x[j] = float(v);
        }
      }
      keep();
    }
  } else if (s.name == "euler-maruyama" || s.name == "edm-euler" || s.name == "edm-heun") {
    const bool ve = o.kind == ObjectiveKind::VE;
    const double smin = s.sigma_min > 0 ? s.sigma_min : (ve ? o.sigma_min : 0.002);
    const double smax = s.sigma_max > 0 ? s.sigma_max : (ve ? o.sigma_max : 80.0);
    KILN_CHECK(smin < smax, "--sigma-min ", smin, " must be below --sigma-max ", smax);
    const std::vector<double> sig = edm_sigmas(N, smin, smax, s.rho);
    noise(x, n);
    for (int64_t j = 0; j < n; j++) x[j] = float(x[j] * sig[0]);
    std::vector<float> xh(static_cast<size_t>(n)), d(static_cast<size_t>(n)), xn(static_cast<size_t>(n));
    // D(x; σ) from the guided F.
    auto denoise_dir = [&](const float* xin, double sg, float* dir) {
      const Coefficients k = o.at(sg);
      g.eval(xin, sg);
      for (int64_t j = 0; j < n; j++) {
        double x0, eps;
        g.est(k, xin, j, x0, eps);
        dir[j] = float((xin[j] - x0) / sg);  // = ε̂
      }
    };
    for (int i = 0; i < N; i++) {
      const double si = sig[size_t(i)], sn = sig[size_t(i) + 1];
      if (s.name == "euler-maruyama") {
        denoise_dir(x, si, d.data());
        // score = (D − x)/σ² = −d/σ; x ← x + (σ_i² − σ_{i+1}²)·score + √(σ_i² − σ_{i+1}²)·z (no noise into σ = 0).
        const double dv = si * si - sn * sn;
        if (sn > 0) noise(z.data(), n);
        for (int64_t j = 0; j < n; j++)
          x[j] = float(x[j] - dv * d[size_t(j)] / si + (sn > 0 ? std::sqrt(dv) * z[size_t(j)] : 0.0));
        keep();
        continue;
      }
      // Churn: raise σ_i to σ̂ = σ_i(1 + γ) by adding fresh noise.
      double gamma = 0;
      if (s.churn > 0 && si >= s.s_tmin && si <= s.s_tmax) gamma = std::min(s.churn / N, std::sqrt(2.0) - 1);
      const double sh = si * (1 + gamma);
      if (gamma > 0) {
        noise(z.data(), n);
        const double add = std::sqrt(sh * sh - si * si) * s.s_noise;
        for (int64_t j = 0; j < n; j++) xh[size_t(j)] = float(x[j] + add * z[size_t(j)]);
      } else {
        std::copy(x, x + n, xh.begin());
      }
      denoise_dir(xh.data(), sh, d.data());
      for (int64_t j = 0; j < n; j++) xn[size_t(j)] = float(xh[size_t(j)] + (sn - sh) * d[size_t(j)]);
      if (s.name == "edm-heun" && sn > 0) {
        std::vector<float> d2(static_cast<size_t>(n));
        denoise_dir(xn.data(), sn, d2.data());
        for (int64_t j = 0; j < n; j++)
          xn[size_t(j)] = float(xh[size_t(j)] + (sn - sh) * 0.5 * (double(d[size_t(j)]) + d2[size_t(j)]));
      }
      std::copy(xn.begin(), xn.end(), x);
      keep();
    }
  } else {
    // Flow ODE from t = 1 to 0 on t_i = 1 − i/N; v = F (the velocity target).
    noise(x, n);
    std::vector<float> v1(static_cast<size_t>(n)), xm(static_cast<size_t>(n));
    auto vel = [&](const float* xin, double t, float* v) {
      g.eval(xin, t);
      std::copy(g.F.begin(), g.F.end(), v);
    };
    for (int i = 0; i < N; i++) {
      const double t0 = 1.0 - double(i) / N, t1 = 1.0 - double(i + 1) / N, h = t1 - t0;
      vel(x, t0, v1.data());
      if (s.name == "flow-euler") {
        for (int64_t j = 0; j < n; j++) x[j] = float(x[j] + h * v1[size_t(j)]);
      } else if (s.name == "flow-midpoint") {
        for (int64_t j = 0; j < n; j++) xm[size_t(j)] = float(x[j] + 0.5 * h * v1[size_t(j)]);
        vel(xm.data(), t0 + 0.5 * h, xm.data());
        for (int64_t j = 0; j < n; j++) x[j] = float(x[j] + h * xm[size_t(j)]);
      } else {  // heun
        for (int64_t j = 0; j < n; j++) xm[size_t(j)] = float(x[j] + h * v1[size_t(j)]);
        vel(xm.data(), t1, xm.data());
        for (int64_t j = 0; j < n; j++) x[j] = float(x[j] + 0.5 * h * (double(v1[size_t(j)]) + xm[size_t(j)]));
      }
      keep();
    }
  }
  res.nfe = g.nfe;
  return res;
}

}  // namespace kiln
