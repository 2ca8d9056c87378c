// Scaled dot-product attention over multiple heads, reading q, k, v straight from the fused QKV
// projection output and writing the merged-heads output, so no permute copies exist.
//
// Layouts (N = total tokens = B·T, C = NH·HD):
//   qkv  [N, 3, NH, HD]  (row n: C query values, then C key values, then C value values)
//   out  [N, NH, HD]     = [N, C]
//   lse  [NH, N]         per-row log-sum-exp of the scaled scores, saved for the backward
//   dqkv [N, 3, NH, HD]  overwritten by the backward
//
// Sequences: with cu_seqlens == nullptr the N tokens are B sequences of T. Otherwise the tokens are
// num_seqs packed sequences, sequence s spanning rows [cu_seqlens[s], cu_seqlens[s+1]) (B and T unused),
// and no token attends across a boundary. causal: token i attends to tokens j <= i of its sequence.
// scale is usually 1/sqrt(HD).
//
// cpu:: is FlashAttention: tiled over queries and keys with an online softmax, never holding a T×T
// matrix; the backward recomputes probabilities from lse. ref:: materialises the full score matrix.
#pragma once
#include <cstdint>

namespace kiln {

struct AttentionParams {
  int B = 1, T = 0, NH = 1, HD = 64;
  bool causal = true;
  float scale = 0.125f;
  const int32_t* cu_seqlens = nullptr;  // [num_seqs + 1], optional
  int num_seqs = 0;
};

namespace cpu {
void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p);
}  // namespace cpu
namespace ref {
void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p);
}  // namespace ref
}  // namespace kiln
