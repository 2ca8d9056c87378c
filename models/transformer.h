// The decoder-only transformer every family composes (models/family.h): token embedding (+ learned positions),
// n_layer pre-norm blocks (nn/block.h), a final norm and the LM head (tied to the token embedding or its own
// matrix). One composition serves training (Transformer) and KV-cache decoding (TransformerDecoder); the
// modules run on an nn::Backend, so the same code serves each device.
//
// TransformerWeights binds the modules to a parameter block by canonical key (models/param_table.h), so a new
// family only names its tensors.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/memory.h"
#include "models/model.h"
#include "nn/block.h"
#include "nn/workspace.h"

namespace kiln {

struct TransformerWeights {
  std::vector<nn::Block> blocks;
  nn::Norm final_norm;
  nn::Weight head;  // [V, C] (nn.Linear layout): the token embedding when tied
  const float* wte = nullptr;
  const float* wpe = nullptr;  // learned positions, or null
  float *dwte = nullptr, *dwpe = nullptr;
  // params/grads: blocks in table layout (grads may be null); params16: the 16-bit copy (may be null);
  // inv_freq: the rotary frequencies on the backend's device.
  void bind(const ModelConfig& cfg, const ParamTable& table, const float* params, float* grads,
            const uint16_t* params16, const float* inv_freq);
};

class Transformer final : public Model {
 public:
  Transformer(const ModelConfig& cfg, const ModelOptions& opt);
  ~Transformer() override;

  const ModelConfig& config() const override { return cfg_; }
  const ParamTable& table() const override { return table_; }
  float* host_params() override { return params_; }
  void params_changed() override;
  void sync_to_host() override {}

  size_t plan(int B, int T, RecomputePolicy policy = {}, int lm_head_chunk = 0) override;
  static size_t plan_bytes(const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk);
  size_t activation_bytes() const override { return ws_.capacity(); }
  size_t state_bytes() const override;

  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                 float grad_scale) override;
  void backward() override;
  void zero_grad() override;
  const float* logits() const override;
  ParamBlocks blocks() override;

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  Buffer params_buf_, grads_buf_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  std::vector<uint16_t> params16_;  // 16-bit copies of the matrices (mixed precision), table layout
  std::vector<float> inv_freq_;
  TransformerWeights w_;

  struct Activations {
    RecomputePolicy policy{};
    int64_t max_tokens = 0, chunk = 0;           // chunk: LM head rows at a time
    float* encoded = nullptr;                    // [N, C] input of block 0
    std::vector<nn::BlockActivations> blocks;    // none/selective: one per layer; every:K: K (one segment)
    std::vector<float*> out;                     // none/selective: each layer's output; every:K: segment's
    std::vector<float*> ckpt_in;                 // every:K: input of each segment (ckpt_in[0] = encoded)
    float* final_out = nullptr;                  // [N, C] input of the final norm
    nn::Act lnf_out;                             // [N, C]
    float *lnf_mean = nullptr, *lnf_rstd = nullptr;
    nn::Act dlnf;                                // [N, C]
    nn::Act logits;                              // [chunk, V]
    float* losses = nullptr;                     // [N]
    float* dres = nullptr;                       // [N, C] gradient of the residual stream
    nn::BlockScratch scratch;
    void allocate(nn::Workspace& ws, const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int64_t chunk);
  };
  nn::Workspace ws_;
  Activations a_;
  int64_t last_N_ = 0;
  AttentionParams last_attn_{};
  const int32_t *last_tokens_ = nullptr, *last_pos_ = nullptr;
  std::vector<int32_t> tokens_, pos_;  // the last forward's inputs, kept for the backward

  void run_blocks_forward(const AttentionParams& attn, int64_t N);
  void lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum);
};

class TransformerDecoder : public IncrementalDecoder {
 public:
  TransformerDecoder(const ModelConfig& cfg, const float* params, int batch, int max_positions);

  const float* forward(const int32_t* tokens, int n, bool all_logits = false) override;
  int length() const override { return length_; }
  int max_positions() const override { return max_pos_; }
  int batch() const override { return batch_; }
  void reset() override { length_ = 0; }
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return k_.size() + v_.size(); }

  // Tokens per forward() call are run in chunks of at most this many positions (bounds activation memory).
  static constexpr int kMaxChunk = 256;

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  std::vector<float> inv_freq_;
  TransformerWeights w_;
  int batch_, max_pos_;
  int length_ = 0;
  Buffer k_, v_;  // [layer][batch][position][NKV·HD]

  int64_t rows_ = 0;  // activations for up to rows_ = batch·chunk rows, grown on demand
  nn::Workspace ws_;
  nn::BlockActivations a_;
  nn::BlockScratch s_;
  float *x_ = nullptr, *last_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr;
  nn::Act ln_;
  std::vector<int32_t> tok_, pos_, past_;
  std::vector<float> logits_;

  void ensure_rows(int64_t rows);
  void run_chunk(const int32_t* tokens, int n, int64_t tok_stride);
  void lm_head(const float* hidden, int64_t rows, float* logits);
};

}  // namespace kiln
