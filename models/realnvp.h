// A RealNVP normalizing flow (Dinh, Sohl-Dickstein & Bengio 2017; NICE, Dinh et al. 2015, as its additive special
// case), with Glow's actnorm (Kingma & Dhariwal 2018) in place of batch norm. An invertible map x -> z of images
// [C, H, W] (values in [-1, 1]) to standard normal latents, so log p(x) = log N(z; 0, I) + log|det ∂z/∂x| exactly.
//
// The layers, in order (the same list is built again by tests/peer/torch_realnvp.py):
//   for each of `scales` scales:
//     `couplings` × (actnorm, checkerboard coupling)   parity k % 2: A = positions with (i + j) % 2 == parity
//     squeeze                                          [C, H, W] -> [4C, H/2, W/2], channel c·4 + 2·di + dj
//     `couplings` × (actnorm, channel coupling)        k even: A = the first half of the channels, k odd: the second
//     factor out                                       the first half of the channels leaves as latents
//   `final_couplings` × (actnorm, checkerboard coupling) on what is left
// The latent vector z [P] is the factored-out parts in order, then the last scale's output.
//
//   actnorm     y = x·e^{logs_c} + bias_c per channel; log-det H·W·Σ logs_c. Data-dependent init (init_actnorm):
//               each actnorm's output has zero mean and unit variance per channel on the first batch.
//   coupling    the set A conditions, the complement B is transformed:
//               (s̃, t) = MLP(x_A),  s = e^{scale} ⊙ tanh(s̃),  y_B = x_B ⊙ e^{s} + t,  y_A = x_A;  log-det Σ s
//               additive (NICE): t = MLP(x_A), y_B = x_B + t, log-det 0.
//               The MLP (|A| -> hidden -> ... -> 2|B| or |B|) is kiln's linear layers with tanh-GELU between
//               them, over the gathered x_A: fully connected, not convolutional (kiln has no convolution op), so
//               a mask is an index set and squeeze/factor-out only choose which values couple. Its output
//               layer starts at zero: every coupling starts as the identity.
// Parameters (ParamTable, one block): layers.L.logs, layers.L.bias [C] (actnorm L); layers.L.mlp.K.weight
// [out, in], layers.L.mlp.K.bias [out], layers.L.scale [|B|] (affine couplings only); actnorm_initialized [1].
// The layers' forward, backward and inverse are kernels/flow.h's ops (nn::Backend); realnvp.cpp composes them.
//
// Backends: the same code runs on either, through nn::Backend's ops. On the CPU everything is fp32 on the host.
// On a device backend (the GPU) the whole flow runs there: the coupling MLPs in the backend's bf16 activations
// and products, from a bf16 copy of the host's fp32 master weights (uploaded at each forward and inverse), and
// the elementwise layers (kernels/flow.h: actnorm, the couplings' gather, affine map and log-det, squeeze,
// factor-out) in fp32, with each layer's input kept on the device for the backward. What crosses: the weights
// up (each forward and inverse); the images up, the latents and log-dets down (forward); the latents' gradient
// and the samples' weights up (backward); the latents up, the images down (inverse). The parameter gradients
// accumulate in fp32 on the device and are added into grads() at the end of backward(), so the host holds the
// parameters and gradients that the optimizer steps either way.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/param_table.h"
#include "nn/backend.h"

namespace kiln {

struct RealNVPConfig {
  int image_size = 28, channels = 1, classes = 10;  // classes: unused by the flow (unconditional), kept for data
  int scales = 2;           // squeeze + factor-out levels; image_size must divide by 2^scales
  int couplings = 3;        // checkerboard couplings before each squeeze and channel couplings after it
  int final_couplings = 4;  // checkerboard couplings on the last scale
  int hidden = 256;         // coupling MLP width
  int depth = 2;            // hidden layers of each coupling MLP (≥ 1)
  bool additive = false;    // NICE's additive coupling
  int64_t pixels() const { return int64_t(channels) * image_size * image_size; }
  void validate() const;  // one-line errors naming the field
  std::string to_json() const;  // with "model_type": "realnvp"
  static RealNVPConfig from_json(const std::string& text, const std::string& where);
};

class RealNVP {
 public:
  // be: the backend whose ops run the flow (the CPU, or a device: see above).
  RealNVP(const RealNVPConfig& cfg, nn::Backend& be);
  ~RealNVP();
  RealNVP(const RealNVP&) = delete;
  RealNVP& operator=(const RealNVP&) = delete;
  const RealNVPConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }
  float* params() { return params_.data(); }
  float* grads() { return grads_.data(); }
  void init_random(uint64_t seed);  // Xavier-uniform hidden layers, zero output layers, actnorm identity
  void zero_grad();

  // Sets every actnorm from the batch x [B, P] (in order, each from its own input), and the flag below.
  void init_actnorm(const float* x, int B);
  bool actnorm_initialized() const;  // the parameter actnorm_initialized [1] (not trained)
  // log p(x) in nats of each of B images x [B, P] into logp [B] (z [B, P] too when not null); keeps what
  // backward() needs.
  void forward(double* logp, const float* x, int B, float* z = nullptr, double* logdet = nullptr);
  // Accumulates the parameter gradients of Σ_b w_b·log p(x_b) for the last forward; dx [B, P] (when not null)
  // receives its gradient with respect to the images.
  void backward(const double* w, float* dx = nullptr);
  // x = f⁻¹(z) for B latents z [B, P].
  void inverse(float* x, const float* z, int B);

  struct Layer;    // defined in realnvp.cpp
  struct Buffers;  // realnvp.cpp: the backend's buffers (device weight copies, activations, index sets)

 private:
  void run_forward(const float* x, int B, bool init);
  // A coupling's MLP on the gathered x_A into its fp32 output (keeping what mlp_backward needs), and its backward
  // from the output's gradient to x_A's (the buffers' da to db), accumulating the parameter gradients.
  void mlp_forward(const Layer& l, int B);
  void mlp_backward(const Layer& l, int B);
  nn::Weight weight(const Layer& l, int k, bool grads);
  FlowCoupling coupling(const Layer& l, int B) const;  // the layer's index sets on the backend
  float* dparams();  // the parameters and gradients the ops read: the device's copies, or params_ / grads_
  float* dgrads();
  void sync_weights();  // device: the host's weights to the device (fp32 and bf16)
  RealNVPConfig cfg_;
  nn::Backend& be_;
  ParamTable table_;
  std::vector<float> params_, grads_;
  std::vector<Layer> layers_;
  size_t init_flag_ = 0;
  // The last forward: the latents and log-dets on the host (its activations are in buf_).
  int B_ = 0;
  std::vector<float> z_;
  std::vector<double> logdet_;
  std::unique_ptr<Buffers> buf_;
};

}  // namespace kiln
