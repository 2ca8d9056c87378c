// GPT-2 on the GPU (the CUDA backend, or the SIMT emulator in tests): bf16 matrix products and attention
// with fp32 accumulation, an fp32 residual stream, fp32 master weights, gradients and AdamW moments, and a bf16
// copy of the weights that the matrix products read (refreshed by the fused AdamW kernel).
//
// Per layer the forward keeps (N tokens, C channels): the block input x (fp32), ln1 (bf16) with its mean and
// rstd, qkv (bf16), the attention output (bf16) and its log-sum-exp, the mid-block residual (fp32), ln2, the
// MLP pre-activation and GELU output (bf16). The logits are bf16 with a vocabulary stride padded to 64
// columns, overwritten by their gradient when the loss is computed. Everything lives in one device arena
// sized before the first step (measure, then allocate), so a training step allocates nothing.
//
// The parameter block has the CPU model's layout (ParamTable), so weights and optimizer state move between
// the GPU and the host checkpoint code with one copy each.
#pragma once
#include <cstdint>
#include <vector>

#include "core/gpu.h"
#include "kernels/attention.h"
#include "models/config.h"
#include "models/gpt2_params.h"
#include "models/model.h"

namespace kiln {

class GPT2Cuda {
 public:
  // Allocates parameters (fp32 + bf16 copy) and gradients on the current device (the optimizer, applied from
  // outside through blocks(), owns the moments).
  GPT2Cuda(const GPT2Config& cfg, const ParamTable& table);

  const GPT2Config& config() const { return cfg_; }
  // Host <-> device copies of the whole block in ParamTable layout.
  void upload_params(const float* host);
  void download_params(float* host) const;
  void download_grads(float* host) const;
  // The device blocks for the optimizer (backend: the GPU's).
  ParamBlocks blocks(nn::Backend* be) { return {params_.as<float>(), grads_.as<float>(), params16_.as<uint16_t>(), table_.total, be}; }

  // Sizes the activation arena for micro-batches of up to max_tokens tokens; returns its bytes. With
  // recompute_blocks (--recompute block) only each block's input is kept: the backward re-runs one block's
  // forward at a time into a single set of block activations, trading a second forward for about L times less
  // activation memory.
  size_t plan(int64_t max_tokens, bool recompute_blocks = false);
  // The same plan's bytes, and the model state's (fp32 weights, bf16 copy, fp32 gradients and moments),
  // without a device (kiln memory --device cuda).
  static size_t plan_bytes(const GPT2Config& cfg, int64_t max_tokens, bool recompute_blocks = false);
  // Weights, bf16 copy, gradients and the two AdamW moments the optimizer allocates beside them.
  static size_t state_bytes(const ParamTable& table) { return table.total * (4 + 2 + 4 + 4 + 4); }
  size_t activation_bytes() const { return arena_.capacity(); }
  size_t state_bytes() const { return state_bytes(table_); }

  // Forward over N tokens (host arrays; attn as for the CPU model, cu_seqlens on the host). Returns the sum of
  // the per-token losses over non-ignored targets. With grad_scale != 0 the logits are replaced by their
  // gradient (softmax - onehot)·grad_scale, ready for backward().
  double forward(const int32_t* tokens, const int32_t* pos, const int32_t* targets, int64_t N,
                 const AttentionParams& attn, float grad_scale);
  // Accumulates (+=) the parameter gradients of the last forward.
  void backward();
  void zero_grad();

 private:
  struct Layer {
    uint16_t *ln1, *qkv, *att, *ln2, *fc_pre, *fc_gelu;
    float *ln1_mean, *ln1_rstd, *lse, *mid, *ln2_mean, *ln2_rstd;
  };
  struct Acts {
    float* x = nullptr;  // [L+1][N][C] residual stream: x[l] is block l's input, x[L] the final one
    std::vector<Layer> layers;
    uint16_t* lnf = nullptr;
    float *lnf_mean = nullptr, *lnf_rstd = nullptr;
    uint16_t* logits = nullptr;  // [N][Vp]
    float* losses = nullptr;     // [N]
    // Backward scratch (shared by all layers).
    float* dres = nullptr;       // [N][C] gradient of the residual stream
    uint16_t* dres16 = nullptr;  // its bf16 copy, the matrix products' operand
    uint16_t *d_big = nullptr, *d_qkv = nullptr, *d_c = nullptr;  // [N][4C], [N][3C], [N][C]
    float* ln_scratch = nullptr;
    void* emb_scratch = nullptr;
    void* att_scratch = nullptr;
    int32_t *tokens = nullptr, *targets = nullptr, *pos = nullptr, *cu_seqlens = nullptr;
  };
  static void carve(const GPT2Config& cfg, int64_t Vp, gpu::DeviceArena& arena, int64_t N, bool recompute, Acts& a);
  // Block l's forward from its input a_.x[l] into its activations; with write_output also x[l+1] (the
  // recomputation in the backward skips that last product, whose result the backward never reads).
  void block_forward(int l, bool write_output);
  template <class T>
  T* at16(const float* p, T* base16) const;  // the bf16 copy of parameter p

  GPT2Config cfg_;
  const ParamTable& table_;
  static int64_t padded_vocab(const GPT2Config& cfg) { return (int64_t(cfg.vocab_size) + 63) / 64 * 64; }
  int64_t Vp_ = 0;  // padded vocabulary stride of the logits
  gpu::DeviceBuffer params_, params16_, grads_;
  GPT2Params p_, g_;
  gpu::DeviceArena arena_;
  Acts a_;
  int64_t max_tokens_ = 0;
  bool recompute_ = false;
  // The last forward's shape, for backward().
  int64_t N_ = 0;
  AttentionParams ap_;
};

}  // namespace kiln
