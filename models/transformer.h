// The decoder-only transformer every family composes (models/family.h): token embedding (+ learned positions),
// n_layer pre-norm blocks (nn/block.h), a final norm and the LM head (tied to the token embedding or its own
// matrix). One composition serves training (Transformer) and KV-cache decoding (TransformerDecoder); the
// modules run on an nn::Backend, so the same code serves each device: the CPU (ModelOptions::cuda false) or the
// GPU (the CUDA backend, or the SIMT emulator). Parameters, gradients, their 16-bit copy, the rotary
// frequencies, the KV cache and the activation workspace live on the backend; on a device backend a host
// mirror of the parameters serves checkpoints (host_params / params_changed / sync_to_host), integer inputs
// are uploaded per call, and losses and logits come back only where the interface returns them. On the CPU
// every such copy is a view of host memory (nn::Backend::from_host / to_host), so that path copies nothing.
//
// TransformerWeights binds the modules to a parameter block by canonical key (models/param_table.h), so a new
// family only names its tensors.
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "core/gpu.h"
#include "core/memory.h"
#include "models/model.h"
#include "models/narrow_weights.h"
#include "nn/block.h"
#include "nn/mtp.h"
#include "nn/workspace.h"

namespace kiln {

// The shapes of layer `layer`'s block under cfg.
nn::BlockShape block_shape(const ModelConfig& cfg, int layer);
// Shapes covering every layer (the dense and the MoE feed-forward both set where the model has both): what
// activations and scratch shared by several layers are allocated for.
nn::BlockShape block_shape_all(const ModelConfig& cfg);

struct TransformerWeights;

// The backend a model or decoder of cfg runs on: the CPU, or the GPU (initialised, and the model within its
// kernels' shape limits: one line naming the field otherwise).
std::unique_ptr<nn::Backend> make_backend_for(const ModelConfig& cfg, bool cuda, std::optional<LowpType> lowp);

// A decoder's weights on its backend, bound to the modules: the CPU reads the caller's host block in place (it
// must outlive the decoder); a device gets a copy and the 16-bit copy its products read. Also the rotary
// frequencies. With a narrow format f (--weights-dtype bf16/f16/q8_0) the matrices of NarrowWeights::matrices
// are converted; a device then holds only their narrow copies (neither their fp32 nor their bf16 form, nor the
// bf16 form of a token embedding whose head is narrow: the lookup reads fp32).
struct DecoderWeights {
  nn::DeviceBlock params, params16, inv_freq;
  NarrowWeights narrow;
  void load(nn::Backend& be, const ModelConfig& cfg, const ParamTable& t, const float* host, TransformerWeights& w,
            WeightFormat f = WeightFormat::F32);
};

// Where the tensor at a table offset lives: its parameters, gradient (null: none) and 16-bit copy (null: none).
struct TensorHome {
  const float* p = nullptr;
  float* g = nullptr;
  const uint16_t* p16 = nullptr;
};
using LocateTensor = std::function<TensorHome(size_t offset)>;

// The units of sharded storage (ShardOptions) as boundaries b[0..n_layer+2]: unit 0 the front [b0, b1) (the
// embeddings), unit 1 + l layer l, unit n_layer + 1 the back (MTP modules, final norm, untied head). Empty when
// the table's layers are not contiguous ranges in order.
std::vector<size_t> shard_unit_bounds(const ModelConfig& cfg, const ParamTable& t);

struct TransformerWeights {
  std::vector<nn::Block> blocks;
  nn::Norm final_norm;
  nn::Weight head;  // [V, C] (nn.Linear layout): the token embedding when tied
  const float* wte = nullptr;
  const float* wpe = nullptr;  // learned positions, or null
  float *dwte = nullptr, *dwpe = nullptr;
  std::vector<nn::MTPModule> mtp;  // the multi-token-prediction modules (cfg.mtp_depth)
  // params/grads: blocks in table layout (grads may be null); params16: the 16-bit copy (may be null);
  // inv_freq: the rotary frequencies on the backend's device.
  void bind(const ModelConfig& cfg, const ParamTable& table, const float* params, float* grads,
            const uint16_t* params16, const float* inv_freq);
  // The same, each tensor where `locate` puts it (sharded storage: the units' working buffers).
  void bind(const ModelConfig& cfg, const ParamTable& table, const LocateTensor& locate, const float* inv_freq);
};

class Transformer final : public Model {
 public:
  Transformer(const ModelConfig& cfg, const ModelOptions& opt);
  ~Transformer() override;

  const ModelConfig& config() const override { return cfg_; }
  const ParamTable& table() const override { return table_; }
  float* host_params() override;
  void params_changed() override;
  void sync_to_host() override;

  size_t plan(int B, int T, RecomputePolicy policy = {}, int lm_head_chunk = 0) override;
  // Activation bytes of a plan for N tokens; device: the GPU's (bf16 activations, device inputs, padded logits
  // rows, the ops' scratch).
  static size_t plan_bytes(const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int lm_head_chunk,
                           bool device = false);
  size_t activation_bytes() const override { return ws_.capacity(); }
  size_t state_bytes() const override;

  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, const AttentionParams& attn,
                 float grad_scale) override;
  void backward() override;
  void zero_grad() override;
  void synchronize() override;
  const float* logits() const override;
  std::vector<std::pair<std::string, double>> loss_parts() const override;
  const float* final_hidden() const override;
  float* final_hidden_grad() override;
  ParamBlocks blocks() override;
  void drop_host_params() override;
  std::vector<std::pair<size_t, size_t>> units() const override;
  void set_shard_exchange(ShardExchange* ex) override { ex_ = ex; }
  void idle_pass(bool train) override;
  std::vector<std::vector<float>> take_expert_load() override;
  void update_expert_bias(const std::vector<std::vector<float>>& load, float gamma) override;
  void set_seq_aux_alpha(float alpha) override { seq_aux_alpha_ = alpha; }

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  nn::DeviceBlock params_buf_, grads_buf_, params16_buf_, inv_freq_buf_;
  float* params_ = nullptr;        // on the backend
  float* grads_ = nullptr;
  uint16_t* params16_ = nullptr;   // 16-bit copies of the matrices (mixed precision), table layout
  Buffer host_buf_;                // the host mirror (device backends only)
  float* host_ = nullptr;          // host_params(): params_ itself on the CPU
  TransformerWeights w_;

  // Sharded storage (ShardOptions, models/transformer_shard.cpp). Units u = 0 (front), 1 + l (layer l),
  // L + 1 (back) live in working slots: 0 front, 1 back, 2 + l % 2 the layers.
  ShardOptions shard_;
  std::vector<size_t> unit_;            // unit boundaries (shard_unit_bounds)
  ShardExchange* ex_ = nullptr;
  nn::DeviceBlock pshard_buf_, gshard_buf_;  // the segment's parameters (stage 3) and summed gradients (2, 3)
  struct Slot {
    nn::DeviceBlock p, p16, g;          // parameters and 16-bit copy (stage 3), gradients
    size_t floats = 0;
    int holds = -1, fetching = -1;      // unit whose parameters are in p / being fetched into it
    int reducing = -1;                  // unit whose gradient in g is being reduced
  };
  Slot slots_[4];
  int slot_of(int unit) const;
  size_t unit_size(int u) const { return unit_[size_t(u) + 1] - unit_[size_t(u)]; }
  void shard_setup(const ModelOptions& opt);
  void shard_bind();
  // Stage 3: unit u's parameters in its slot (fetched, or waited for, and converted to 16 bits), then the fetch
  // of `next` (-1: none) started if its slot is free of u.
  void use_params(int u, int next);
  // A training forward's start: the front and back parameters (stage 3), their gradient buffers cleared; a
  // layer's backward: its gradient buffer free and cleared (grad_begin), then handed on (grad_end); the
  // backward's end: the front and back gradients handed on.
  void shard_forward_begin(bool train);
  void grad_begin(int u);
  void grad_end(int u);
  void shard_backward_end();
  // The backward's visits of the layers in order: (layer, false) recomputes its forward (every:K), (layer,
  // true) runs its backward.
  std::vector<std::pair<int, bool>> backward_visits() const;
  bool sharded() const { return shard_.stage >= 2; }
  // Expert load per MoE layer ([moe_layers_.size()][E] on the backend), counted in training forwards.
  std::vector<int> moe_layers_;
  nn::DeviceBlock load_buf_;
  bool counting_ = false;
  float seq_aux_alpha_ = 0;
  std::vector<int32_t> seq_starts_;  // the batch's sequences as token spans (the balance loss)
  double aux_sum_ = 0;               // the balance loss of the last forward

  struct Activations {
    RecomputePolicy policy{};
    int64_t max_tokens = 0, chunk = 0;           // chunk: LM head rows at a time
    int64_t logits_ld = 0;                       // row stride of the logits (a GPU pads it to 64 columns)
    float* encoded = nullptr;                    // [N, C] input of block 0
    std::vector<nn::BlockActivations> blocks;    // none/selective: one per layer; every:K: K (one segment)
    std::vector<float*> out;                     // none/selective: each layer's output; every:K: segment's
    std::vector<float*> ckpt_in;                 // every:K: input of each segment (ckpt_in[0] = encoded)
    float* final_out = nullptr;                  // [N, C] input of the final norm
    nn::Act lnf_out;                             // [N, C]
    float *lnf_mean = nullptr, *lnf_rstd = nullptr;
    nn::Act dlnf;                                // [N, C]
    nn::Act logits;                              // [chunk, logits_ld]
    float* losses = nullptr;                     // [N]
    float* dres = nullptr;                       // [N, C] gradient of the residual stream
    nn::BlockScratch scratch;
    std::vector<nn::MTPActivations> mtp;         // one per MTP module
    nn::MTPScratch mtp_scratch;
    int32_t *mtp_tokens = nullptr, *mtp_targets = nullptr;  // [depth][N] on the backend (device backends)
    // Device backends: the integer inputs' copies ([N] each; cu_seqlens [N + 1]).
    int32_t *tokens = nullptr, *pos = nullptr, *targets = nullptr, *cu_seqlens = nullptr;
    void allocate(nn::Workspace& ws, const ModelConfig& cfg, int64_t N, RecomputePolicy policy, int64_t chunk,
                  bool device);
  };
  nn::Workspace ws_;
  Activations a_;
  int64_t last_N_ = 0;
  AttentionParams last_attn_{};
  const int32_t *last_tokens_ = nullptr, *last_pos_ = nullptr;  // on the backend
  std::vector<float> losses_host_;             // device backends: the losses brought back
  mutable std::vector<uint16_t> logits16_;     // device backends: logits() brought back ...
  mutable std::vector<float> logits_host_;     // ... and widened

  // Multi-token prediction (models/transformer_mtp.cpp).
  float mtp_lambda_ = 0.3f;
  bool mtp_ran_ = false;
  double last_main_ = 0, last_mtp_ = 0;
  std::vector<int32_t> mtp_host_;  // [depth][2][N]: each depth's shifted tokens and targets
  std::vector<const int32_t*> mtp_tokens_;  // each depth's tokens on the backend
  void mtp_forward(const int32_t* host_targets, const AttentionParams& attn, float grad_scale, int64_t N,
                   double* sum);
  void mtp_backward();

  void run_blocks_forward(const AttentionParams& attn, int64_t N);
  // After block `layer`'s forward (not its recomputation): its expert load and balance loss.
  void count_load(int layer, const nn::BlockActivations& a);
  // The shared head over N rows of x (the final norm's output) with their loss; its gradient into dx.
  void lm_head(const int32_t* targets, float grad_scale, int64_t N, double* loss_sum, nn::Act x, nn::Act dx);
};

// The ops' scratch of a training plan for N tokens (nn::OpScratch).
nn::OpScratch training_scratch(const ModelConfig& cfg, int64_t N);

class TransformerDecoder : public IncrementalDecoder {
 public:
  // cuda: on the GPU backend (params copied to the device), else the CPU (params read in place). cuda_graph (GPU
  // only): the single-token step is captured once in a CUDA graph and replayed; its inputs are copied from
  // page-locked staging inside the graph and every kernel reads them (positions, cache lengths) from device
  // memory, so one launch per token replaces the step's ~10 launches per layer.
  // weights: the matrices converted once to this format, which the products then read (DecoderOptions::weights).
  TransformerDecoder(const ModelConfig& cfg, const float* params, int batch, int max_positions, bool cuda = false,
                     bool cuda_graph = false, WeightFormat weights = WeightFormat::F32);
  ~TransformerDecoder() override;
  TransformerDecoder(const TransformerDecoder&) = delete;
  TransformerDecoder& operator=(const TransformerDecoder&) = delete;

  const float* forward(const int32_t* tokens, int n, bool all_logits = false) override;
  // Greedy decoding's step: the arg max is taken on the backend, only the ids come back.
  const int32_t* forward_argmax(const int32_t* tokens, int n, int vocab_limit) override;
  int length() const override { return length_; }
  int max_positions() const override { return max_pos_; }
  int batch() const override { return batch_; }
  void reset() override {
    length_ = 0;
    mtp_forget(0);
  }
  void truncate(int length) override;  // entries past length are overwritten by the next forward
  const float* hidden() const override;
  const float* forward_tree(const int32_t* tokens, int n, const int32_t* depth, const uint64_t* tree) override;
  void keep_path(int base, const int32_t* nodes, int m) override;
  const ModelConfig& config() const override { return cfg_; }
  size_t cache_bytes() const override { return k_.size() + v_.size(); }
  // Multi-token prediction as a draft (models/transformer_mtp.cpp; batch 1): module k at position i reads the
  // previous depth's hidden state h^{k-1}_i (h^0: the main model's last block output) and the embedding of token
  // i+k, and guesses token i+k+1, attending over its own KV cache, as the modules were trained. Module k's
  // input at the last cached positions includes drafts 1 .. k−1 of the round: those entries are recomputed
  // when a later round finds other tokens there (a rejection), and so is every entry past a position whose
  // input hidden state changed (the main model or module k−1 ran it again).
  int self_draft_depth() const override { return batch_ == 1 ? cfg_.mtp_depth : 0; }
  const float* self_draft(int k, int32_t token) override;

  // Latent attention: decode in the absorbed-weights form (the default) or the plain one (the cache expanded
  // through kv_b every step; host backends).
  void set_latent_absorbed(bool absorbed);

  // Tokens per forward() call are run in chunks of at most this many positions (bounds activation memory).
  static constexpr int kMaxChunk = 256;
  // What the decoder holds of the weights (on a device: its memory).
  const DecoderWeights& weights() const { return weights_; }

 private:
  ModelConfig cfg_;
  ParamTable table_;
  std::unique_ptr<nn::Backend> be_;
  DecoderWeights weights_;
  TransformerWeights w_;
  int batch_, max_pos_;
  int length_ = 0;
  nn::DeviceBlock k_, v_;  // [layer][batch][position][NKV·HD] in the activation type; MLA: k_ only, [.][r + rope]
  bool absorbed_ = true;
  const uint64_t* tree_ = nullptr;  // forward_tree's masks while its layers run (the backend's memory)
  nn::DeviceBlock tree_d_;          // a device decoder's copy of them (64 masks)
  int hidden_rows_ = 0;             // rows of ln_ that the last forward left (hidden())
  mutable std::vector<uint16_t> hidden16_;  // a device decoder's hidden(): the bf16 rows, then widened
  mutable std::vector<float> hidden_host_;
  // The MTP draft (batch 1): each module's one-layer KV cache ([depth][positions][width]), the hidden states
  // each depth reads ([depth][positions][C], fp32: depth 0 the main model's, depth k module k's output), the
  // token each module entry read, the tokens of the main cache, and what is still valid.
  nn::DeviceBlock mtp_k_, mtp_v_, mtp_hist_;
  nn::MTPActivations mtp_a_;
  float* mtp_zeros_ = nullptr;
  std::vector<std::vector<int32_t>> mtp_used_;  // [depth][position]
  std::vector<int32_t> tok_hist_;               // [position] the main cache's tokens
  std::vector<int> mtp_len_;                    // [depth] module entries computed (valid ones: a prefix)
  std::vector<int> mtp_dirty_;                  // [depth] first position whose input hidden state changed since
  int hidden_len_ = 0;                          // positions whose main hidden state is in mtp_hist_
  std::vector<int32_t> round_in_;               // this round's module inputs past the cache: next, drafts 1 ..
  int round_len_ = -1;                          // the cache length the round started at
  void note_forward(const int32_t* tokens, int start, int n);  // after a plain chunk at positions start ..
  void mtp_forget(int length);                  // the cache rolls back (or a tree) to `length` positions
  void mtp_run(int k, int start, int end);      // module k over positions [start, end)

  nn::DeviceBlock expand_;  // the plain latent form's expansion buffers (nn::KVLayer)
  int64_t cache_width() const;  // floats per position and layer in k_

  int64_t rows_ = 0;  // activations for up to rows_ = batch·chunk rows, grown on demand
  nn::Workspace ws_;
  nn::BlockActivations a_;
  nn::BlockScratch s_;
  float *x_ = nullptr, *last_ = nullptr, *mean_ = nullptr, *rstd_ = nullptr;
  float* logits_d_ = nullptr;   // [B, V] the last positions' logits
  int32_t* inputs_d_ = nullptr; // [2·rows_ + B]: tokens, positions, cached lengths of a chunk (device backends)
  int32_t* argmax_d_ = nullptr; // [B]
  nn::Act ln_;
  nn::DeviceBlock all_d_;       // [B·chunk, V] every position's logits (all_logits), grown on demand
  std::vector<int32_t> inputs_, argmax_;
  std::vector<float> logits_;   // host: [B, n, V] (all_logits) or, on a device backend, [B, V]

  // The captured step, one per output kind (logits, or the arg max below `limit`), with the workspace it was
  // captured on (a grown workspace moves every buffer: capture again).
  struct StepGraph {
    gpu::Graph graph;
    int eager_runs = 0, limit = 0;
    int64_t epoch = -1;
  };
  bool use_graph_ = false;
  StepGraph graphs_[2];
  int64_t ws_epoch_ = 0;
  int32_t* inputs_h_ = nullptr;  // page-locked [3·B] inputs of a step
  float* logits_h_ = nullptr;    // page-locked [B, V]
  int32_t* argmax_h_ = nullptr;  // page-locked [B]

  void ensure_rows(int64_t rows);
  // [tokens N | positions N | cached lengths B] of n new positions per sequence, validated, into dst.
  void stage_inputs(int32_t* dst, const int32_t* tokens, int n, int64_t tok_stride) const;
  // Embedding and every block over n positions per sequence (inputs on the backend); length_ unchanged.
  void run_layers(const int32_t* tok, const int32_t* pos, const int32_t* past, int n);
  void run_chunk(const int32_t* tokens, int n, int64_t tok_stride);
  // A single-token step through the captured graph; false when this step is not one (or runs eagerly first).
  bool graph_step(const int32_t* tokens, int n, bool argmax, int limit);
  // Runs n positions per sequence; with all_logits their logits gather into logits_ ([B, n, V]).
  void advance(const int32_t* tokens, int n, bool all_logits);
  // The last position's logits of each sequence into logits_d_.
  void last_logits(int m);
  void lm_head(const float* hidden, int64_t rows, float* logits);
};

}  // namespace kiln
