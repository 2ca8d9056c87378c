// Multi-head latent attention (DeepSeek-V2/V3), as Hugging Face's DeepseekV3Attention computes it:
//   [q_a | kv_a] = x·[Wq_a ; Wkv_a]      one product (q_a: the query bottleneck, or the queries themselves
//                                        when q_lora_rank is 0; kv_a: c_KV (kv_lora_rank) + k_rope (rope dims))
//   q      = q_b(RMSNorm(q_a))           per head [q_nope | q_rope]        (or q_a itself without q_lora_rank)
//   c      = RMSNorm(c_KV)               the latent a decoding cache keeps, beside the rotated k_rope
//   [k_nope | v] per head = kv_b(c)      k = [k_nope | k_rope], k_rope shared by every head
//   q_rope, k_rope rotated (DeepSeek's interleaved pairs), softmax(q·kᵀ·scale)·v through the tiled attention
//   kernels (q/k heads nope + rope wide, v heads v_head_dim), h = residual + att·Wo.
// Decoding keeps only [c | k_rope] per position (KVLayer::k). The absorbed form folds W_UK into the queries
// (q_lat_h = W_UK_hᵀ·q_nope_h, scored against c) and W_UV into the output (v_h = W_UV_h·(Σ p·c)): one shared
// key/value head of kv_lora_rank + rope dims. The plain form expands the cache through kv_b every step (the
// check of the absorbed form). Forward and backward sit side by side in mla.cpp.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "nn/attention.h"
#include "nn/backend.h"
#include "nn/workspace.h"

namespace kiln::nn {

struct MLAShape {
  int C = 0, NH = 0;
  int q_lora = 0;  // 0: queries straight from x
  int r = 0;       // kv_lora_rank
  int nope = 0, rope = 0, vd = 0;
  float eps = 1e-6f;
  bool interleaved = true;
  bool on() const { return r > 0; }
  int qk() const { return nope + rope; }
  int qa() const { return q_lora ? q_lora : NH * qk(); }  // width of the first product's query part
  int a() const { return qa() + r + rope; }               // width of the first product
  int kv() const { return NH * (nope + vd); }             // kv_b's output
  int qkv() const { return 2 * NH * qk() + NH * vd; }     // the attention kernel's rows
  int att() const { return NH * vd; }
  int latent() const { return r + rope; }                 // cached floats per token
};

struct MLAActivations {
  Act xa;                         // [N, a] the first product
  Act xn;                         // [N, a] normed q_a | normed c | rotated k_rope
  float *rstd_q = nullptr, *rstd_kv = nullptr;  // [N] each
  Act qa_n;                       // [N, q_lora] (q_lora only)
  Act q;                          // [N, NH·qk] q_b's output (q_lora only; products write whole rows)
  Act c;                          // [N, r] normed c_KV, kv_b's input
  Act kv;                         // [N, kv]
  Act qkv;                        // [N, qkv] what attention reads
  Act att;                        // [N, att]
  float* lse = nullptr;           // [NH, N]
  Act q_abs;                      // decoding only: [N, NH·latent] absorbed queries
  Act lat_out;                    // decoding only: [N, NH·r]
  Act head_in;                    // decoding only: [N, max(nope, r)] one head's contiguous input ...
  Act head_out;                   // ... and output [N, max(r, vd)]
  void allocate(Workspace& ws, int64_t N, const MLAShape& s, bool decoding = false);
};

struct MLAScratch {
  Act d_att, d_qkv, d_kv, d_q, d_qa_n, d_c, d_xa;
  void allocate(Workspace& ws, int64_t N, const MLAShape& s);
};

struct LatentAttention {
  MLAShape shape;
  Weight a;        // [q_a or q ; kv_a] packed: C -> a()
  Weight q_b;      // q_lora -> NH·qk (q_lora only)
  Weight kv_b;     // r -> NH·(nope + vd)
  Weight proj;     // NH·vd -> C
  const float *q_norm = nullptr, *kv_norm = nullptr;  // [q_lora], [r]
  float *dq_norm = nullptr, *dkv_norm = nullptr;
  RopeParams q_rope, k_rope;  // on qkv's q heads; on xn's k_rope

  void forward(Backend& be, float* h, const float* residual, Act x, MLAActivations& a, const int32_t* pos,
               const AttentionParams& ap, int64_t N, const KVLayer* cache = nullptr) const;
  void backward(Backend& be, Act dx, Act dh, Act x, const MLAActivations& a, MLAScratch& s, const int32_t* pos,
                const AttentionParams& ap, int64_t N) const;

 private:
  void decode_absorbed(Backend& be, MLAActivations& a, const AttentionParams& ap, const KVLayer& cache) const;
  void decode_plain(Backend& be, MLAActivations& a, const AttentionParams& ap, const KVLayer& cache) const;
};

}  // namespace kiln::nn
