// The continuous-batching decoder (models/model.h BatchDecoder) on the one transformer composition: the same
// TransformerWeights and nn::Block code as TransformerDecoder, with each sequence's keys and values in blocks of
// a shared pool (nn::KVLayer::pages) and its own cached length.
//
// A forward() groups its rows into passes: every single-token row in one pass (B rows of one query each, the
// decode attention with per-sequence lengths and block tables); fresh prompts of the same length in one pass
// through FlashAttention within the chunk (as TransformerDecoder's prefill); any other longer row in its own
// pass, through the decode attention over its cached prefix, in pieces of the backend's query limit, except
// that continuations of one length within that limit (speculative checks) share a pass. Tree rows (Medusa's
// candidate trees) of one size and one mask array share a pass through the tree attention (host backends);
// keep_path then moves the accepted nodes' keys and values to consecutive slots in the sequence's blocks.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "models/model.h"
#include "models/narrow_weights.h"
#include "models/transformer.h"
#include "nn/block.h"
#include "nn/workspace.h"

namespace kiln {

class PagedDecoder final : public BatchDecoder {
 public:
  PagedDecoder(const ModelConfig& cfg, const float* params, const BatchDecoderOptions& opt);
  PagedDecoder(const PagedDecoder&) = delete;
  PagedDecoder& operator=(const PagedDecoder&) = delete;

  const float* forward(const std::vector<BatchRow>& rows) override;
  int block_size() const override { return block_size_; }
  int num_blocks() const override { return num_blocks_; }
  int max_positions() const override { return max_pos_; }
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return k_.size() + v_.size(); }
  const float* hidden() const override { return keep_hidden_ ? hidden_.data() : BatchDecoder::hidden(); }
  void keep_path(const int32_t* blocks, int n_blocks, int base, const int32_t* nodes, int m) override;

  static constexpr int kMaxChunk = 256;  // positions of a fresh prompt run at once

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  DecoderWeights weights_;
  TransformerWeights w_;
  int block_size_, num_blocks_, max_pos_;
  nn::DeviceBlock k_, v_;  // [layer][block][block_size][NKV·HD] in the activation type

  int64_t rows_ = 0, max_b_ = 0, table_cap_ = 0, logit_rows_ = 0;  // workspace sized for these (grown on demand)
  nn::Workspace ws_;
  nn::BlockActivations a_;
  nn::BlockScratch s_;
  float *x_ = nullptr, *last_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr, *logits_d_ = nullptr;
  int32_t* inputs_d_ = nullptr;  // device backends: tokens, positions, pasts, block table of a pass
  nn::Act ln_;
  std::vector<int32_t> inputs_;
  std::vector<float> logits_, pass_logits_;
  std::vector<size_t> off_;  // each row's first logits vector in logits_
  bool keep_hidden_ = false;
  std::vector<float> hidden_;  // the final norm's output behind each logits row (keep_hidden)
  std::vector<uint16_t> hidden16_;  // a device's bf16 rows of it, and them widened
  std::vector<float> hidden32_;

  // The first `rows` rows of the final norm's output ln_, in fp32 host memory.
  const float* host_hidden(int64_t rows);

  void ensure(int64_t rows, int64_t B, int64_t table_entries, int64_t logit_rows);
  // One pass: B sequences of Tq new tokens each (rows[idx[i]] from offset `from`); the logits of each row's
  // last token go to logits_ at its offset when `last` is set, those of every token for an all_logits row.
  void run_pass(const std::vector<BatchRow>& rows, const std::vector<int>& idx, int from, int Tq, bool last);
};

}  // namespace kiln
