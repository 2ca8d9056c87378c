// The pre-LayerNorm GPT-2 transformer block:
//   h = x + Proj(Attention(QKV(LN1(x))))
//   y = h + FcProj(GELU(Fc(LN2(h))))
// forward() records what backward() needs in BlockActivations; backward() turns dy (gradient of the
// block output, in place) into dx and accumulates the parameter gradients.
#pragma once
#include <cstdint>

#include "kernels/attention.h"
#include "models/gpt2_params.h"
#include "nn/layers.h"

namespace kiln {
class Arena;
}

namespace kiln::nn {

// Saved activations of one block for a batch of N tokens. With selective recomputation ln1, ln2 and
// fc_gelu are null: the forward writes them to scratch and the backward recomputes them there.
struct BlockActivations {
  float *ln1, *ln1_mean, *ln1_rstd;  // [N,C], [N], [N]
  float *qkv;                        // [N,3C]
  float *atty, *lse;                 // [N,C], [NH,N]
  float *h;                          // [N,C]  residual after attention
  float *ln2, *ln2_mean, *ln2_rstd;  // [N,C], [N], [N]
  float *fc, *fc_gelu;               // [N,4C] pre- and post-GELU
  void allocate(Arena& arena, int64_t N, int C, int NH, bool selective = false);
};

// Scratch for the backward, shared by all blocks.
struct BlockScratch {
  float *d_ln;     // [N,C]
  float *d_atty;   // [N,C]
  float *d_qkv;    // [N,3C]
  float *d_fc;     // [N,4C]
  float *ln_tmp = nullptr, *gelu_tmp = nullptr;  // [N,C], [N,4C]: selective recomputation only
  void allocate(Arena& arena, int64_t N, int C, bool selective = false);
};

struct Block {
  LayerNorm ln1, ln2;
  Linear qkv, attn_proj, fc, fc_proj;
  int n_head = 1;

  static Block bind(const LayerParams& p, const LayerParams* g, int C, int n_head, float eps);

  // y = block(x); x and y are [N, C] and may not alias. y == nullptr records the activations only (the
  // backward never reads y, so recomputation skips the last projection).
  void forward(float* y, const float* x, BlockActivations& a, BlockScratch& s, const AttentionParams& ap,
               int64_t N) const;
  // On entry dy holds dL/dy; on return it holds dL/dx. Uses the activations of the forward on x.
  void backward(float* dy, const float* x, const BlockActivations& a, BlockScratch& s, const AttentionParams& ap,
                int64_t N) const;
};

}  // namespace kiln::nn
