// The pre-norm transformer block every family here is built from:
//   h = x + Attention(Norm1(x))          Attention: nn/attention.h, or latent attention (nn/mla.h, DeepSeek)
//   y = h + FFN(Norm2(h))                nn/ffn.h (dense) or nn/moe.h (mixture of experts)
//   Norm: LayerNorm (GPT-2) or RMSNorm (Llama, Mistral, Qwen, DeepSeek)
// The block owns the residual stream and the norms; the attention and feed-forward modules own their products,
// activations and backward. The same block runs training and decoding (with a KV cache, nn/attention.h KVLayer).
//
// forward() records what backward() needs in BlockActivations; backward() turns dy (the gradient of the block
// output, in place) into dx and accumulates the parameter gradients. Forward and backward sit side by side
// in block.cpp.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "nn/attention.h"
#include "nn/backend.h"
#include "nn/ffn.h"
#include "nn/mla.h"
#include "nn/moe.h"
#include "nn/norm.h"
#include "nn/workspace.h"

namespace kiln::nn {

// Shapes and options of a block.
// A layer's feed-forward is the MoE when moe is set, else the dense ffn. Activations and scratch allocated for
// a shape with both (ffn.F > 0 and moe set) serve layers of either kind.
struct BlockShape {
  AttentionShape attn;  // attn.C is the width whichever attention the block has
  MLAShape mla;         // latent attention when mla.on()
  FFNShape ffn;
  MoEShape moe;
  int C() const { return attn.C; }
};

// Saved activations of one block for N tokens. With selective recomputation ln1, ln2 and the FFN's activation
// are null: the forward writes them to scratch and the backward recomputes them there.
struct BlockActivations {
  Act ln1;  // [N, C]
  float *ln1_mean = nullptr, *ln1_rstd = nullptr;
  AttentionActivations attn;
  MLAActivations mla;
  float* h = nullptr;  // [N, C] residual stream after attention
  Act ln2;             // [N, C]
  float *ln2_mean = nullptr, *ln2_rstd = nullptr;
  FFNActivations ffn;
  MoEActivations moe;
  // decoding: also the buffers of the latent attention's decoding forms.
  void allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective = false, bool decoding = false);
};

// Backward scratch shared by all blocks (and the forward's recomputation targets under selective); allocated
// for the widest layer.
struct BlockScratch {
  Act d_ln;    // [N, C]
  Act dres;    // [N, C] the residual gradient as a product operand (backends with narrower activations)
  Act ln_tmp;  // selective recomputation only
  AttentionScratch attn;
  MLAScratch mla;
  FFNScratch ffn;
  MoEScratch moe;
  void allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective = false);
};

struct Block {
  BlockShape shape;
  Norm norm1, norm2;
  Attention attn;
  LatentAttention mla;  // used instead of attn when shape.mla.on()
  FeedForward ffn;  // dense layers
  MoE moe;          // mixture-of-experts layers (shape.moe set)

  // y = block(x) for N tokens at positions pos. x, y: [N, C] fp32; h (the mid-block residual) is a.h or, when
  // decoding (a.h null), y itself (then y may be x too: the stream is updated in place). y == nullptr records the
  // activations only (recomputation skips the last product, which the backward never reads). With cache, keys
  // and values go to the cache and the queries attend over it.
  void forward(Backend& be, float* y, const float* x, BlockActivations& a, BlockScratch& s, const int32_t* pos,
               const AttentionParams& ap, int64_t N, const KVLayer* cache = nullptr) const;
  // On entry dres holds dL/dy; on return dL/dx. Uses the activations of the forward on x.
  void backward(Backend& be, float* dres, const float* x, const BlockActivations& a, BlockScratch& s,
                const int32_t* pos, const AttentionParams& ap, int64_t N) const;
};

}  // namespace kiln::nn
