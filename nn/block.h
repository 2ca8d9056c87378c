// The pre-norm transformer block every family here is built from:
//   h = x + Attention(Norm1(x))          Norm: LayerNorm (GPT-2) or RMSNorm (Llama, Mistral, Qwen)
//   y = h + FFN(Norm2(h))                FFN: act(x·Wup)·Wdown, or gated act(x·Wgate)∘(x·Wup)·Wdown
// Attention: one product for [q | k | v] (GQA: fewer k/v heads), optional biases, optional per-head RMSNorm of
// q and k (Qwen3), rotary positions (or none: GPT-2's are added to the embedding), causal or not, an optional
// sliding window, packed sequences. With a KV cache (decoding) the new keys and values are appended to the
// cache and the queries attend to it; the block is the same code in both modes.
//
// forward() records what backward() needs in BlockActivations; backward() turns dy (the gradient of the block
// output, in place) into dx and accumulates the parameter gradients. Forward and backward sit side by side
// in block.cpp.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "nn/backend.h"
#include "nn/workspace.h"

namespace kiln::nn {

enum class NormType : uint8_t { LayerNorm, RMSNorm };

struct Norm {
  NormType type = NormType::LayerNorm;
  const float *w = nullptr, *b = nullptr;
  float *dw = nullptr, *db = nullptr;
  int dim = 0;
  float eps = 1e-5f;
  // mean is unused (may be null) for RMSNorm.
  void forward(Backend& be, Act out, float* mean, float* rstd, const float* x, int64_t N) const;
  // dx += the gradient through the norm.
  void backward(Backend& be, float* dx, Act dout, const float* x, const float* mean, const float* rstd, int64_t N) const;
};

// Shapes and options of a block (the same for every layer of a model).
struct BlockShape {
  int C = 0;                 // model width
  int NH = 0, NKV = 0, HD = 0;
  int F = 0;                 // feed-forward width
  bool gated = false;
  Activation act = Activation::GeluTanh;
  bool qk_norm = false;
  float qk_eps = 1e-6f;
  bool rotary = false;
  int rot_dim = 0;
  int qdim() const { return NH * HD; }
  int qkv() const { return (NH + 2 * NKV) * HD; }
  int up() const { return gated ? 2 * F : F; }
};

// Saved activations of one block for N tokens. With selective recomputation ln1, ln2 and act are null: the
// forward writes them to scratch and the backward recomputes them there.
struct BlockActivations {
  Act ln1;                 // [N, C]
  float *ln1_mean = nullptr, *ln1_rstd = nullptr;
  Act qkv_raw;             // [N, QKV] the projection before the q/k norms (qk_norm only; else == qkv)
  float* qk_rstd = nullptr;  // [N·NH] then [N·NKV] (qk_norm only)
  Act qkv;                 // [N, QKV] what attention reads (normed, rotated)
  Act att;                 // [N, NH·HD]
  float* lse = nullptr;    // [NH, N]
  float* h = nullptr;      // [N, C] residual stream after attention
  Act ln2;                 // [N, C]
  float *ln2_mean = nullptr, *ln2_rstd = nullptr;
  Act up;                  // [N, F] or [N, 2F] ([gate | up]) before the activation
  Act act;                 // [N, F] after it
  void allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective = false);
};

// Backward scratch shared by all blocks (and the forward's recomputation targets under selective).
struct BlockScratch {
  Act d_ln;   // [N, C]
  Act d_att;  // [N, NH·HD]
  Act d_qkv;  // [N, QKV]
  Act d_up;   // [N, up]
  Act d_act;  // [N, F] (gated only; else d_up serves both)
  Act dres;   // [N, C] the residual gradient as a product operand (backends with narrower activations)
  Act ln_tmp, act_tmp;  // selective recomputation only
  void allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective = false);
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
};

struct Block {
  BlockShape shape;
  Norm norm1, norm2;
  Weight qkv, proj, up, down;
  const float *q_norm = nullptr, *k_norm = nullptr;  // [HD] each (qk_norm)
  float *dq_norm = nullptr, *dk_norm = nullptr;
  RopeParams rope;  // heads = NH + NKV over the q and k parts of each qkv row

  // y = block(x) for N tokens at positions pos. x, y: [N, C] fp32; h (the mid-block residual) may be a.h or, when
  // decoding, x itself (then y may be x too: the stream is updated in place). y == nullptr records the
  // activations only (recomputation skips the last product, which the backward never reads). With cache, keys
  // and values go to the cache and the queries attend over it.
  void forward(Backend& be, float* y, const float* x, BlockActivations& a, BlockScratch& s, const int32_t* pos,
               const AttentionParams& ap, int64_t N, const KVLayer* cache = nullptr) const;
  // On entry dres holds dL/dy; on return dL/dx. Uses the activations of the forward on x.
  void backward(Backend& be, float* dres, const float* x, const BlockActivations& a, BlockScratch& s,
                const int32_t* pos, const AttentionParams& ap, int64_t N) const;

 private:
  void attention_forward(Backend& be, BlockActivations& a, const int32_t* pos, const AttentionParams& ap, int64_t N,
                         const KVLayer* cache) const;
};

}  // namespace kiln::nn
