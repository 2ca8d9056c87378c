// Multi-head self-attention as the families here define it (GPT-2, Llama, Mistral, Qwen2/3):
//   qkv = x·Wqkv (+ b)      one product for [q | k | v]; GQA: fewer k/v heads than q heads
//   q, k ← RMSNorm per head (Qwen3), then rotary positions (or none: GPT-2 adds learned positions upstream)
//   att = softmax(q·kᵀ·scale [+ causal / sliding-window mask]) · v       tiled, online softmax; packed sequences
//   h = residual + att·Wo (+ b)
// With a KV cache (decoding) the new keys and values are appended to the cache and the queries attend to it;
// the module is the same code in both modes. Forward and backward sit side by side in attention.cpp.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "nn/backend.h"
#include "nn/workspace.h"

namespace kiln::nn {

struct AttentionShape {
  int C = 0;  // model width
  int NH = 0, NKV = 0, HD = 0;
  bool qk_norm = false;
  float qk_eps = 1e-6f;
  bool rotary = false;
  int rot_dim = 0;
  int qdim() const { return NH * HD; }
  int qkv() const { return (NH + 2 * NKV) * HD; }
};

// What the backward reads, for N tokens.
struct AttentionActivations {
  Act qkv_raw;               // [N, QKV] the projection before the q/k norms (qk_norm only; else == qkv)
  float* qk_rstd = nullptr;  // [N·NH] then [N·NKV] (qk_norm only)
  Act qkv;                   // [N, QKV] what attention reads (normed, rotated)
  Act att;                   // [N, NH·HD]
  float* lse = nullptr;      // [NH, N]
  void allocate(Workspace& ws, int64_t N, const AttentionShape& s);
};

// Backward scratch (shared by all layers).
struct AttentionScratch {
  Act d_att;  // [N, NH·HD]
  Act d_qkv;  // [N, QKV]
  void allocate(Workspace& ws, int64_t N, const AttentionShape& s);
};

// A layer's KV cache as the attention of a decoding pass sees it.
struct KVLayer {
  Act k, v;                          // [B][positions][NKV·HD] in the backend's activation type
  int64_t batch_stride = 0;          // values between sequences
  const int32_t* past = nullptr;     // [B] cached positions before the new ones (the backend's array)
  int max_positions = 0;             // the cache's capacity per sequence
  int B = 1, Tq = 1;
  bool fresh = false;                // every sequence's cache is empty: attend within the new tokens directly
  KVPages pages;                     // set: k and v are a paged cache's block pools (batch_stride unused)
  const uint64_t* tree = nullptr;    // tree attention: [Tq] masks in the backend's memory (kernels/decode_attention.h)
  // Latent attention (nn/mla.h): k is [B][positions][kv_lora_rank + rope] (v unused). The plain form (absorbed
  // false, host backends) expands it each step through expand_c [positions, r], expand_kv [positions, kv_b out]
  // into expand_k [B][positions][NH·qk] and expand_v [B][positions][NH·vd].
  bool absorbed = true;
  Act expand_c, expand_kv, expand_k, expand_v;
};

struct Attention {
  AttentionShape shape;
  Weight qkv, proj;
  const float *q_norm = nullptr, *k_norm = nullptr;  // [HD] each (qk_norm)
  float *dq_norm = nullptr, *dk_norm = nullptr;
  RopeParams rope;  // heads = NH + NKV over the q and k parts of each qkv row

  // h = residual + Attention(x) for N tokens at positions pos; x: the normed input [N, C]. h may alias residual
  // (decoding updates the stream in place). With cache, keys and values go to the cache and the queries attend
  // over it.
  void forward(Backend& be, float* h, const float* residual, Act x, AttentionActivations& a, const int32_t* pos,
               const AttentionParams& ap, int64_t N, const KVLayer* cache = nullptr) const;
  // dx = dL/dx (overwritten) from dh = dL/dh as a product operand; parameter gradients accumulate.
  void backward(Backend& be, Act dx, Act dh, Act x, const AttentionActivations& a, AttentionScratch& s,
                const int32_t* pos, const AttentionParams& ap, int64_t N) const;
};

}  // namespace kiln::nn
