// Inference for GPT-2 with a KV cache: weights only, no gradients, no saved activations.
//
// forward() feeds n new tokens per sequence at the next positions. The new tokens run through every matrix
// product together (a prefill of a whole prompt is one sgemm per weight), their keys and values are written
// into the cache, and each new query attends to the cache (FlashAttention when the cache was empty, the decode
// attention kernel otherwise). One further token then costs one row through every matrix product (sgemv:
// memory-bound, each weight read once) and one query against the cache per head.
//
// The B sequences of a batch move in lockstep (same length). Only the last new position's logits are
// computed unless all logits are asked for (the LM head, V×C, is the biggest read of a step).
#pragma once
#include <cstdint>
#include <vector>

#include "core/memory.h"
#include "infer/kv_cache.h"
#include "models/config.h"
#include "models/gpt2_params.h"

namespace kiln {

// What the generation loop needs of a model with a KV cache; the CPU Decoder below and the GPU CudaDecoder
// (infer/decoder_cuda.h) implement it.
class IncrementalDecoder {
 public:
  virtual ~IncrementalDecoder() = default;
  // tokens: [batch, n] row-major, each in [0, vocab_size). Runs them at positions length() .. length()+n-1.
  // Returns the logits [batch, V] of each sequence's last new token (host memory), or with all_logits
  // [batch, n, V]. Throws kiln::Error if a token is out of range or the cache would overflow max_positions.
  virtual const float* forward(const int32_t* tokens, int n, bool all_logits = false) = 0;
  // forward() for greedy decoding: the arg max (infer/sampler.h's rule) of each sequence's last logits over
  // ids [0, vocab_limit), [batch]. This default takes it from the logits; the GPU decoder computes it on the
  // device and copies back only the ids.
  virtual const int32_t* forward_argmax(const int32_t* tokens, int n, int vocab_limit);
  virtual int length() const = 0;         // positions in the cache
  virtual int max_positions() const = 0;
  virtual int batch() const = 0;
  virtual void reset() = 0;               // forget the cache (its memory is kept)
  virtual const GPT2Config& config() const = 0;

 private:
  std::vector<int32_t> argmax_;
};

class Decoder : public IncrementalDecoder {
 public:
  // params: a parameter block laid out as ParamTable::gpt2(cfg) (e.g. GPT2::params()); not copied, so it
  // must outlive the decoder. max_positions 0 means cfg.n_positions.
  Decoder(const GPT2Config& cfg, const float* params, int batch = 1, int max_positions = 0);

  const float* forward(const int32_t* tokens, int n, bool all_logits = false) override;

  int length() const override { return length_; }
  int max_positions() const override { return cache_.max_positions(); }
  int batch() const override { return batch_; }
  void reset() override { length_ = 0; }
  const GPT2Config& config() const override { return cfg_; }
  size_t cache_bytes() const { return cache_.bytes(); }

  // Tokens per forward() call are run in chunks of at most this many positions (bounds activation memory).
  static constexpr int kMaxChunk = 256;

 private:
  GPT2Config cfg_;
  ParamTable table_;
  GPT2Params p_;
  int batch_;
  KVCache cache_;
  int length_ = 0;

  // Activations for up to rows_ = batch·chunk rows, grown on demand.
  int64_t rows_ = 0;
  Arena acts_;
  float *x_ = nullptr, *ln_ = nullptr, *qkv_ = nullptr, *atty_ = nullptr, *fc_ = nullptr;
  float *mean_ = nullptr, *rstd_ = nullptr, *lse_ = nullptr, *last_ = nullptr;
  std::vector<int32_t> tok_, pos_;
  std::vector<float> logits_;

  void ensure_rows(int64_t rows);
  // Runs one chunk of n tokens per sequence; writes the final hidden state (pre-LN) into x_.
  void run_chunk(const int32_t* tokens, int n, int64_t tok_stride);
  void lm_head(const float* hidden, int64_t rows, float* logits);
};

}  // namespace kiln
