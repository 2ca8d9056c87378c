#include "nn/block.h"

#include "core/memory.h"
#include "kernels/activation.h"

namespace kiln::nn {

namespace {
// The CPU FlashAttention kernel works on 16-float vectors (GPT-2 and Llama heads are 64 or 128 wide);
// other head sizes take the naive kernel, which is exact but holds the T×T scores.
void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& ap) {
  if (ap.HD % 16 == 0)
    cpu::attention_forward(out, lse, qkv, ap);
  else
    ref::attention_forward(out, lse, qkv, ap);
}
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& ap) {
  if (ap.HD % 16 == 0)
    cpu::attention_backward(dqkv, dout, qkv, out, lse, ap);
  else
    ref::attention_backward(dqkv, dout, qkv, out, lse, ap);
}
}  // namespace

void BlockActivations::allocate(Arena& arena, int64_t N, int C, int NH, bool selective) {
  ln1 = selective ? nullptr : arena.alloc(N * C);
  ln1_mean = arena.alloc(N);
  ln1_rstd = arena.alloc(N);
  qkv = arena.alloc(N * 3 * C);
  atty = arena.alloc(N * C);
  lse = arena.alloc(int64_t(NH) * N);
  h = arena.alloc(N * C);
  ln2 = selective ? nullptr : arena.alloc(N * C);
  ln2_mean = arena.alloc(N);
  ln2_rstd = arena.alloc(N);
  fc = arena.alloc(N * 4 * C);
  fc_gelu = selective ? nullptr : arena.alloc(N * 4 * C);
}

void BlockScratch::allocate(Arena& arena, int64_t N, int C, bool selective) {
  d_ln = arena.alloc(N * C);
  d_atty = arena.alloc(N * C);
  d_qkv = arena.alloc(N * 3 * C);
  d_fc = arena.alloc(N * 4 * C);
  if (selective) {
    ln_tmp = arena.alloc(N * C);
    gelu_tmp = arena.alloc(N * 4 * C);
  }
}

Block Block::bind(const LayerParams& p, const LayerParams* g, int C, int n_head, float eps) {
  Block b;
  b.n_head = n_head;
  b.ln1 = {p.ln1_w, p.ln1_b, g ? g->ln1_w : nullptr, g ? g->ln1_b : nullptr, C, eps};
  b.ln2 = {p.ln2_w, p.ln2_b, g ? g->ln2_w : nullptr, g ? g->ln2_b : nullptr, C, eps};
  b.qkv = {p.qkv_w, p.qkv_b, g ? g->qkv_w : nullptr, g ? g->qkv_b : nullptr, C, 3 * C};
  b.attn_proj = {p.attn_proj_w, p.attn_proj_b, g ? g->attn_proj_w : nullptr, g ? g->attn_proj_b : nullptr, C, C};
  b.fc = {p.fc_w, p.fc_b, g ? g->fc_w : nullptr, g ? g->fc_b : nullptr, C, 4 * C};
  b.fc_proj = {p.fc_proj_w, p.fc_proj_b, g ? g->fc_proj_w : nullptr, g ? g->fc_proj_b : nullptr, 4 * C, C};
  return b;
}

void Block::forward(float* y, const float* x, BlockActivations& a, BlockScratch& s, const AttentionParams& ap,
                    int64_t N) const {
  const int C = ln1.dim;
  float* ln1_out = a.ln1 ? a.ln1 : s.ln_tmp;
  float* ln2_out = a.ln2 ? a.ln2 : s.ln_tmp;
  float* gelu_out = a.fc_gelu ? a.fc_gelu : s.gelu_tmp;
  ln1.forward(ln1_out, a.ln1_mean, a.ln1_rstd, x, N);
  qkv.forward(a.qkv, ln1_out, N);
  attention_forward(a.atty, a.lse, a.qkv, ap);
  attn_proj.forward(a.h, a.atty, N);
  cpu::add(a.h, a.h, x, N * C);
  ln2.forward(ln2_out, a.ln2_mean, a.ln2_rstd, a.h, N);
  fc.forward(a.fc, ln2_out, N);
  cpu::gelu_forward(gelu_out, a.fc, N * 4 * C);
  if (!y) return;
  fc_proj.forward(y, gelu_out, N);
  cpu::add(y, y, a.h, N * C);
}

void Block::backward(float* dy, const float* x, const BlockActivations& a, BlockScratch& s, const AttentionParams& ap,
                     int64_t N) const {
  const int C = ln1.dim;
  // Selective recomputation: rebuild the cheap, large activations from what was kept. The same kernels
  // on the same inputs give the same bits as the forward did.
  const float* gelu_out = a.fc_gelu;
  if (!gelu_out) {
    cpu::gelu_forward(s.gelu_tmp, a.fc, N * 4 * C);
    gelu_out = s.gelu_tmp;
  }
  const float* ln2_out = a.ln2;
  if (!ln2_out) {
    ln2.forward(s.ln_tmp, a.ln2_mean, a.ln2_rstd, a.h, N);
    ln2_out = s.ln_tmp;
  }
  // MLP branch: dy is dL/dy = dL/dh through the residual, plus the branch's share added by ln2.
  fc_proj.backward(s.d_fc, dy, gelu_out, N);
  cpu::gelu_backward(s.d_fc, a.fc, s.d_fc, 4 * C * N);
  fc.backward(s.d_ln, s.d_fc, ln2_out, N);
  ln2.backward(dy, s.d_ln, a.h, a.ln2_mean, a.ln2_rstd, N);  // dy now holds dL/dh
  // Attention branch.
  attn_proj.backward(s.d_atty, dy, a.atty, N);
  attention_backward(s.d_qkv, s.d_atty, a.qkv, a.atty, a.lse, ap);
  const float* ln1_out = a.ln1;
  if (!ln1_out) {
    ln1.forward(s.ln_tmp, a.ln1_mean, a.ln1_rstd, x, N);
    ln1_out = s.ln_tmp;
  }
  qkv.backward(s.d_ln, s.d_qkv, ln1_out, N);
  ln1.backward(dy, s.d_ln, x, a.ln1_mean, a.ln1_rstd, N);  // dy now holds dL/dx
}

}  // namespace kiln::nn
