// The one configuration every architecture is described by. A family (models/families/*.cpp) reads its
// Hugging Face config.json into this struct and writes it back; the modules and the Transformer read only
// this struct, never a family's own field names.
//
// A decoder-only transformer here is: token embedding (+ learned positions), n_layer pre-norm blocks
//   h = x + Attention(Norm1(x)),  y = h + FFN(Norm2(h))
// a final norm and an LM head (tied to the token embedding or its own matrix).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/activation.h"

namespace kiln {

enum class NormKind : uint8_t { LayerNorm, RMSNorm };
enum class PositionKind : uint8_t { Learned, Rotary };
// How a family's checkpoint stores linear weights: GPT-2's Conv1D [in, out], or nn.Linear [out, in].
enum class WeightLayout : uint8_t { InOut, OutIn };
// How a mixture-of-experts router turns its logits into affinities: Qwen3-MoE's softmax over all experts, or
// DeepSeek-V3's per-expert sigmoid.
enum class RouterScoring : uint8_t { Softmax, Sigmoid };

// Rotary scaling (Hugging Face rope_scaling / rope_parameters): none, linear position interpolation, or
// Llama 3's frequency bands.
// Rotary scaling (Hugging Face rope_scaling / rope_parameters): none, linear position interpolation, Llama 3's
// frequency bands, or yarn (DeepSeek-V3).
struct RopeScaling {
  enum Kind : uint8_t { None, Linear, Llama3, Yarn } kind = None;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int original_max_positions = 8192;                     // llama3, yarn
  double beta_fast = 32, beta_slow = 1;                  // yarn
  double mscale = 0, mscale_all_dim = 0;                 // yarn (0: not given)
  double attention_factor = 0;                           // yarn (0: not given, derived from the mscales)
  bool truncate = true;                                  // yarn
};

// Multi-head latent attention (DeepSeek-V2/V3): queries directly (q_lora_rank 0) or through a rank-q_lora_rank
// bottleneck; keys and values from a latent c_KV of rank kv_lora_rank plus one rotary key of qk_rope_dim shared
// by the heads. On when kv_lora_rank > 0; head_dim is then qk_nope_dim + qk_rope_dim.
struct LatentAttention {
  int q_lora_rank = 0, kv_lora_rank = 0;
  int qk_nope_dim = 0, qk_rope_dim = 0, v_head_dim = 0;
  bool rope_interleave = true;  // DeepSeek's interleaved rotary pairs
  bool on() const { return kv_lora_rank > 0; }
  int qk_dim() const { return qk_nope_dim + qk_rope_dim; }
};

struct ModelConfig {
  std::string family;  // model_type: gpt2, llama, mistral, qwen2, qwen3
  int n_layer = 0;
  int d_model = 0;       // hidden size C
  int n_head = 0;        // query heads
  int n_kv_head = 0;     // key/value heads (divides n_head)
  int head_dim = 0;      // may differ from d_model / n_head (Qwen3, Llama with an explicit head_dim)
  int d_ff = 0;          // feed-forward width (the gated forms have two matrices of it)
  int vocab_size = 0;
  int max_positions = 0;  // n_positions / max_position_embeddings

  NormKind norm = NormKind::LayerNorm;
  bool norm_bias = true;  // LayerNorm with a bias
  float norm_eps = 1e-5f;

  PositionKind positions = PositionKind::Learned;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;

  bool qkv_bias = false;       // biases on the q, k, v projections (GPT-2, Qwen2)
  bool attn_out_bias = false;  // bias on the attention output projection (GPT-2)
  bool qk_norm = false;        // per-head RMSNorm of q and k before the rotation (Qwen3)
  int sliding_window = 0;      // 0: full causal attention (Mistral's sliding_window otherwise)
  LatentAttention mla;         // multi-head latent attention (deepseek_v3)
  // Multi-token prediction (DeepSeek-V3): mtp_depth sequential modules after the main layers, module k stored as
  // layer n_layer + k − 1 (its block, enorm, hnorm, eh_proj, shared_head norm; embedding and head shared).
  int mtp_depth = 0;

  bool gated_ffn = false;      // SwiGLU / GeGLU: act(x·Wgate) ∘ (x·Wup), then ·Wdown
  Activation activation = Activation::GeluTanh;
  bool ffn_bias = false;       // biases on the feed-forward matrices (GPT-2)

  // Mixture of experts (DeepSeekMoE, Qwen3-MoE): n_experts = 0 makes every layer dense. A MoE layer's
  // feed-forward is n_shared_experts SwiGLUs of width moe_d_ff on every token (one SwiGLU of width
  // n_shared_experts·moe_d_ff) plus the top moe_top_k of n_experts routed SwiGLU experts, gated by the router.
  int n_experts = 0;             // n_routed_experts / num_experts
  int n_shared_experts = 0;      // n_shared_experts (DeepSeek); 0 for Qwen3-MoE
  int moe_top_k = 0;             // num_experts_per_tok
  int moe_d_ff = 0;              // moe_intermediate_size
  int moe_groups = 1;            // n_group: experts in groups of n_experts / moe_groups ...
  int moe_topk_groups = 1;       // topk_group: ... of which the best this many are searched
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;    // the chosen experts' gate weights normalised to sum 1
  RouterScoring moe_scoring = RouterScoring::Softmax;
  bool moe_router_bias = false;  // a per-expert selection bias (e_score_correction_bias, loss-free balancing)
  int first_k_dense_replace = 0; // the first layers stay dense (DeepSeek)
  int moe_layer_step = 1;        // decoder_sparse_step: layer l is MoE when (l + 1) % step == 0 (Qwen3-MoE)
  std::vector<int> mlp_only_layers;  // layers kept dense (Qwen3-MoE)

  bool tie_embeddings = true;  // the LM head is the token embedding
  WeightLayout layout = WeightLayout::OutIn;
  int bos_token_id = -1, eos_token_id = -1;  // -1: none given
  std::string source_json;  // the config.json this came from (its other fields are written back)

  // Derived sizes.
  int q_dim() const { return n_head * head_dim; }
  int kv_dim() const { return n_kv_head * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  float attention_scale() const;
  // Yarn's cos/sin factor (1 otherwise).
  float rope_attention_factor() const;
  // Floats of a layer's decoding cache per token: c_KV + the rotary key (MLA), else keys + values.
  int64_t cache_floats_per_token() const;
  // Whether layer l's feed-forward is the mixture of experts.
  bool is_moe_layer(int l) const;
  bool has_moe() const;
  bool has_dense_ffn() const;  // some layer keeps the dense feed-forward
  // Parameter count, the tied head counted once; active: what one token's forward reads (the top-k routed
  // experts of each MoE layer instead of all of them).
  int64_t num_params() const;
  int64_t active_params() const;
  // The rotary inverse frequencies [rotary dims / 2] (head_dim, or MLA's qk_rope_dim) with the scaling rule
  // applied (Hugging Face's
  // _compute_default_rope_parameters / _compute_llama3_parameters, in double, then rounded to float).
  std::vector<float> rope_inv_freq() const;
  // Throws kiln::Error naming `where` and the field when a value is missing, out of range or inconsistent.
  void validate(const std::string& where) const;
};

}  // namespace kiln
