// A multi-token-prediction module (DeepSeek-V3, section 2.2 of the report): depth k predicts token t+k+1 from the
// previous depth's hidden state h (the main model's last block output for k = 1) and the embedding of token t+k:
//   x = eh_proj([RMSNorm_e(embed(t+k)) | RMSNorm_h(h)])     (embedding first, as the released eh_proj expects)
//   h_k = Block(x),   logits_k = head(RMSNorm_head(h_k))     (embedding and head shared with the main model)
// The module computes up to the head's norm; the model runs the shared head and the loss. Forward and backward
// side by side in mtp.cpp.
#pragma once
#include <cstdint>

#include "nn/backend.h"
#include "nn/block.h"
#include "nn/norm.h"
#include "nn/workspace.h"

namespace kiln::nn {

struct MTPActivations {
  float* emb = nullptr;                        // [N, C] embedding of the shifted tokens
  Act en, hn;                                  // [N, C] the two normed inputs
  float *en_rstd = nullptr, *hn_rstd = nullptr;
  Act cat;                                     // [N, 2C]
  float* x = nullptr;                          // [N, C] the block's input
  BlockActivations blk;
  float* h = nullptr;                          // [N, C] the block's output (the next depth's input)
  Act ln;                                      // [N, C] the head's input
  float* ln_rstd = nullptr;
  Act dln;                                     // [N, C] the head's gradient of ln (set by the model)
  float* dres = nullptr;                       // [N, C] dL/dh (later depths add theirs), then dL/dx
  // decoding: the block's activations for a KV-cache forward (the decoder's draft).
  void allocate(Workspace& ws, int64_t N, const BlockShape& s, bool decoding = false);
};

// Shared by the modules' backward.
struct MTPScratch {
  float* zeros = nullptr;  // [N, C] zero residual for eh_proj's product
  Act dcat, dpart;         // [N, 2C], [N, C]
  float* demb = nullptr;   // [N, C]
  void allocate(Workspace& ws, int64_t N, int C);
};

struct MTPModule {
  Norm enorm, hnorm, head_norm;
  Weight eh_proj;  // 2C -> C
  Block block;

  // prev: [N, C] the previous depth's hidden state; tokens: the shifted tokens (this device's).
  void forward(Backend& be, MTPActivations& a, BlockScratch& bs, const float* prev, const int32_t* tokens,
               const float* wte, const int32_t* pos, const AttentionParams& ap, int64_t N,
               const float* zeros, const KVLayer* cache = nullptr) const;
  // Turns a.dln (and what later depths added to a.dres) into parameter gradients, dwte (the embedding's share)
  // and dprev += dL/dprev.
  void backward(Backend& be, float* dprev, MTPActivations& a, BlockScratch& bs, MTPScratch& s, const float* prev,
                const int32_t* tokens, float* dwte, const int32_t* pos, const AttentionParams& ap, int64_t N) const;
};

}  // namespace kiln::nn
