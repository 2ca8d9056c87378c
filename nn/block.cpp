#include "nn/block.h"

#include "core/memory.h"
#include "kernels/activation.h"

namespace kiln::nn {

void BlockActivations::allocate(Arena& arena, int64_t N, int C, int NH) {
  ln1 = arena.alloc(N * C);
  ln1_mean = arena.alloc(N);
  ln1_rstd = arena.alloc(N);
  qkv = arena.alloc(N * 3 * C);
  atty = arena.alloc(N * C);
  lse = arena.alloc(int64_t(NH) * N);
  h = arena.alloc(N * C);
  ln2 = arena.alloc(N * C);
  ln2_mean = arena.alloc(N);
  ln2_rstd = arena.alloc(N);
  fc = arena.alloc(N * 4 * C);
  fc_gelu = arena.alloc(N * 4 * C);
}

void BlockScratch::allocate(Arena& arena, int64_t N, int C) {
  d_ln = arena.alloc(N * C);
  d_atty = arena.alloc(N * C);
  d_qkv = arena.alloc(N * 3 * C);
  d_fc = arena.alloc(N * 4 * C);
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

void Block::forward(float* y, const float* x, BlockActivations& a, const AttentionParams& ap, int64_t N) const {
  const int C = ln1.dim;
  ln1.forward(a.ln1, a.ln1_mean, a.ln1_rstd, x, N);
  qkv.forward(a.qkv, a.ln1, N);
  cpu::attention_forward(a.atty, a.lse, a.qkv, ap);
  attn_proj.forward(a.h, a.atty, N);
  cpu::add(a.h, a.h, x, N * C);
  ln2.forward(a.ln2, a.ln2_mean, a.ln2_rstd, a.h, N);
  fc.forward(a.fc, a.ln2, N);
  cpu::gelu_forward(a.fc_gelu, a.fc, N * 4 * C);
  fc_proj.forward(y, a.fc_gelu, N);
  cpu::add(y, y, a.h, N * C);
}

void Block::backward(float* dy, const float* x, const BlockActivations& a, BlockScratch& s, const AttentionParams& ap,
                     int64_t N) const {
  const int C = ln1.dim;
  // MLP branch: dy is dL/dy = dL/dh through the residual, plus the branch's share added by ln2.
  fc_proj.backward(s.d_fc, dy, a.fc_gelu, N);
  cpu::gelu_backward(s.d_fc, a.fc, s.d_fc, 4 * C * N);
  fc.backward(s.d_ln, s.d_fc, a.ln2, N);
  ln2.backward(dy, s.d_ln, a.h, a.ln2_mean, a.ln2_rstd, N);  // dy now holds dL/dh
  // Attention branch.
  attn_proj.backward(s.d_atty, dy, a.atty, N);
  cpu::attention_backward(s.d_qkv, s.d_atty, a.qkv, a.atty, a.lse, ap);
  qkv.backward(s.d_ln, s.d_qkv, a.ln1, N);
  ln1.backward(dy, s.d_ln, x, a.ln1_mean, a.ln1_rstd, N);  // dy now holds dL/dx
}

}  // namespace kiln::nn
