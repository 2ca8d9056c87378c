// Attention of a few new queries against a KV cache: the attention step of generation.
//
// Sequence b has past_b positions already in the cache and Tq new queries at positions past_b .. past_b+Tq-1,
// whose keys and values have been written to the cache before the call. Query i sees keys 0 .. past_b+i
// (causal), so the same call serves a decode step (Tq = 1) and a prefill that continues a cached prefix.
//
// Tree attention (Medusa's candidate trees): with `tree` set, the Tq new queries are nodes of a tree of candidate
// tokens, not a sequence: query i sees the cached keys 0 .. past_b−1 and new key past_b+j only where bit j of
// tree[i] is set (its ancestors and itself); Tq <= 64, no window. The caller gives each node the position of
// its depth (rotary) and writes its key at cache slot past_b+i as usual.
//
// Grouped-query attention: NKV key/value heads (0 means NH), query head h reads cache head h / (NH / NKV).
// window > 0: query i (at position past_b + i) sees only keys j > past_b + i − window (sliding window).
//
// Layouts (C = NH·HD, KC = NKV·HD; every stride is in floats):
//   query  (b, i), head h:  q   + (b·Tq + i)·q_stride   + h·HD   (q_stride = 3C reads the fused QKV rows)
//   key j of sequence b:    k   + b·kv_batch_stride + j·kv_stride + (h / (NH/NKV))·HD   (the same for v)
//   output (b, i), head h:  out + (b·Tq + i)·out_stride + h·HD
// The cache of one layer is [B][positions][KC] for K and V (kv_stride = KC, kv_batch_stride = positions·KC).
// Multi-head latent attention: the value heads may have their own width HDv and strides (v_stride,
// v_batch_stride; 0: those of k), and the output is [.., NH·HDv]; the absorbed form reads its values from the
// keys' own rows (v = k, HDv < HD: the latent part of each cached row).
//
// cpu:: threads over (sequence, query, head) and, when those are too few to keep every thread busy on a long
// cache, over splits of the key range (flash-decoding: each split keeps its own max, sum and weighted values,
// merged afterwards); the dot products, exp and value sums are vectorised. ref:: is a plain double-precision
// softmax, the reference for tests.
#pragma once
#include <cstdint>

namespace kiln {

// A paged KV cache (continuous batching): the cache is a pool of blocks of `block_size` positions, each
// [block_size][KC]; sequence b's position j lives in block table[b·stride + j / block_size] at row
// j % block_size. Unset (table null): the contiguous [B][positions][KC] layout of kv_batch_stride.
struct KVPages {
  const int32_t* table = nullptr;  // [B][stride] block ids (this device's array)
  int block_size = 0;              // positions per block (cuda:: needs a multiple of 64)
  int64_t stride = 0;              // table entries per sequence
  explicit operator bool() const { return table != nullptr; }
  // The cache row (in units of kv_stride) of position j of sequence b.
  int64_t row(int b, int64_t j) const {
    return int64_t(table[int64_t(b) * stride + j / block_size]) * block_size + j % block_size;
  }
};

struct DecodeAttentionParams {
  int B = 1;                               // sequences
  int Tq = 1;                              // new queries per sequence
  int past = 0;                            // cached positions before the first query (all sequences) ...
  const int32_t* past_per_seq = nullptr;   // ... or per sequence [B], when set
  int max_past = 0;                        // an upper bound of past + Tq (the cache capacity; cuda:: sizes by it)
  int NH = 1, HD = 64;
  int NKV = 0;                             // key/value heads; 0 means NH
  int window = 0;                          // sliding window; 0: none
  float scale = 0.125f;                    // usually 1/sqrt(HD)
  const float* q = nullptr;
  int64_t q_stride = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t kv_batch_stride = 0, kv_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int HDv = 0;                             // value head dim; 0 means HD
  int64_t v_batch_stride = 0, v_stride = 0;  // 0: kv_batch_stride, kv_stride
  KVPages pages;                           // set: k and v are the pools of a paged cache (kv_batch_stride unused)
  const uint64_t* tree = nullptr;          // [Tq] host masks of tree attention (the same for every sequence), or null

  int past_of(int b) const { return past_per_seq ? past_per_seq[b] : past; }
  int hdv() const { return HDv > 0 ? HDv : HD; }
  int64_t vbs() const { return v_batch_stride > 0 ? v_batch_stride : kv_batch_stride; }
  int64_t vs() const { return v_stride > 0 ? v_stride : kv_stride; }
};

namespace cpu {
void decode_attention(const DecodeAttentionParams& p);
}
// cuda:: (kernels/cuda/decode_attention.cu): the same step on the GPU with a bf16 KV cache, split along the
// cached sequence (flash-decoding) when the cache is long, the splits merged by a second kernel. Every
// position is read from device memory (past_per_seq) and grids are sized by max_past, so a captured CUDA graph
// replays correctly step after step.
namespace cuda {
struct DecodeAttention {
  int B = 1, Tq = 1;
  const int32_t* past_per_seq = nullptr;  // device [B]: cached positions before the first query
  int max_past = 0;                       // upper bound of past + Tq (the cache capacity)
  int NH = 1, HD = 64;
  int NKV = 0;                            // key/value heads; 0 means NH
  int window = 0;                         // sliding window; 0: none
  float scale = 0.125f;
  const uint16_t* q = nullptr;
  int64_t q_stride = 0;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  int64_t kv_batch_stride = 0, kv_stride = 0;
  uint16_t* out = nullptr;
  int64_t out_stride = 0;
  KVPages pages;                          // device table; block_size a multiple of 64
  // Latent attention: value heads of their own width and strides (0: HD and k's strides). Any HD/HDv other
  // than equal 64 or 128 takes a SIMT kernel (warps over keys, lanes over dims; HDv <= 512).
  int HDv = 0;
  int64_t v_batch_stride = 0, v_stride = 0;
  // Tree attention (Medusa): device [Tq] masks as in DecodeAttentionParams::tree (the same for every sequence),
  // or null. Takes the SIMT kernel: Tq <= 64 nodes, no window.
  const uint64_t* tree = nullptr;
};
size_t decode_attention_scratch_bytes(const DecodeAttention& p);
void decode_attention(const DecodeAttention& p, void* scratch, void* stream);
// Writes the Tq new keys and values of each sequence (from the fused QKV rows, [B·Tq, NH + 2·NKV, HD]) into
// the cache ([B][positions][NKV·HD], or the blocks of `pages`) at positions past_per_seq[b] .. + Tq - 1.
void kv_cache_append(uint16_t* k_cache, uint16_t* v_cache, const uint16_t* qkv, const int32_t* past_per_seq, int B,
                     int Tq, int NH, int NKV, int HD, int64_t kv_batch_stride, void* stream,
                     const KVPages& pages = {});
}  // namespace cuda
namespace ref {
void decode_attention(const DecodeAttentionParams& p);
}

}  // namespace kiln
