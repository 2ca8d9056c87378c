// Samplers for the objectives of models/diffusion.h, all on one view of the network: F at a level ℓ for the
// interpolants x_t (the adapter applies c_in and c_noise), from which x̂₀ and ε̂ follow (Objective::estimates).
//   ddpm            ancestral sampling: x_{t'} ~ N(μ̃(x_t, x̂₀), β̃) over N of the 1000 steps   (ddpm objective)
//   ddim            x_{t'} = √ᾱ' x̂₀ + √(1 − ᾱ' − σ²)·ε̂ + σ·z, σ = η·√((1−ᾱ')/(1−ᾱ))·√(1 − ᾱ/ᾱ')  (ddpm)
//   euler-maruyama  the reverse-time VE SDE: x ← x + (σ_i² − σ_{i+1}²)·score + √(σ_i² − σ_{i+1}²)·z      (ve, edm)
//   edm-euler       the probability-flow ODE dx/dσ = (x − D)/σ on EDM's steps (ρ = 7), optional churn (ve, edm)
//   edm-heun        the same with Heun's correction except into σ = 0 (EDM's Algorithm 2): 2N − 1 evaluations
//   flow-euler, flow-midpoint, flow-heun   dx/dt = v = F from t = 1 (noise) to 0 on a uniform grid  (flow, gvp)
// Classifier-free guidance: F = F(∅) + w·(F(c) − F(∅)) (w = 1: the conditional model alone, one evaluation).
// Evaluations (NFE) count the sampler's calls of the guided network.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/rng.h"
#include "models/diffusion.h"
#include "models/image_model.h"

namespace kiln {

// F [B, P] at one level for x_t [B, P] and labels [B].
using DiffusionNet = std::function<void(float* F, const float* xt, double level, const int32_t* labels, int B)>;

struct SamplerOptions {
  std::string name = "edm-heun";
  int steps = 18;
  double eta = 0.0;                    // ddim
  double sigma_min = 0, sigma_max = 0; // edm-*, euler-maruyama: 0 = the objective's (ve 0.02/100, edm 0.002/80)
  double rho = 7;
  double churn = 0, s_tmin = 0, s_tmax = 1e30, s_noise = 1;  // EDM's stochastic churn (S_churn = 0: none)
  double guidance = 1;
  int null_class = -1;                 // the label of no class (needed when guidance != 1)
};

// Noise for the samplers: fills n standard normals (the generator's stream, or a recorded one in tests).
using NoiseSource = std::function<void(float* z, int64_t n)>;
NoiseSource rng_noise(Rng& r);

struct SampleResult {
  int nfe = 0;
  std::vector<std::vector<float>> trajectory;  // x after each step (when asked for)
};

// Throws a one-line error when the sampler does not fit the objective or the options are out of range.
void check_sampler(const Objective& o, const SamplerOptions& s);
// Samples B images of P values into x (host), labels [B]; the starting noise comes from `noise` too.
SampleResult sample(const Objective& o, const SamplerOptions& s, const DiffusionNet& net, float* x,
                    const int32_t* labels, int B, int64_t P, const NoiseSource& noise, bool record = false);
// A denoise model (models/image_model.h) as the samplers' network under objective o: it reads c_in·x_t and
// c_noise; batches larger than the model's plan run in pieces.
DiffusionNet denoiser_net(ImageModel& model, const Objective& o, int planned_batch);

// The σ steps of EDM (σ_0 = σ_max ... σ_{N−1} = σ_min, then 0).
std::vector<double> edm_sigmas(int N, double sigma_min, double sigma_max, double rho);

}  // namespace kiln
