// The continuous-batching decoder (models/model.h BatchDecoder) on the one transformer composition: the same
// TransformerWeights and nn::Block code as TransformerDecoder, with each sequence's keys and values in blocks of
// a shared pool (nn::KVLayer::pages) and its own cached length.
//
// A forward() groups its rows into passes: every single-token row in one pass (B rows of one query each, the
// decode attention with per-sequence lengths and block tables); fresh prompts of the same length in one pass
// through FlashAttention within the chunk (as TransformerDecoder's prefill); any other longer row in its own
// pass, through the decode attention over its cached prefix, in pieces of the backend's query limit, except
// that continuations of one length within that limit (speculative checks) share a pass. Tree rows (Medusa's
// candidate trees) of one size and one mask array share a pass through the tree attention;
// keep_path then moves the accepted nodes' keys and values to consecutive slots in the sequence's blocks.
// Latent attention (DeepSeek-V3) caches each position's c_KV and rotary key (one row, no values) and decodes in
// the absorbed form. With self_draft, the model's MTP modules get cache layers of their own after the main
// ones (the same block ids), and self_draft() runs module k over rows grouped as forward() groups them.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "models/model.h"
#include "models/narrow_weights.h"
#include "models/transformer.h"
#include "nn/block.h"
#include "nn/mtp.h"
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
  const float* stream() const override { return keep_stream_ ? stream_.data() : BatchDecoder::stream(); }
  int self_draft_depth() const override { return mtp_; }
  const float* self_draft(int k, const std::vector<DraftRow>& rows) override;
  const float* draft_hidden() const override { return mtp_ ? draft_hidden_.data() : BatchDecoder::draft_hidden(); }

  static constexpr int kMaxChunk = 256;  // positions of a fresh prompt run at once

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  DecoderWeights weights_;
  TransformerWeights w_;
  int block_size_, num_blocks_, max_pos_;
  nn::DeviceBlock k_, v_;  // [layer][block][block_size][cache_width()] in the activation type (latent: no v_);
                           // with self_draft the MTP modules' layers follow the main ones

  int64_t rows_ = 0, max_b_ = 0, table_cap_ = 0, logit_rows_ = 0;  // workspace sized for these (grown on demand)
  nn::Workspace ws_;
  nn::BlockActivations a_;
  nn::BlockScratch s_;
  float *x_ = nullptr, *last_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr, *logits_d_ = nullptr;
  int32_t* inputs_d_ = nullptr;  // device backends: tokens, positions, pasts, block table of a pass
  nn::DeviceBlock tree_d_;       // device backends: a tree pass's node masks
  nn::Act ln_;
  std::vector<int32_t> inputs_;
  std::vector<float> logits_, pass_logits_;
  std::vector<size_t> off_;  // each row's first logits vector in logits_
  bool keep_hidden_ = false;
  std::vector<float> hidden_;  // the final norm's output behind each logits row (keep_hidden)
  std::vector<uint16_t> hidden16_;  // a device's bf16 rows of it, and them widened
  std::vector<float> hidden32_;
  bool keep_stream_ = false;
  std::vector<float> stream_;            // the stream of every new token (keep_stream)
  std::vector<size_t> stream_off_;       // each row's first stream row
  int mtp_ = 0;                          // MTP modules with cache layers (self_draft)
  nn::MTPActivations mtp_a_;
  float* mtp_zeros_ = nullptr;
  std::vector<float> prev_;              // a module pass's input hidden states, [N, C]
  float* prev_d_ = nullptr;              // device backends: them on the device
  std::vector<float> pass_stream_;       // device backends: a pass's stream rows or a module's output, on the host
  std::vector<float> draft_logits_, draft_hidden_;
  std::vector<size_t> draft_off_;        // each draft row's first hidden row

  // Values per cached position and layer: NKV·HD, or latent attention's kv_lora_rank + rope dims.
  int64_t cache_width() const;
  // The first `rows` rows of the final norm's output ln_, in fp32 host memory.
  const float* host_hidden(int64_t rows);

  void ensure(int64_t rows, int64_t B, int64_t table_entries, int64_t logit_rows);
  // One pass: B sequences of Tq new tokens each (rows[idx[i]] from offset `from`); the logits of each row's
  // last token go to logits_ at its offset when `last` is set, those of every token for an all_logits row.
  void run_pass(const std::vector<BatchRow>& rows, const std::vector<int>& idx, int from, int Tq, bool last);
  // The cache layers of one pass: per-layer views of the pools, the pass's positions and block tables.
  nn::KVLayer cache_layer(int layer, const int32_t* past_d, const int32_t* table_d, int64_t stride, int B, int Tq,
                          bool fresh) const;
  // Row b of a pass of B rows of Tq positions from `from`, into inputs_ (laid out as stage() sends it): checks its
  // positions, tokens and block ids and writes its tokens, positions (a tree node's: its depth's), cached length
  // and block table; returns its first position.
  int stage_row(int b, int B, int Tq, int64_t stride, int from, int past, const int32_t* tokens, const int32_t* depth,
                const int32_t* blocks, int n_blocks);
  // Stages a pass's [tokens N | positions N | cached lengths B | block table B·stride] on the backend.
  const int32_t* stage(const std::vector<int32_t>& host);
  // Module k over rows[idx] from offset `from`, Tq positions each (self_draft's pieces).
  void module_pass(int k, const std::vector<DraftRow>& rows, const std::vector<int>& idx, int from, int Tq, bool last);
};

}  // namespace kiln
