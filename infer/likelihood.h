// Log-likelihoods of a diffusion model (models/diffusion.h) through its probability-flow ODE (Song et al. 2021,
// "Score-based generative modeling through SDEs", appendix D; FFJORD's trace estimator, Grathwohl et al. 2019).
//
// Every objective is an interpolant x_ℓ = a(ℓ)·x₀ + s(ℓ)·ε, and the ODE that carries the data's marginals along
// it is dx/dℓ = E[a'·x₀ + s'·ε | x_ℓ] = a'·x̂₀ + s'·ε̂, with x̂₀, ε̂ linear in (x, F) (Objective::estimates). So the
// drift is f(x, ℓ) = α(ℓ)·x + β(ℓ)·F(x, ℓ) for scalars α, β, and its divergence is α·P + β·tr(∂F/∂x).
//   flow, gvp   ℓ = t from t_min (1e-3) to 1; a', s' are the velocity target's tx, te
//   ve, edm     integrated in u = ln σ from σ_min to σ_max (ve 0.02..100, edm 0.002..80): dx/du = σ·ε̂ = x − D
//   ddpm        not provided (its levels are discrete): a one-line error
// log p(x) = log p_prior(x(ℓ_max)) + ∫ div f dℓ, the prior N(0, s(ℓ_max)²·I) (flow, gvp: exact at t = 1; ve, edm:
// it ignores the data's mean μ and covariance next to σ_max², an error of about x(ℓ_max)·μ/σ_max² ~ ‖μ‖/σ_max
// nats per sample, of random sign: 0.2 nats for Fashion-MNIST at σ_max = 80, 4e-4 bits/dim). The integral is
// taken with x by classical Runge-Kutta (RK4) on a uniform grid of `steps` steps in ℓ (ln σ).
//
// The trace: tr(∂F/∂x) ≈ (1/K)·Σ_k z_kᵀ·(∂F/∂x)·z_k over K probes (Rademacher ±1 or standard normal) drawn once per
// sample and kept along the whole path (so the integral's estimate is unbiased), or exactly as Σ_j e_jᵀ(∂F/∂x)e_j
// over the P basis vectors (small P). The quadratic form zᵀ·(∂F/∂x)·z comes one of two ways (--jacobian):
//   vjp (default)  v = zᵀ·∂F/∂x by one backward pass through the network (reverse mode: the DiT's input gradient
//                  for upstream gradient z), then zᵀ·J·z = v·z. Exact up to the network's own rounding, and the
//                  only choice that works with bf16 activations (the GPU's): a difference quotient there loses
//                  ε_bf16/h ≈ 4 of relative accuracy. One stage costs K forwards and K backwards of the batch
//                  (exact trace: P each); a forward with its backward costs about 3 forwards, as much as the
//                  difference quotient's 1 + 2K at K = 1, with no truncation or cancellation error.
//   fd             a central finite difference, for networks without a backward (or to cross-check):
//   (∂F/∂x)·z ≈ (F(x + h·z) − F(x − h·z)) / (2h),   h = fd_step·√(a² + s²) (the scale of x at the level),
// whose error is h²/6·F''' (truncation) plus about ε_f32·|F|/h per value (the network's fp32 rounding, ε_f32 =
// 6e-8): with the default fd_step = 1e-3, ~1e-7 and ~6e-5 relative, both far below the estimator's sampling
// error (measured in tests/test_likelihood.cpp against closed-form densities). One stage costs 1 + 2K network
// evaluations (exact: 1 + 2P), a whole path 4·steps·(1 + 2K).
//
// Discrete data: 8-bit pixels p are stored as v = p/127.5 − 1 (train/images.h), so one pixel's bin is 1/127.5
// wide. Uniform dequantisation x = v + (u − ½)/127.5, u ~ U(0, 1), gives the lower bound
//   log P(p) ≥ E_u[log p(x)] − P·ln 127.5,   bits/dim = −E_u[log p(x)]/(P·ln 2) + log₂ 127.5.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "infer/diffusion_sampler.h"
#include "models/diffusion.h"
#include "models/image_model.h"

namespace kiln {

struct LikelihoodOptions {
  std::string trace = "hutchinson";  // hutchinson | exact
  std::string jacobian = "vjp";      // vjp | fd: how zᵀ·(∂F/∂x)·z is formed (see above)
  std::string probe = "rademacher";  // rademacher | gaussian (hutchinson)
  int probes = 1;                    // K
  int steps = 32;                    // RK4 steps
  double fd_step = 1e-3;             // h of the finite-difference JVP
  double level_min = 0, level_max = 0;  // 0: the objective's defaults above
};

struct LikelihoodResult {
  std::vector<double> log_density;  // [B] log p(x) in nats (continuous density of x)
  std::vector<double> prior;        // [B] log p_prior(x(ℓ_max))
  int nfe = 0;                      // network evaluations (forwards of the batch)
  int vjps = 0;                     // backward passes of the batch (--jacobian vjp)
};

// F [B, P] at one level for x_t [B, P] and labels [B] (as DiffusionNet), and the vector-Jacobian product
// v = zᵀ·∂F/∂x_t [B, P] (row by row) for z [B, P].
using DiffusionVJP = std::function<void(float* F, float* v, const float* xt, const float* z, double level,
                                        const int32_t* labels, int B)>;
// A denoise model's F (as denoiser_net) with its VJP through the model's backward (ImageModel::denoise_vjp; the
// model must have gradients): v = c_in·(∂D/∂in)ᵀ·z. Batches larger than the plan run in pieces.
DiffusionVJP denoiser_vjp(ImageModel& model, const Objective& o, int planned_batch);

// Throws a one-line error naming the flag when the options do not fit the objective.
void check_likelihood(const Objective& o, const LikelihoodOptions& opt, int64_t P);
// log p(x) of B samples x [B, P] (host) under the model of objective o: `net` for --jacobian fd, `vjp` for
// --jacobian vjp (an empty one there: a one-line error). `noise` fills the probes (normals; Rademacher probes
// take their signs).
LikelihoodResult log_likelihood(const Objective& o, const LikelihoodOptions& opt, const DiffusionNet& net,
                                const float* x, const int32_t* labels, int B, int64_t P, const NoiseSource& noise,
                                const DiffusionVJP& vjp = {});

// Uniform dequantisation of values v = p/scale − 1 in place: v += (u − ½)/scale.
void dequantize(float* x, int64_t n, Rng& r, double scale = 127.5);
// Bits per dimension of a log-density of P dequantised values (the bound above).
double bits_per_dim(double log_density, int64_t P, double scale = 127.5);

// Mean and standard error (sample standard deviation / √n) of n values.
struct MeanSE {
  double mean = 0, se = 0;
};
MeanSE mean_se(const std::vector<double>& v);

// Bits/dim of N images [N, P] (values p/127.5 − 1), each dequantised once (generator seeded by `seed`, which
// also draws the probes), in batches of `batch`: one value per image in bpd (the mean and its standard error
// cover the dequantisation, the probes and the images together); nfe: the network evaluations per image.
std::vector<double> dataset_bits_per_dim(const Objective& o, const LikelihoodOptions& opt, const DiffusionNet& net,
                                         const float* images, const int32_t* labels, int64_t N, int64_t P,
                                         int batch, uint64_t seed, int* nfe = nullptr, const DiffusionVJP& vjp = {});

}  // namespace kiln
