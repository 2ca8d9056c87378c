// What train/, infer/ and tools/ see of a model: a language model made by a factory from its ModelConfig, on a
// device, for training (forward, backward, parameter blocks for the optimizer) or for KV-cache decoding. They
// never name a family or an implementation.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/matmul_lowp.h"
#include "kernels/narrow_gemv.h"
#include "models/model_config.h"
#include "models/param_table.h"
#include "models/recompute.h"
#include "nn/backend.h"

namespace kiln {

// ZeRO stages 2 and 3 (train/data_parallel.h): the model keeps gradients (stage 2) and also parameters (stage 3)
// for one segment [begin, end) of the block only. The block is cut into units, contiguous ranges in table order
// (Model::units()): the front (embeddings), each layer, the back (MTP modules, final norm, untied head). A unit's
// gradient is produced in a working buffer and handed to the ShardExchange as soon as it is complete; at stage
// 3 each unit's parameters are fetched into a working buffer before use (the layers into two alternating ones,
// so the next layer's fetch runs while the current one computes). Stage < 2: one whole block of each.
struct ShardOptions {
  int stage = 0;
  size_t begin = 0, end = 0;
};

// What a sharded model asks of data parallelism. Every rank makes the same calls in the same order (a rank
// without tokens runs Model::idle_pass), so an implementation may run collectives in them. fetch and reduce
// may return before the work is done (a communication thread); wait_* block until it is.
class ShardExchange {
 public:
  virtual ~ShardExchange() = default;
  // Stage 3: fill dst (the unit's floats, in table order) with unit u's parameters.
  virtual void fetch(int unit, float* dst) = 0;
  virtual void wait_fetch(int unit) = 0;
  // src holds this rank's gradient of unit u: sum it over the ranks into the owners' shards (src is scratch
  // afterwards, and reusable once wait_reduce returns).
  virtual void reduce(int unit, float* src) = 0;
  virtual void wait_reduce(int unit) = 0;
};

struct ModelOptions {
  bool cuda = false;                 // the GPU backend (else the CPU)
  std::optional<LowpType> lowp;      // 16-bit matrix products (mixed precision), fp32 when unset
  bool with_grads = true;
  float mtp_lambda = 0.3f;           // weight of the multi-token-prediction losses (models with MTP modules)
  ShardOptions shard;                // ZeRO 2, 3: this rank's segment of the state
};

// The flat blocks the optimizer works on (ParamTable layout), on the model's device: floats [offset, offset + n)
// of the block (offset 0 and n the whole block, except in a sharded model: its segment, ShardOptions).
struct ParamBlocks {
  float* params = nullptr;
  float* grads = nullptr;
  uint16_t* params16 = nullptr;  // the 16-bit copy the products read (null without one, or at stage 3)
  size_t n = 0;
  nn::Backend* backend = nullptr;
  size_t offset = 0;
};

class Model {
 public:
  virtual ~Model() = default;
  virtual const ModelConfig& config() const = 0;
  virtual const ParamTable& table() const = 0;

  // The host copy of the parameters (what checkpoints read and write). After changing it, call
  // params_changed(); before reading it after training steps on a device, call sync_to_host().
  // Stage 3 (ShardOptions): a whole-block host copy made on demand; params_changed() takes this rank's segment
  // from it and frees it, sync_to_host() fills only that segment (data parallelism gathers the others), and
  // drop_host_params() frees it unread.
  virtual float* host_params() = 0;
  virtual void params_changed() = 0;
  virtual void sync_to_host() = 0;
  virtual void drop_host_params() {}
  // Random initialisation in the GPT-2 scheme (N(0, 0.02), residual projections N(0, 0.02/sqrt(2·n_layer)),
  // biases 0, norm gains 1), deterministic for a seed whatever the thread count; then params_changed().
  void init_random(uint64_t seed);

  // Sizes the activation memory for batches of up to B·T tokens under a recomputation policy; lm_head_chunk:
  // rows of logits held at once (0: all, 64 with recomputation). Returns bytes.
  virtual size_t plan(int B, int T, RecomputePolicy policy = {}, int lm_head_chunk = 0) = 0;
  virtual size_t activation_bytes() const = 0;
  // Model state on the device (weights, 16-bit copy, gradients), for the memory report.
  virtual size_t state_bytes() const = 0;

  // Forward over N tokens (host arrays; attn says how they form sequences). Returns the sum of per-token losses
  // over non-ignored targets (targets null or negative: none). With grad_scale != 0 (training) the LM head's
  // backward runs here as each chunk's loss gradient exists, and backward() continues from the final norm.
  virtual double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets,
                         const AttentionParams& attn, float grad_scale) = 0;
  virtual void backward() = 0;
  virtual void zero_grad() = 0;
  // Waits for the device's queued work (timing).
  virtual void synchronize() {}
  // Logits of the last forward [N, V] on the host, when it ran without gradients and held all rows.
  virtual const float* logits() const = 0;
  // The loss terms of the last forward with targets, as sums like forward()'s (e.g. main_loss, and mtp_loss: the
  // MTP depths' mean); empty when the loss has one term.
  virtual std::vector<std::pair<std::string, double>> loss_parts() const { return {}; }
  // Extra heads on the last hidden state (Medusa, nn/medusa.h) read the final norm's output of the last
  // forward, [N, C] fp32 on the host; joint training adds their dL/dh to final_hidden_grad() [N, C] between
  // forward() (which writes the LM head's share there) and backward(). Host backends only: others throw.
  virtual const float* final_hidden() const;
  virtual float* final_hidden_grad();

  virtual ParamBlocks blocks() = 0;

  // Sharded storage (ShardOptions): the units' float ranges [begin, end), in table order, covering the block
  // (empty: the model cannot shard), the exchange its forwards and backwards call, and the calls of a training
  // forward and backward (train) or of a forward alone, without computing, for a rank whose share of a batch
  // is empty.
  virtual std::vector<std::pair<size_t, size_t>> units() const { return {}; }
  virtual void set_shard_exchange(ShardExchange* ex) {}
  virtual void idle_pass(bool train) {}

  // Mixture of experts (a model without MoE layers returns nothing and ignores the rest).
  // The routed rows each expert received in each MoE layer, [MoE layers][experts], over the training forwards
  // (grad_scale != 0) since the last call; the counts restart.
  virtual std::vector<std::vector<float>> take_expert_load() { return {}; }
  // Auxiliary-loss-free balancing, after an optimizer step: each MoE layer's selection bias moves by
  // b_i += gamma · sign(mean load − load_i) for that layer's load (as take_expert_load returned it).
  virtual void update_expert_bias(const std::vector<std::vector<float>>& load, float gamma) {}
  // The complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20) with weight alpha (0: off): training
  // forwards then add alpha · Σ_sequences T_s · Σ_i f_i·P_i per MoE layer to the returned loss sum (so the mean
  // over targets carries alpha · L_Bal per sequence) and its gradient to the routers.
  virtual void set_seq_aux_alpha(float alpha) {}
  // Attention parameters of this model for B rows of T (add cu_seqlens for packed sequences).
  AttentionParams attention(int B, int T) const;

  // Called by backward() as each layer's gradients (the "blk.N." tensors) are complete, layers n_layer-1 .. 0,
  // on the thread running backward (on a device: once the layer's kernels are queued). The other tensors
  // (embeddings, final norm, untied head) are complete when backward() returns. Data parallelism uses it to
  // start reducing gradients during the backward (train/data_parallel.h).
  void set_layer_grads_hook(std::function<void(int layer)> hook) { layer_grads_hook_ = std::move(hook); }

 protected:
  void layer_grads_done(int layer) {
    if (layer_grads_hook_) layer_grads_hook_(layer);
  }

 private:
  std::function<void(int)> layer_grads_hook_;
};

std::unique_ptr<Model> make_model(const ModelConfig& cfg, const ModelOptions& opt = {});

// The attention parameters of a config for B rows of T tokens (causal; cu_seqlens unset).
AttentionParams attention_params(const ModelConfig& c, int B, int T);

// The memory a training step of up to N tokens plans, without building the model: model state (weights,
// gradients, 16-bit copies where used; on the GPU also the AdamW moments) and activations, in bytes.
struct MemoryPlan {
  size_t state = 0, activations = 0;
};
MemoryPlan plan_memory(const ModelConfig& cfg, bool cuda, int64_t N, RecomputePolicy policy, int lm_head_chunk);
// The working buffers a sharded model (ShardOptions) allocates beside its segment, in bytes: at stage 2 and 3
// gradient buffers for the front, the back and two layers; at stage 3 also parameter buffers for them (and
// their 16-bit copies with lowp).
size_t shard_buffer_bytes(const ModelConfig& cfg, int stage, bool lowp);

// A model with a KV cache: the generation loop's view (infer/generate.h).
class IncrementalDecoder {
 public:
  virtual ~IncrementalDecoder() = default;
  // tokens: [batch, n] row-major, each in [0, vocab_size). Runs them at positions length() .. length()+n-1.
  // Returns the logits [batch, V] of each sequence's last new token (host memory), or with all_logits
  // [batch, n, V]. Throws kiln::Error if a token is out of range or the cache would overflow max_positions.
  virtual const float* forward(const int32_t* tokens, int n, bool all_logits = false) = 0;
  // forward() for greedy decoding: the arg max (infer/sampler.h's rule) of each sequence's last logits over
  // ids [0, vocab_limit), [batch]. This default takes it from the logits; a device decoder may compute it there
  // and copy back only the ids.
  virtual const int32_t* forward_argmax(const int32_t* tokens, int n, int vocab_limit);
  virtual int length() const = 0;  // positions in the cache
  virtual int max_positions() const = 0;
  virtual int batch() const = 0;
  virtual void reset() = 0;  // forget the cache (its memory is kept)
  // Keeps the first `length` positions of the cache (0 <= length <= length()) and forgets the rest, so the next
  // forward() continues from there (speculative decoding rolls back rejected tokens). Throws kiln::Error here:
  // a decoder that can roll back overrides it.
  virtual void truncate(int length);
  // Medusa (infer/medusa.h); batch 1, on the CPU and GPU decoders. These defaults throw: a decoder that can
  // overrides them.
  // The final norm's output [rows, C] (host memory, fp32; a GPU decoder's bf16 rows widened) of the last forward: every position with all_logits (the last chunk of
  // TransformerDecoder::kMaxChunk), else the last position; and of every node after forward_tree.
  virtual const float* hidden() const;
  // A candidate tree in one pass (tree attention, kernels/decode_attention.h): n <= 64 nodes, node i at position
  // length() + depth[i], seeing the cache and the nodes whose bits tree[i] sets (its ancestors and itself; a
  // parent comes before its children). Their keys go to cache slots length() .. length()+n-1 and length() grows
  // by n. Returns every node's logits [n, V].
  virtual const float* forward_tree(const int32_t* tokens, int n, const int32_t* depth, const uint64_t* tree);
  // After forward_tree from a cache of `base` positions: keeps the m nodes nodes[0] < nodes[1] < ... (an accepted
  // path), moving their cache entries to slots base .. base+m-1; length() becomes base + m.
  virtual void keep_path(int base, const int32_t* nodes, int m);
  virtual const ModelConfig& config() const = 0;
  virtual size_t cache_bytes() const = 0;
  // Self-drafting (multi-token-prediction modules, infer/mtp_decode.h; batch 1): the number of modules, 0 for a
  // model without them.
  virtual int self_draft_depth() const { return 0; }
  // Draft k of a round (1 <= k <= self_draft_depth()): module k's guess [V] (logits) of token length() + k, the
  // cache holding tokens 0 .. length()−1. `token` is module k's own input: for k = 1 token length() (the next
  // input, already chosen), for k > 1 draft k−1 (drawn from the previous call's guess). Drafts 1 .. k−1 of the
  // same round come first. A round may follow any forward() and truncate(): each module first catches up over
  // the cached positions it has not seen or saw with other tokens (a rejected draft). Throws kiln::Error here:
  // a decoder with MTP modules overrides it.
  virtual const float* self_draft(int k, int32_t token);

 private:
  std::vector<int32_t> argmax_;
};

struct DecoderOptions {
  bool cuda = false;
  int batch = 1;
  int max_positions = 0;   // 0: the model's
  bool cuda_graph = true;  // GPU: capture the single-token step once and replay it
  // The matrices' format for the products (kernels/narrow_gemv.h). GPU: f16 and q8_0 go through cuda::narrow_gemm
  // on the device's narrow copy; f32 and bf16 both mean its bf16 tensor-core products.
  WeightFormat weights = WeightFormat::F32;
};

// A decoder over a host parameter block in cfg's ParamTable layout. The CPU decoder reads it in place (it
// must outlive the decoder); the GPU decoder copies it to the device (bf16 KV cache and activations).
std::unique_ptr<IncrementalDecoder> make_decoder(const ModelConfig& cfg, const float* params,
                                                 const DecoderOptions& opt = {});

// A decoder for continuous batching: every sequence has its own length, and its KV cache lives in blocks of a
// shared pool (a paged cache) named by the caller's block table, so sequences join and leave between calls and
// full blocks of a common prompt prefix can be shared. One forward() runs a new piece of every row given: the
// single-token rows together (the weights are read once for all of them), a longer piece (a prefill chunk) as
// its own pass in the same call.
struct BatchRow {
  const int32_t* tokens = nullptr;  // n new tokens at positions past .. past + n - 1
  int n = 0;
  int past = 0;                     // positions already in the sequence's blocks
  const int32_t* blocks = nullptr;  // the sequence's block ids, covering positions [0, past + n)
  int n_blocks = 0;
  bool all_logits = false;          // the logits of every new token, not only the last (speculative checks)
  // Tree attention (Medusa's candidate trees, kernels/decode_attention.h): the n tokens are tree nodes, node i
  // at position past + depth[i] seeing the cache and the new nodes of mask tree[i]; its key goes to slot past + i.
  // Needs all_logits.
  const int32_t* depth = nullptr;
  const uint64_t* tree = nullptr;
};

// A row of a multi-token-prediction module's pass (BatchDecoder::self_draft): module k at positions past ..
// past + n − 1 of a sequence, position i reading the previous depth's hidden state at i (the main model's
// stream for k = 1, module k−1's output after it) and the embedding of token i + k.
struct DraftRow {
  const int32_t* tokens = nullptr;  // [n] the token each position reads (i + k)
  const float* hidden = nullptr;    // [n, C] host fp32: the previous depth's hidden states at those positions
  int n = 0;
  int past = 0;                     // the module's cached positions before these
  const int32_t* blocks = nullptr;  // the sequence's block ids (the target's), covering [0, past + n)
  int n_blocks = 0;
};

class BatchDecoder {
 public:
  virtual ~BatchDecoder() = default;
  // The logits of each row's last new token (or of its n new tokens with all_logits), [V] each, in the order of
  // `rows`, rows one after another (host memory, valid until the next call). Throws kiln::Error for a token out of range, a block id outside the pool, or too few blocks.
  virtual const float* forward(const std::vector<BatchRow>& rows) = 0;
  virtual int block_size() const = 0;
  virtual int num_blocks() const = 0;
  virtual int max_positions() const = 0;  // per sequence
  virtual const ModelConfig& config() const = 0;
  virtual size_t cache_bytes() const = 0;
  // With BatchDecoderOptions::keep_hidden (host backends): the final norm's output [C] behind each logits row of
  // the last forward(), in the same layout (Medusa heads read it). Throws kiln::Error otherwise.
  virtual const float* hidden() const;
  // After a tree row: keeps m of its nodes (nodes[i] >= i, increasing), node nodes[i]'s cache entry moving to
  // slot base + i in the sequence's blocks (the accepted path, compacted in place; the caller's length is then
  // base + m). Throws kiln::Error where the decoder has no tree attention.
  virtual void keep_path(const int32_t* blocks, int n_blocks, int base, const int32_t* nodes, int m);
  // With BatchDecoderOptions::keep_stream: the stream after the last layer (before the final norm) of every new
  // token of the last forward(), [Σ n, C] host fp32, rows in the order of `rows` (MTP module 1's input). Throws
  // kiln::Error otherwise.
  virtual const float* stream() const;
  // Self-drafting (serve/engine.h): the model's multi-token-prediction modules, each with its own layer of the
  // paged cache (the same block ids), when BatchDecoderOptions::self_draft is set; 0 otherwise.
  virtual int self_draft_depth() const { return 0; }
  // Module k (1 <= k <= self_draft_depth()) over each row: returns the logits [V] of each row's last position
  // (module k's guess of the token k + 1 after it), rows in order; draft_hidden() then holds the module's output
  // [Σ n, C] (module k + 1's input). Throws kiln::Error here: a decoder with the modules overrides it.
  virtual const float* self_draft(int k, const std::vector<DraftRow>& rows);
  virtual const float* draft_hidden() const;
};

struct BatchDecoderOptions {
  bool cuda = false;
  int block_size = 64;     // positions per KV block (the GPU kernels need a multiple of 64)
  int num_blocks = 0;      // blocks in the pool; 0: enough for 8 sequences of max_positions
  int max_positions = 0;   // 0: the model's
  // The matrices' format for the products (kernels/narrow_gemv.h), as DecoderOptions::weights. CPU: a step of up
  // to kNarrowDirectRows sequences reads the format directly, each row as a single-sequence step computes it.
  WeightFormat weights = WeightFormat::F32;
  bool keep_hidden = false;  // keep the final norm's output of every logits row (BatchDecoder::hidden)
  bool keep_stream = false;  // keep the stream of every new token (BatchDecoder::stream; host backends)
  bool self_draft = false;   // cache layers for the model's MTP modules (BatchDecoder::self_draft; host backends)
};

// Over a host parameter block in cfg's ParamTable layout (read in place on the CPU, copied to a device).
std::unique_ptr<BatchDecoder> make_batch_decoder(const ModelConfig& cfg, const float* params,
                                                 const BatchDecoderOptions& opt = {});

}  // namespace kiln
