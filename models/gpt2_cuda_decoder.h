// GPT-2 inference on the GPU with a bf16 KV cache (kiln generate --device cuda).
//
// Weights: the bf16 copy feeds every matrix product (cuBLASLt, fp32 accumulation), the fp32 block supplies
// LayerNorm gains, biases and the embedding tables. A prompt with an empty cache runs through FlashAttention
// in chunks of up to kMaxChunk positions; later tokens attend through the decode-attention kernel. The
// single-token decode step is captured once in a CUDA graph and replayed: its inputs (token, position, cache
// length) are copied from page-locked staging buffers inside the graph and every kernel reads them from
// device memory, so one graph launch per token replaces ~10 launches per layer.
#pragma once
#include <cstdint>
#include <vector>

#include "core/gpu.h"
#include "kernels/decode_attention.h"
#include "models/config.h"
#include "models/gpt2_params.h"
#include "models/model.h"

namespace kiln {

class CudaDecoder : public IncrementalDecoder {
 public:
  // params: a host parameter block laid out as model_param_table(cfg); copied to the device.
  CudaDecoder(const ModelConfig& cfg, const float* params, int batch = 1, int max_positions = 0,
              bool use_graph = true);
  ~CudaDecoder() override;
  CudaDecoder(const CudaDecoder&) = delete;
  CudaDecoder& operator=(const CudaDecoder&) = delete;

  const float* forward(const int32_t* tokens, int n, bool all_logits = false) override;
  // Greedy decoding's step on the device: only the arg max of each sequence's last logits comes back.
  const int32_t* forward_argmax(const int32_t* tokens, int n, int vocab_limit) override;
  int length() const override { return length_; }
  int max_positions() const override { return max_pos_; }
  int batch() const override { return batch_; }
  void reset() override { length_ = 0; }
  const ModelConfig& config() const override { return model_cfg_; }
  size_t cache_bytes() const override { return kcache_.size() + vcache_.size(); }
  size_t device_bytes() const;

  static constexpr int kMaxChunk = 256;   // prefill positions per pass
  static constexpr int kMaxDecodeQ = 16;  // queries per decode-attention pass after the first chunk

 private:
  ModelConfig model_cfg_;
  GPT2Config cfg_;
  ParamTable table_;
  int batch_, max_pos_, length_ = 0;
  bool use_graph_;
  gpu::DeviceBuffer params_, params16_, kcache_, vcache_;
  gpu::DeviceArena acts_;
  GPT2Params p_;
  // Activations for up to rows_ = batch · kMaxChunk rows.
  int64_t rows_ = 0;
  float *x_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr, *lse_ = nullptr, *logits_ = nullptr;
  uint16_t *ln_ = nullptr, *qkv_ = nullptr, *att_ = nullptr, *fc_pre_ = nullptr, *fc_ = nullptr;
  int32_t *tok_d_ = nullptr, *pos_d_ = nullptr, *past_d_ = nullptr;
  void* dec_scratch_ = nullptr;
  // Page-locked staging, one block: [rows] tokens, [rows] positions, [batch] cache lengths; logits out.
  int32_t *tok_h_ = nullptr, *pos_h_ = nullptr, *past_h_ = nullptr, *argmax_h_ = nullptr;
  int32_t* argmax_d_ = nullptr;
  float* logits_h_ = nullptr;
  std::vector<float> all_out_;
  // The captured decode step, one per output kind (logits, or arg max below `limit`).
  struct StepGraph {
    gpu::Graph graph;
    int eager_runs = 0, limit = 0;
  };
  StepGraph step_graphs_[2];
  enum class Output { None, Last, All, Argmax };

  const uint16_t* w16(const float* p) const;
  size_t inputs_count() const { return size_t(2 * rows_ + batch_); }
  // Decode-attention arguments for Tq queries against one layer's cache (kc, vc).
  cuda::DecodeAttention decode_params(int Tq, const uint16_t* kc, const uint16_t* vc) const;
  // One pass over n new positions per sequence (inputs already in the staging buffers); once the stream is
  // synchronised, logits_h_ holds the last position's logits (Last) or all of them (All), or argmax_h_ the
  // arg max of the last position's logits over ids below limit (Argmax).
  void run(int n, bool flash, Output out, int limit);
  void advance(const int32_t* tokens, int n, Output out, int limit);
};

}  // namespace kiln
