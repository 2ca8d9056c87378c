// Attention of a few new queries against a KV cache: the attention step of generation.
//
// Sequence b has past_b positions already in the cache and Tq new queries at positions past_b .. past_b+Tq-1,
// whose keys and values have been written to the cache before the call. Query i sees keys 0 .. past_b+i
// (causal), so the same call serves a decode step (Tq = 1) and a prefill that continues a cached prefix.
//
// Layouts (C = NH·HD; every stride is in floats):
//   query  (b, i), head h:  q   + (b·Tq + i)·q_stride   + h·HD   (q_stride = 3C reads the fused QKV rows)
//   key j of sequence b:    k   + b·kv_batch_stride + j·kv_stride + h·HD   (the same for v)
//   output (b, i), head h:  out + (b·Tq + i)·out_stride + h·HD
// The cache of one layer is [B][positions][C] for K and V (kv_stride = C, kv_batch_stride = positions·C).
//
// cpu:: threads over (sequence, query, head) and, when those are too few to keep every thread busy on a long
// cache, over splits of the key range (flash-decoding: each split keeps its own max, sum and weighted values,
// merged afterwards); the dot products, exp and value sums are vectorised. ref:: is a plain double-precision
// softmax, the reference for tests.
#pragma once
#include <cstdint>

namespace kiln {

struct DecodeAttentionParams {
  int B = 1;                               // sequences
  int Tq = 1;                              // new queries per sequence
  int past = 0;                            // cached positions before the first query (all sequences) ...
  const int32_t* past_per_seq = nullptr;   // ... or per sequence [B], when set
  int NH = 1, HD = 64;
  float scale = 0.125f;                    // usually 1/sqrt(HD)
  const float* q = nullptr;
  int64_t q_stride = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t kv_batch_stride = 0, kv_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;

  int past_of(int b) const { return past_per_seq ? past_per_seq[b] : past; }
};

namespace cpu {
void decode_attention(const DecodeAttentionParams& p);
}
namespace ref {
void decode_attention(const DecodeAttentionParams& p);
}

}  // namespace kiln
