// The diffusion transformer (DiT, Peebles & Xie 2023) composed of kiln's modules (nn/attention.h, nn/ffn.h) on an
// nn::Backend, with adaLN-Zero conditioning (kernels/adaln.h):
//   patchify     image [B, C, H, W] -> tokens [B, T = (H/p)(W/p), C·p·p] (features in (c, i, j) order: the
//                layout of a Conv2d(C, D, p, stride p) weight), one linear to D, plus fixed 2-D sin-cos positions
//   condition    c = MLP(sinusoid(c_noise)) + table[y]     (sinusoid: 256 frequencies, cos then sin; MLP
//                Linear-SiLU-Linear; table: classes + 1 rows, the last the null class for classifier-free
//                guidance); then one product SiLU(c)·W_ada for every block's six vectors and the final two
//   block        h = x + gate1·Attn(modulate(LN(x), shift1, scale1))      non-causal attention; LN without
//                y = h + gate2·MLP(modulate(LN(h), shift2, scale2))       affine, eps 1e-6; MLP GELU (tanh)
//   final        out = Linear(modulate(LN(x), shift, scale)) -> [B, T, p·p·C_out] (features (i, j, c)), then
//                unpatchify to [B, C_out, H, W]
// The tensors carry the reference implementation's names (facebookresearch/DiT models.py), so a checkpoint
// maps one to one; the adaLN products of all blocks and the final layer sit back to back in the parameter block
// (weights, then biases), which makes them one matrix [(6·depth + 2)·D, D] read by a single product.
// Forward and backward sit side by side in dit.cpp.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/param_table.h"
#include "nn/attention.h"
#include "nn/backend.h"
#include "nn/ffn.h"
#include "nn/workspace.h"

namespace kiln {

struct DiTConfig {
  int image_size = 28;   // H = W
  int channels = 1;      // input channels; the output has the same
  int patch = 2;
  int hidden = 384;      // D
  int depth = 12;
  int heads = 6;
  int mlp_ratio = 4;
  int classes = 10;      // the embedding table has classes + 1 rows (the last: no class)
  int freq_dim = 256;    // sinusoidal frequencies of the noise level
  int grid() const { return image_size / patch; }
  int tokens() const { return grid() * grid(); }
  int patch_dim() const { return channels * patch * patch; }
  int mod_width() const { return (6 * depth + 2) * hidden; }  // the adaLN product's columns

  // DiT-S/2, DiT-S/4, DiT-B/2, DiT-B/4 (for 28×28 one-channel images unless changed after).
  static DiTConfig preset(const std::string& name);
  void validate() const;  // one-line errors naming the field
  std::string to_json() const;
  static DiTConfig from_json(const std::string& text, const std::string& where);
};

ParamTable dit_param_table(const DiTConfig& cfg);

// Host-side rearrangements (the reference's patchify by convolution and its unpatchify einsum).
void dit_patchify(float* tokens, const float* images, int B, const DiTConfig& cfg);      // [B,C,H,W] -> [B,T,C·p·p]
void dit_unpatchify(float* images, const float* tokens, int B, const DiTConfig& cfg);    // [B,T,p·p·C] -> [B,C,H,W]
void dit_patchify_out(float* tokens, const float* images, int B, const DiTConfig& cfg);  // inverse of unpatchify
void dit_unpatchify_in(float* images, const float* tokens, int B, const DiTConfig& cfg);  // inverse of patchify
// The fixed positions [T, D] and the noise-level frequencies [B, freq_dim].
std::vector<float> dit_pos_embed(const DiTConfig& cfg);
void dit_timestep_embedding(float* out, const float* t, int B, int dim);

class DiT {
 public:
  // be: the backend the model runs on: the CPU (fp32 activations; with a lowp backend the matrix products read a
  // 16-bit copy of the weights) or the GPU (bf16 activations and products); fp32 master weights and gradients.
  DiT(const DiTConfig& cfg, nn::Backend& be, bool with_grads = true);
  ~DiT();
  DiT(const DiT&) = delete;
  DiT& operator=(const DiT&) = delete;

  const DiTConfig& config() const { return cfg_; }
  const ParamTable& table() const { return table_; }
  nn::Backend& backend() { return be_; }
  float* params() { return params_.as<float>(); }  // on the backend (the host on the CPU)
  float* grads() { return grads_.as<float>(); }
  // The 16-bit copy of the parameters the products read when the backend has a lowp type (mixed precision;
  // null otherwise). Call params_changed() after writing params() other than through the optimizer.
  uint16_t* params16() { return params16_.as<uint16_t>(); }
  void params_changed();
  // DiT's initialisation: Xavier-uniform linears (the patch embedding as a matrix), zero biases, N(0, 0.02)
  // class table and noise MLP, zero adaLN products and output layer (adaLN-Zero: every block starts as identity).
  void init_random(uint64_t seed);
  void zero_grad();

  // Activation memory for batches of up to B images; recompute_blocks keeps only each block's input and reruns
  // the block's forward during the backward (gradients bit-identical). Returns bytes.
  size_t plan(int B, bool recompute_blocks = false);
  // out = D(x; c_noise, y) before any preconditioning: x [B, C, H, W], c_noise [B], labels [B] in [0, classes]
  // (classes: the null class), out [B, C, H, W]; all host arrays. Keeps what backward() needs.
  void forward(float* out, const float* x, const float* c_noise, const int32_t* labels, int B);
  // Accumulates the parameter gradients of <out, dout> for the last forward; dout [B, C, H, W] on the host. With
  // dx (host, [B, C, H, W]) also writes the input gradient (∂out/∂x)ᵀ·dout: the vector-Jacobian product.
  void backward(const float* dout, float* dx = nullptr);

 private:
  struct BlockActs {
    nn::Act ln1, m1, ln2, m2;
    float *mean1, *rstd1, *mean2, *rstd2, *u1, *h, *u2;
    nn::AttentionActivations attn;
    nn::FFNActivations ffn;
  };
  void carve(nn::Workspace& ws, int B);
  void bind();
  void block_forward(int l);
  AttentionParams attention(int B) const;
  bool recompute_ = false;
  bool shared_acts() const { return recompute_ || !with_grads_; }  // one BlockActs set for every block

  DiTConfig cfg_;
  nn::Backend& be_;
  ParamTable table_;
  bool with_grads_;
  nn::DeviceBlock params_, grads_, params16_;
  // Modules and weights bound to the block.
  nn::Weight x_emb_, t1_, t2_, ada_, final_;
  const float* ytable_ = nullptr;
  float* dytable_ = nullptr;
  std::vector<nn::Attention> attn_;
  std::vector<nn::FeedForward> ffn_;
  // Activations (carved from ws_ for the planned batch).
  nn::Workspace ws_;
  int planned_ = 0, B_ = 0;
  nn::Act patches_, tfreq_, t1a_, t1s_, cact_, sc_, mod_, lnf_, mf_, out_;
  float *pos_ = nullptr, *zeros_ = nullptr, *ones_ = nullptr, *zerosD_ = nullptr, *dummy_ = nullptr;
  float *yemb_ = nullptr, *c_ = nullptr, *meanf_ = nullptr, *rstdf_ = nullptr, *dcf_ = nullptr;
  int32_t *labels_ = nullptr, *zpos_ = nullptr;
  std::vector<float*> xs_;  // depth + 1 residual streams
  std::vector<BlockActs> acts_;
  // Backward scratch.
  float* dres_ = nullptr;
  nn::Act dop_, du_, dm_, dln_, dmod_, dsc_, dc_, dt1s_, dt1_, dout_, dpatches_;
  nn::AttentionScratch as_;
  nn::FFNScratch fs_;
  std::vector<float> host_tokens_;
};

}  // namespace kiln
