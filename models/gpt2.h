// GPT-2: token + learned position embeddings, n_layer pre-LayerNorm blocks, final LayerNorm, and an
// LM head tied to the token embedding. Parameters, gradients and activations each live in one block;
// the activation arena is planned for (B, T) before the first step and reports its exact size.
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "kernels/attention.h"
#include "models/config.h"
#include "models/gpt2_params.h"
#include "nn/block.h"

namespace kiln {

class GPT2 {
 public:
  explicit GPT2(const GPT2Config& cfg, bool with_grads = true);

  const GPT2Config& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }
  float* params() { return params_.f32(); }
  const float* params() const { return params_.f32(); }
  float* grads() { return grads_.f32(); }
  size_t num_floats() const { return table_.total; }

  // GPT-2 initialisation: weights N(0, 0.02), the two residual output projections N(0, 0.02/sqrt(2·n_layer)),
  // biases 0, LayerNorm gains 1. Deterministic for a seed, whatever the thread count.
  void init_random(uint64_t seed);

  // Sizes the activation arena for batches of up to N tokens (B rows of T, or packed). Returns bytes.
  size_t plan(int B, int T);
  size_t activation_bytes() const { return acts_.capacity(); }

  // Forward over N = B·T tokens. tokens, pos: [N]; targets: [N] (negative = ignored) or null.
  // Returns the sum of per-token losses over the non-ignored targets (0 without targets).
  // With grad_scale != 0 the logits buffer is replaced by dloss/dlogits · grad_scale, ready for backward().
  // attn says how the N tokens form sequences (B rows of T, or packed with cu_seqlens).
  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                 float grad_scale);
  // Accumulates parameter gradients of the last forward (which must have had grad_scale != 0).
  void backward(const int32_t* tokens, const int32_t* pos);
  void zero_grad();

  // Logits of the last forward, [N, V] (valid only when that forward had grad_scale == 0).
  const float* logits() const { return logits_; }
  const float* losses() const { return losses_; }

  // Convenience: B rows of T with positions 0..T-1 and causal attention.
  AttentionParams attention_params(int B, int T) const;

 private:
  GPT2Config cfg_;
  ParamTable table_;
  Buffer params_, grads_;
  GPT2Params p_, g_;
  std::vector<nn::Block> blocks_;
  nn::LayerNorm lnf_;

  // Activation plan.
  Arena acts_;
  int64_t max_tokens_ = 0;
  float* encoded_ = nullptr;                   // [N, C]  input of block 0
  std::vector<nn::BlockActivations> block_acts_;
  std::vector<float*> block_out_;              // [N, C]  output of each block
  float *lnf_out_ = nullptr, *lnf_mean_ = nullptr, *lnf_rstd_ = nullptr;
  float* logits_ = nullptr;                    // [N, V]
  float* losses_ = nullptr;                    // [N]
  float* dres_ = nullptr;                      // [N, C]  gradient of the residual stream
  nn::BlockScratch scratch_{};
  int64_t last_N_ = 0;
  AttentionParams last_attn_{};

  void allocate_activations(Arena& arena, int64_t N);
};

}  // namespace kiln
