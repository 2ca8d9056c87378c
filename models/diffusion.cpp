// The objectives of models/diffusion.h.
#include "models/diffusion.h"

#include <cmath>

#include "core/error.h"

namespace kiln {

Objective Objective::make(const std::string& name, const std::string& flow_t) {
  Objective o;
  o.name = name;
  if (name == "ddpm") {
    o.kind = ObjectiveKind::DDPM;
    double prod = 1;
    for (int i = 0; i < o.ddpm_steps; i++) {
      const double beta = o.beta_start + (o.beta_end - o.beta_start) * i / (o.ddpm_steps - 1);
      prod *= 1 - beta;
      o.alpha_bar.push_back(prod);
    }
  } else if (name == "ve") {
    o.kind = ObjectiveKind::VE;
  } else if (name == "edm") {
    o.kind = ObjectiveKind::EDM;
  } else if (name == "flow") {
    o.kind = ObjectiveKind::Flow;
  } else if (name == "gvp") {
    o.kind = ObjectiveKind::GVP;
  } else {
    fail("--objective: expected ddpm, ve, edm, flow or gvp, got '", name, "'");
  }
  KILN_CHECK(flow_t == "uniform" || flow_t == "logit-normal", "--flow-t: expected uniform or logit-normal, got '",
             flow_t, "'");
  KILN_CHECK(flow_t == "uniform" || o.kind == ObjectiveKind::Flow, "--flow-t ", flow_t,
             ": only the flow objective samples t logit-normally");
  o.logit_normal = flow_t == "logit-normal";
  return o;
}

double Objective::sample_level(Rng& r) const {
  switch (kind) {
    case ObjectiveKind::DDPM:
      return double(r.below(uint64_t(ddpm_steps)));
    case ObjectiveKind::VE:
      return sigma_min * std::pow(sigma_max / sigma_min, double(r.uniform()));
    case ObjectiveKind::EDM:
      return std::exp(P_mean + P_std * double(r.normal()));
    case ObjectiveKind::Flow:
    case ObjectiveKind::GVP: {
      if (logit_normal) return 1.0 / (1.0 + std::exp(-double(r.normal())));
      // (0, 1): u from 24 bits, never exactly 0 (pure data has no velocity information to learn there).
      return (double(r.next_u32() >> 8) + 0.5) / 16777216.0;
    }
  }
  return 0;
}

Coefficients Objective::at(double l) const {
  Coefficients k;
  switch (kind) {
    case ObjectiveKind::DDPM: {
      const int t = int(l);
      KILN_CHECK(t >= 0 && t < ddpm_steps && double(t) == l, "ddpm: timestep ", l, " is not an index in [0, ",
                 ddpm_steps, ")");
      k.a = std::sqrt(alpha_bar[size_t(t)]), k.s = std::sqrt(1 - alpha_bar[size_t(t)]);
      k.c_noise = l, k.tx = 0, k.te = 1;
      break;
    }
    case ObjectiveKind::VE:
      k.a = 1, k.s = l, k.c_noise = std::log(0.5 * l), k.tx = 0, k.te = -1;
      break;
    case ObjectiveKind::EDM: {
      const double sd = sigma_data, v = l * l + sd * sd;
      const double c_skip = sd * sd / v, c_out = l * sd / std::sqrt(v);
      k.a = 1, k.s = l, k.c_in = 1 / std::sqrt(v), k.c_noise = 0.25 * std::log(l);
      k.tx = (1 - c_skip) / c_out, k.te = -c_skip * l / c_out;
      break;
    }
    case ObjectiveKind::Flow:
      k.a = 1 - l, k.s = l, k.c_noise = l, k.tx = -1, k.te = 1;
      break;
    case ObjectiveKind::GVP: {
      const double h = 0.5 * M_PI;
      k.a = std::cos(h * l), k.s = std::sin(h * l), k.c_noise = l;
      k.tx = -h * std::sin(h * l), k.te = h * std::cos(h * l);
      break;
    }
  }
  return k;
}

void Objective::estimates(const Coefficients& k, double xt, double F, double& x0, double& eps) {
  const double det = k.a * k.te - k.s * k.tx;
  x0 = (k.te * xt - k.s * F) / det;
  eps = (k.a * F - k.tx * xt) / det;
}

void objective_inputs(const Objective& o, const float* x0, const float* eps, const double* levels, int B, int64_t P,
                      float* net_in, float* c_noise) {
  for (int b = 0; b < B; b++) {
    const Coefficients k = o.at(levels[b]);
    c_noise[b] = float(k.c_noise);
    for (int64_t i = 0; i < P; i++) {
      const int64_t j = int64_t(b) * P + i;
      net_in[j] = float(k.c_in * (k.a * x0[j] + k.s * eps[j]));
    }
  }
}

double objective_loss(const Objective& o, const float* x0, const float* eps, const double* levels, const float* F,
                      int B, int64_t P, float* dF) {
  double sum = 0;
  const double inv = 1.0 / (double(B) * double(P));
  for (int b = 0; b < B; b++) {
    const Coefficients k = o.at(levels[b]);
    for (int64_t i = 0; i < P; i++) {
      const int64_t j = int64_t(b) * P + i;
      const double r = double(F[j]) - (k.tx * x0[j] + k.te * eps[j]);
      sum += r * r;
      if (dF) dF[j] = float(2 * r * inv);
    }
  }
  return sum * inv;
}

}  // namespace kiln
