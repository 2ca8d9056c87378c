// GPT-2: token + learned position embeddings, n_layer pre-LayerNorm blocks, final LayerNorm, and an
// LM head tied to the token embedding. Parameters, gradients and activations each live in one block;
// the activation arena is planned for (B, T) before the first step and reports its exact size.
#pragma once
#include <cstdint>
#include <optional>
#include <vector>

#include "core/memory.h"
#include "kernels/attention.h"
#include "kernels/matmul_lowp.h"
#include "models/config.h"
#include "models/gpt2_params.h"
#include "models/recompute.h"
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

  // Mixed precision: matrix products in bf16 or fp16 (fp32 accumulation) from 16-bit copies of the weight
  // matrices; nullopt returns to fp32. Call refresh_lowp_weights() after every change to the parameters.
  void set_compute_type(std::optional<LowpType> t);
  std::optional<LowpType> compute_type() const { return lowp_; }
  void refresh_lowp_weights();

  // GPT-2 initialisation: weights N(0, 0.02), the two residual output projections N(0, 0.02/sqrt(2·n_layer)),
  // biases 0, LayerNorm gains 1. Deterministic for a seed, whatever the thread count.
  void init_random(uint64_t seed);

  // Sizes the activation arena for batches of up to B·T tokens (B rows of T, or packed) under a
  // recomputation policy. lm_head_chunk: rows of logits held at once (0: all N without recomputation,
  // 64 with it). Returns bytes.
  size_t plan(int B, int T, RecomputePolicy policy = {}, int lm_head_chunk = 0);
  // The same plan's size without allocating it.
  static size_t plan_bytes(const GPT2Config& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk);
  size_t activation_bytes() const { return arena_.capacity(); }

  // Forward over N = B·T tokens. tokens, pos: [N]; targets: [N] (negative = ignored) or null.
  // Returns the sum of per-token losses over the non-ignored targets (0 without targets).
  // With grad_scale != 0 (training) the LM head's backward runs here, chunk by chunk, as soon as each
  // chunk's loss gradient exists (dlogits = (softmax - onehot)·grad_scale), so only lm_head_chunk rows
  // of logits are ever held; backward() continues from the final LayerNorm.
  // attn says how the N tokens form sequences (B rows of T, or packed with cu_seqlens).
  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                 float grad_scale);
  // Accumulates parameter gradients of the last forward (which must have had grad_scale != 0).
  void backward(const int32_t* tokens, const int32_t* pos);
  void zero_grad();

  // Logits of the last forward, [N, V] (valid only when that forward had grad_scale == 0 and the
  // plan holds all N rows of logits).
  const float* logits() const { return a_.logits; }
  const float* losses() const { return a_.losses; }

  // Convenience: B rows of T with positions 0..T-1 and causal attention.
  AttentionParams attention_params(int B, int T) const;

 private:
  GPT2Config cfg_;
  ParamTable table_;
  Buffer params_, grads_;
  GPT2Params p_, g_;
  std::vector<nn::Block> blocks_;
  std::optional<LowpType> lowp_;
  std::vector<uint16_t> lowp_weights_;  // parameter-block layout; only matrices are filled
  Buffer lowp_scratch_;
  void bind_blocks();
  nn::LayerNorm lnf_;

  // Activation plan.
  struct Activations {
    RecomputePolicy policy{};
    int64_t max_tokens = 0, chunk = 0;           // chunk: LM head rows at a time
    float* encoded = nullptr;                    // [N, C]  input of block 0
    std::vector<nn::BlockActivations> blocks;    // none/selective: one per layer; every:K: K (one segment)
    std::vector<float*> out;                     // none/selective: each layer's output; every:K: segment's
    std::vector<float*> ckpt_in;                 // every:K: input of each segment (ckpt_in[0] = encoded)
    float* final_out = nullptr;                  // [N, C]  input of the final LayerNorm
    float *lnf_out = nullptr, *lnf_mean = nullptr, *lnf_rstd = nullptr;
    float* dlnf = nullptr;                       // [N, C]
    float* logits = nullptr;                     // [chunk, V]
    float* losses = nullptr;                     // [N]
    float* dres = nullptr;                       // [N, C]  gradient of the residual stream
    nn::BlockScratch scratch{};
    void allocate(Arena& arena, const GPT2Config& cfg, int64_t N, RecomputePolicy policy, int64_t chunk);
  };
  Arena arena_;
  Activations a_;
  int64_t last_N_ = 0;
  AttentionParams last_attn_{};

  const float* block_input(int l) const;
  void run_blocks_forward(const AttentionParams& attn, int64_t N);
  void lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum);
};

}  // namespace kiln
