#include "nn/mtp.h"

namespace kiln::nn {

void MTPActivations::allocate(Workspace& ws, int64_t N, const BlockShape& s, bool decoding) {
  const int64_t C = s.C();
  emb = ws.f32(N * C);
  en = ws.act(N * C);
  hn = ws.act(N * C);
  en_rstd = ws.f32(N);
  hn_rstd = ws.f32(N);
  cat = ws.act(2 * N * C);
  x = ws.f32(N * C);
  blk.allocate(ws, N, s, false, decoding);
  h = ws.f32(N * C);
  ln = ws.act(N * C);
  ln_rstd = ws.f32(N);
  dln = ws.act(N * C);
  dres = ws.f32(N * C);
}

void MTPScratch::allocate(Workspace& ws, int64_t N, int C) {
  zeros = ws.f32(N * C);
  dcat = ws.act(2 * N * C);
  dpart = ws.act(N * C);
  demb = ws.f32(N * C);
}

void MTPModule::forward(Backend& be, MTPActivations& a, BlockScratch& bs, const float* prev, const int32_t* tokens,
                        const float* wte, const int32_t* pos, const AttentionParams& ap, int64_t N,
                        const float* zeros, const KVLayer* cache) const {
  const int64_t C = block.shape.C();
  be.embedding_forward(a.emb, tokens, pos, wte, nullptr, N, int(C));
  enorm.forward(be, a.en, nullptr, a.en_rstd, a.emb, N);
  hnorm.forward(be, a.hn, nullptr, a.hn_rstd, prev, N);
  be.copy_rows(a.cat, 2 * C, a.en, C, N, C);
  be.copy_rows(a.cat.at(C), 2 * C, a.hn, C, N, C);
  be.linear_residual(a.x, zeros, a.cat, eh_proj, N);  // fp32 out on every backend
  block.forward(be, a.h, a.x, a.blk, bs, pos, ap, N, cache);
  head_norm.forward(be, a.ln, nullptr, a.ln_rstd, a.h, N);
}

void MTPModule::backward(Backend& be, float* dprev, MTPActivations& a, BlockScratch& bs, MTPScratch& s,
                         const float* prev, const int32_t* tokens, float* dwte, const int32_t* pos,
                         const AttentionParams& ap, int64_t N) const {
  const int64_t C = block.shape.C();
  head_norm.backward(be, a.dres, a.dln, a.h, nullptr, a.ln_rstd, N);
  block.backward(be, a.dres, a.x, a.blk, bs, pos, ap, N);  // a.dres: dL/dx
  be.linear_backward(s.dcat, be.residual_operand(a.dres, bs.dres, N * C), a.cat, eh_proj, N);
  be.copy_rows(s.dpart, C, s.dcat, 2 * C, N, C);
  be.memset(s.demb, 0, size_t(N * C) * sizeof(float));
  enorm.backward(be, s.demb, s.dpart, a.emb, nullptr, a.en_rstd, N);
  if (dwte) be.embedding_backward(dwte, nullptr, s.demb, tokens, pos, N, int(C));
  be.copy_rows(s.dpart, C, s.dcat.at(C), 2 * C, N, C);
  hnorm.backward(be, dprev, s.dpart, prev, nullptr, a.hn_rstd, N);
}

}  // namespace kiln::nn
