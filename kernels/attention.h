// Scaled dot-product attention over multiple heads, reading q, k, v straight from the fused QKV
// projection output and writing the merged-heads output, so no permute copies exist.
//
// Layouts (N = total tokens = B·T; NH query heads, NKV key/value heads, NKV dividing NH; C = NH·HD):
//   qkv  [N, NH + 2·NKV, HD]  row n: NH query heads, then NKV key heads, then NKV value heads (GPT-2's fused
//                             c_attn output with NKV = NH; Llama's q/k/v projections fused the same way)
//   out  [N, NH, HD]          = [N, C]
//   lse  [NH, N]              per-row log-sum-exp of the scaled scores, saved for the backward
//   dqkv [N, NH + 2·NKV, HD]  overwritten by the backward
// Grouped-query attention: query head h reads key/value head h / (NH / NKV) (MQA: NKV = 1).
//
// Sequences: with cu_seqlens == nullptr the N tokens are B sequences of T. Otherwise the tokens are
// num_seqs packed sequences, sequence s spanning rows [cu_seqlens[s], cu_seqlens[s+1]) (B and T unused),
// and no token attends across a boundary. causal: token i attends to tokens j <= i of its sequence.
// window > 0 (sliding window, causal only, Mistral): token i attends to tokens j with i − window < j <= i.
// scale is usually 1/sqrt(HD).
// HDv (multi-head latent attention, DeepSeek): the value heads may be narrower or wider than the q/k heads:
//   qkv [N, (NH + NKV)·HD + NKV·HDv]   out/dout [N, NH·HDv]     (HDv = 0: HD, the layouts above)
//
// cpu:: is FlashAttention: tiled over queries and keys with an online softmax, never holding a T×T
// matrix; the backward recomputes probabilities from lse. ref:: materialises the full score matrix.
#pragma once
#include <cstdint>
#include <vector>

#include "core/error.h"

namespace kiln {

struct AttentionParams {
  int B = 1, T = 0, NH = 1, HD = 64;
  int NKV = 0;      // key/value heads; 0 means NH
  int HDv = 0;      // value head dim; 0 means HD
  int window = 0;   // sliding window in tokens; 0: none
  bool causal = true;
  float scale = 0.125f;
  const int32_t* cu_seqlens = nullptr;  // [num_seqs + 1], optional
  int num_seqs = 0;
  // cuda:: with cu_seqlens (a device array there): the longest sequence and the total token count.
  int max_seqlen = 0;
  int64_t total_tokens = 0;
};

inline int kv_heads(const AttentionParams& p) { return p.NKV > 0 ? p.NKV : p.NH; }
inline int v_dim(const AttentionParams& p) { return p.HDv > 0 ? p.HDv : p.HD; }
// Floats per qkv row, and per output row.
inline int64_t qkv_row(const AttentionParams& p) {
  return int64_t(p.NH + kv_heads(p)) * p.HD + int64_t(kv_heads(p)) * v_dim(p);
}
inline int64_t attention_out_row(const AttentionParams& p) { return int64_t(p.NH) * v_dim(p); }

// One sequence's rows: [start, start + len).
struct AttentionSpan {
  int64_t start, len;
};

// The sequences the tokens form (B rows of T, or the packed cu_seqlens), validated; N is the total token count.
inline std::vector<AttentionSpan> attention_spans(const AttentionParams& p, int64_t& N) {
  KILN_CHECK(p.NH >= 1 && p.HD >= 1, "attention: NH (", p.NH, ") and HD (", p.HD, ") must be positive");
  KILN_CHECK(p.HDv >= 0, "attention: HDv (", p.HDv, ") must be >= 0");
  KILN_CHECK(p.NKV >= 0 && p.NH % kv_heads(p) == 0, "attention: NKV (", p.NKV, ") must divide NH (", p.NH, ")");
  KILN_CHECK(p.window >= 0 && (p.window == 0 || p.causal), "attention: window (", p.window,
             ") must be >= 0 and needs causal attention");
  std::vector<AttentionSpan> s;
  if (p.cu_seqlens == nullptr) {
    KILN_CHECK(p.B >= 0 && p.T >= 0, "attention: B (", p.B, ") and T (", p.T, ") must be non-negative");
    for (int b = 0; b < p.B; b++) s.push_back({int64_t(b) * p.T, p.T});
    N = int64_t(p.B) * p.T;
    return s;
  }
  KILN_CHECK(p.num_seqs >= 0, "attention: num_seqs (", p.num_seqs, ") must be non-negative");
  KILN_CHECK(p.cu_seqlens[0] == 0, "attention: cu_seqlens[0] is ", p.cu_seqlens[0], ", expected 0");
  for (int i = 0; i < p.num_seqs; i++) {
    KILN_CHECK(p.cu_seqlens[i + 1] >= p.cu_seqlens[i], "attention: cu_seqlens decreases at index ", i + 1);
    s.push_back({p.cu_seqlens[i], p.cu_seqlens[i + 1] - p.cu_seqlens[i]});
  }
  N = p.cu_seqlens[p.num_seqs];
  return s;
}

namespace cpu {
void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p);
}  // namespace cpu
// cuda:: (kernels/cuda/attention.cu): FlashAttention of our own on tensor cores (mma.sync m16n8k16, bf16
// operands, fp32 accumulation and softmax), causal or not, packed sequences through cu_seqlens, grouped-query
// (NKV) and sliding-window attention. Head dims (q/k, v): (64, 64) and (128, 128); for latent attention (64, 32)
// and DeepSeek's (192, 128) (each pair is a kernel instantiation). qkv/out/dout/dqkv are bf16, lse fp32 [NH, N].
// The backward needs attention_backward_scratch_bytes(p) bytes of device scratch (fp32 dQ accumulators).
inline constexpr const char* kCudaAttentionDims = "64/64, 128/128, 64/32 or 192/128";
inline bool cuda_attention_dims(int HD, int HDv) {
  return (HD == HDv && (HD == 64 || HD == 128)) || (HD == 64 && HDv == 32) || (HD == 192 && HDv == 128);
}
namespace cuda {
void attention_forward(uint16_t* out, float* lse, const uint16_t* qkv, const AttentionParams& p, void* stream);
size_t attention_backward_scratch_bytes(const AttentionParams& p);
void attention_backward(uint16_t* dqkv, const uint16_t* dout, const uint16_t* qkv, const uint16_t* out,
                        const float* lse, const AttentionParams& p, void* scratch, void* stream);
}  // namespace cuda
namespace ref {
void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p);
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p);
}  // namespace ref
}  // namespace kiln
