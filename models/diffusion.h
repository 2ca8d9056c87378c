// Diffusion and flow objectives in one interface, in the terms of EDM (Karras et al. 2022): every objective is an
// interpolant x_t = a(ℓ)·x₀ + s(ℓ)·ε at a noise level ℓ, a network F(c_in(ℓ)·x_t; c_noise(ℓ)) and a regression
// target that is linear in (x₀, ε), T = tx(ℓ)·x₀ + te(ℓ)·ε; the loss is mean (F − T)², which is EDM's
// λ(σ)·‖D − x₀‖² for each of them (λ·c_out² = 1). The level ℓ and its distribution:
//   ddpm  ℓ = t ∈ {0..999}, uniform; linear β from 1e-4 to 0.02, ᾱ_t = Π(1 − β); a = √ᾱ, s = √(1 − ᾱ); F = ε̂
//         (tx 0, te 1); c_noise = t
//   ve    ℓ = σ = σ_min·(σ_max/σ_min)^u, u uniform, σ ∈ [0.02, 100]; a = 1, s = σ; D = x + σ·F, so T = −ε;
//         c_noise = ln(σ/2); the score is (D − x)/σ²
//   edm   ℓ = σ, ln σ ~ N(P_mean −1.2, P_std 1.2²), σ_data 0.5; c_skip = σd²/(σ² + σd²), c_out = σ·σd/√(σ² + σd²),
//         c_in = 1/√(σ² + σd²), c_noise = ln(σ)/4; T = (x₀ − c_skip·x)/c_out
//   flow  ℓ = t ∈ (0, 1), uniform or logit-normal (sigmoid of N(0, 1)); a = 1 − t, s = t; T = v = ε − x₀; c_noise = t
//   gvp   ℓ = t ∈ (0, 1) uniform; a = cos(πt/2), s = sin(πt/2) (SiT's GVP); T = v = a'·x₀ + s'·ε; c_noise = t
// t = 0 (σ = 0) is the data, the largest level is noise. From F and x_t the clean and noise estimates follow
// by solving [a s; tx te]·[x₀; ε] = [x_t; F] (models the samplers read, infer/diffusion_sampler.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"

namespace kiln {

enum class ObjectiveKind { DDPM, VE, EDM, Flow, GVP };

struct Coefficients {
  double a = 1, s = 0;     // x_t = a·x₀ + s·ε
  double c_in = 1;         // the network reads c_in·x_t
  double c_noise = 0;      // ... conditioned on c_noise
  double tx = 0, te = 1;   // target T = tx·x₀ + te·ε
};

struct Objective {
  ObjectiveKind kind = ObjectiveKind::EDM;
  std::string name = "edm";
  // ddpm
  int ddpm_steps = 1000;
  double beta_start = 1e-4, beta_end = 0.02;
  std::vector<double> alpha_bar;  // [ddpm_steps]
  // ve
  double sigma_min = 0.02, sigma_max = 100;
  // edm
  double P_mean = -1.2, P_std = 1.2, sigma_data = 0.5;
  // flow
  bool logit_normal = false;

  // ddpm | ve | edm | flow | gvp; flow_t: uniform | logit-normal (flow only). One-line errors naming the flag.
  static Objective make(const std::string& name, const std::string& flow_t = "uniform");
  // A training level from the generator (ddpm: the index as a float).
  double sample_level(Rng& r) const;
  Coefficients at(double level) const;
  // The estimates of x₀ and ε from x_t and the network's output F at this level (any objective).
  static void estimates(const Coefficients& k, double xt, double F, double& x0, double& eps);
};

// The training loss of one batch: x0 [B, P] data, eps [B, P] noise, levels [B]; fills the network input
// (c_in·x_t) and c_noise; after the network ran, loss_and_grad gives mean (F − T)² and dL/dF.
void objective_inputs(const Objective& o, const float* x0, const float* eps, const double* levels, int B, int64_t P,
                      float* net_in, float* c_noise);
double objective_loss(const Objective& o, const float* x0, const float* eps, const double* levels, const float* F,
                      int B, int64_t P, float* dF);

}  // namespace kiln
