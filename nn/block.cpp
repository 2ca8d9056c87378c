#include "nn/block.h"

#include "core/error.h"

namespace kiln::nn {

void BlockActivations::allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective, bool decoding) {
  ln1 = selective ? Act{} : ws.act(N * s.C());
  ln1_mean = ws.f32(N);
  ln1_rstd = ws.f32(N);
  if (s.mla.on())
    mla.allocate(ws, N, s.mla, decoding);
  else
    attn.allocate(ws, N, s.attn);
  h = ws.f32(N * s.C());
  ln2 = selective ? Act{} : ws.act(N * s.C());
  ln2_mean = ws.f32(N);
  ln2_rstd = ws.f32(N);
  if (s.ffn.F) ffn.allocate(ws, N, s.ffn, selective);
  if (s.moe) moe.allocate(ws, N, s.moe, selective);
}

void BlockScratch::allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective) {
  d_ln = ws.act(N * s.C());
  if (ws.act_dtype() != DType::F32) dres = ws.act(N * s.C());
  if (selective) ln_tmp = ws.act(N * s.C());
  if (s.mla.on())
    mla.allocate(ws, N, s.mla);
  else
    attn.allocate(ws, N, s.attn);
  if (s.ffn.F) ffn.allocate(ws, N, s.ffn, selective);
  if (s.moe) moe.allocate(ws, N, s.moe, selective);
}

void Block::forward(Backend& be, float* y, const float* x, BlockActivations& a, BlockScratch& s, const int32_t* pos,
                    const AttentionParams& ap, int64_t N, const KVLayer* cache) const {
  Act ln1 = a.ln1 ? a.ln1 : s.ln_tmp;
  Act ln2 = a.ln2 ? a.ln2 : s.ln_tmp;
  float* h = a.h ? a.h : y;  // decoding: the stream is updated in place
  KILN_CHECK(h, "block forward: no buffer for the mid-block residual");
  norm1.forward(be, ln1, a.ln1_mean, a.ln1_rstd, x, N);
  if (shape.mla.on())
    mla.forward(be, h, x, ln1, a.mla, pos, ap, N, cache);
  else
    attn.forward(be, h, x, ln1, a.attn, pos, ap, N, cache);
  norm2.forward(be, ln2, a.ln2_mean, a.ln2_rstd, h, N);
  if (shape.moe)
    moe.forward(be, y, h, ln2, a.moe, s.moe, N);
  else
    ffn.forward(be, y, h, ln2, a.ffn, s.ffn, N);
}

void Block::backward(Backend& be, float* dres, const float* x, const BlockActivations& a, BlockScratch& s,
                     const int32_t* pos, const AttentionParams& ap, int64_t N) const {
  const int64_t C = shape.C();
  // Selective recomputation rebuilds the norms' outputs from what was kept: the same kernels on the same inputs
  // give the same bits as the forward did.
  Act ln2 = a.ln2;
  if (!ln2) {
    norm2.forward(be, s.ln_tmp, a.ln2_mean, a.ln2_rstd, a.h, N);
    ln2 = s.ln_tmp;
  }
  // FFN branch: dres is dL/dy = dL/dh through the residual, plus the branch's share added by norm2.
  const Act dy = be.residual_operand(dres, s.dres, N * C);
  if (shape.moe)
    moe.backward(be, s.d_ln, dy, ln2, a.moe, s.moe, N);
  else
    ffn.backward(be, s.d_ln, dy, ln2, a.ffn, s.ffn, N);
  norm2.backward(be, dres, s.d_ln, a.h, a.ln2_mean, a.ln2_rstd, N);  // dres now holds dL/dh
  // Attention branch.
  Act ln1 = a.ln1;
  if (!ln1) {
    norm1.forward(be, s.ln_tmp, a.ln1_mean, a.ln1_rstd, x, N);
    ln1 = s.ln_tmp;
  }
  if (shape.mla.on())
    mla.backward(be, s.d_ln, be.residual_operand(dres, s.dres, N * C), ln1, a.mla, s.mla, pos, ap, N);
  else
    attn.backward(be, s.d_ln, be.residual_operand(dres, s.dres, N * C), ln1, a.attn, s.attn, pos, ap, N);
  norm1.backward(be, dres, s.d_ln, x, a.ln1_mean, a.ln1_rstd, N);  // dres now holds dL/dx
}

}  // namespace kiln::nn
