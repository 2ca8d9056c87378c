// Medusa heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding
// Heads"): K extra heads on the base model's last hidden state h (the final norm's output). Head k (1-based)
// guesses the token k+1 places ahead of the one the LM head predicts from the same h:
//   u_k = h + SiLU(W_k h + b_k)      (a residual block, W_k [C, C] in nn.Linear layout [out, in])
//   logits_k = H_k u_k               (H_k [V, C], initialised from the LM head; W_k = 0, b_k = 0 at first,
//                                     so a fresh head predicts what the LM head does)
// The math runs on the host in fp32 (OpenBLAS products): the heads are small next to the base, and both their
// training on a frozen base and their use in decoding read host arrays. Forward and backward side by side.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/narrow_gemv.h"

namespace kiln::nn {

struct MedusaShape {
  int K = 0;  // heads
  int C = 0;  // hidden width (the base's d_model)
  int V = 0;  // vocabulary
  // Floats of one head's parameters and of all of them, in the block layout below.
  int64_t per_head() const { return int64_t(C) * C + C + int64_t(V) * C; }
  int64_t total() const { return K * per_head(); }
  // Head k's tensors (0-based k) in a block of total() floats: W [C, C], then b [C], then H [V, C].
  int64_t w_off(int k) const { return k * per_head(); }
  int64_t b_off(int k) const { return w_off(k) + int64_t(C) * C; }
  int64_t h_off(int k) const { return b_off(k) + C; }
};

// The activations one forward keeps for the backward (per head: z = W h + b and u).
struct MedusaActivations {
  int64_t N = 0;
  std::vector<float> z, u;  // [K, N, C] each
};

struct MedusaHeads {
  MedusaHeads() = default;
  MedusaHeads(const MedusaShape& s, const float* p, float* g = nullptr) : shape(s), params(p), grads(g) {}
  MedusaShape shape;
  const float* params = nullptr;  // [shape.total()]
  float* grads = nullptr;         // same layout (accumulated into), may be null for inference
  std::vector<NarrowMatrix> narrow;          // set_weight_format: per head W then H (empty: fp32)
  std::shared_ptr<std::vector<uint64_t>> narrow_storage;

  // Sets W = 0, b = 0 and every H to the LM head's matrix lm_head [V, C] (nn.Linear layout).
  static void init_from_lm_head(const MedusaShape& s, float* params, const float* lm_head);

  // logits [K, N, V] of every head for N rows of h [N, C]; a keeps z and u.
  void forward(const float* h, int64_t N, float* logits, MedusaActivations& a) const;
  // One head over rows (decoding): logits [N, V] of head k (0-based); u_scratch [N, C] and z_scratch [N, C].
  void forward_head(int k, const float* h, int64_t N, float* logits, float* u_scratch, float* z_scratch) const;
  // Decoding: the heads' matrices converted once to a narrow format (bf16, f16, q8_0), which forward_head then
  // reads (the base's --weights-dtype); F32 drops the copies.
  void set_weight_format(WeightFormat f);
  // From dlogits [K, N, V] (the loss gradient of each head's logits): parameter gradients accumulate into
  // grads; dh [N, C] (may be null) accumulates dL/dh (+=), for joint training of the base.
  void backward(const float* h, int64_t N, const float* dlogits, const MedusaActivations& a, float* dh) const;
};

// The softmax cross-entropy of rows of logits [N, V] with targets [N] (negative: no loss). Returns the sum of
// losses and the number of rows whose arg max equals the target (top-1 hits); with dlogits (may alias logits)
// writes scale · (softmax − onehot) there (zero on rows without a target).
struct CEResult {
  double loss_sum = 0;
  int64_t count = 0, correct = 0;
};
CEResult softmax_ce(const float* logits, const int32_t* targets, int64_t N, int V, float scale, float* dlogits);

}  // namespace kiln::nn
