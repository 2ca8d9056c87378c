#include "nn/block.h"

#include "core/error.h"

namespace kiln::nn {

void Norm::forward(Backend& be, Act out, float* mean, float* rstd, const float* x, int64_t N) const {
  if (type == NormType::LayerNorm)
    be.layernorm_forward(out, mean, rstd, x, w, b, N, dim, eps);
  else
    be.rmsnorm_forward(out, rstd, x, w, N, dim, eps);
}

void Norm::backward(Backend& be, float* dx, Act dout, const float* x, const float* mean, const float* rstd,
                    int64_t N) const {
  if (type == NormType::LayerNorm)
    be.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, N, dim);
  else
    be.rmsnorm_backward(dx, dw, dout, x, w, rstd, N, dim);
}

void BlockActivations::allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective) {
  ln1 = selective ? Act{} : ws.act(N * s.C);
  ln1_mean = ws.f32(N);
  ln1_rstd = ws.f32(N);
  qkv = ws.act(N * s.qkv());
  qkv_raw = qkv;
  if (s.qk_norm) {
    qkv_raw = ws.act(N * s.qkv());
    qk_rstd = ws.f32(N * (s.NH + s.NKV));
  }
  att = ws.act(N * s.qdim());
  lse = ws.f32(int64_t(s.NH) * N);
  h = ws.f32(N * s.C);
  ln2 = selective ? Act{} : ws.act(N * s.C);
  ln2_mean = ws.f32(N);
  ln2_rstd = ws.f32(N);
  up = ws.act(N * s.up());
  act = selective ? Act{} : ws.act(N * s.F);
}

void BlockScratch::allocate(Workspace& ws, int64_t N, const BlockShape& s, bool selective) {
  d_ln = ws.act(N * s.C);
  d_att = ws.act(N * s.qdim());
  d_qkv = ws.act(N * s.qkv());
  d_up = ws.act(N * s.up());
  if (s.gated) d_act = ws.act(N * s.F);
  if (ws.act_dtype() != DType::F32) dres = ws.act(N * s.C);
  if (selective) {
    ln_tmp = ws.act(N * s.C);
    act_tmp = ws.act(N * s.F);
  }
}

// qkv projection -> (q/k norms) -> rotation -> attention (over the new tokens, or the cache).
void Block::attention_forward(Backend& be, BlockActivations& a, const int32_t* pos, const AttentionParams& ap,
                              int64_t N, const KVLayer* cache) const {
  const BlockShape& S = shape;
  const int64_t QKV = S.qkv();
  if (S.qk_norm) {
    // Normalise the q and k heads of the raw projection into qkv (their own weights); v is copied as it is.
    be.head_rmsnorm_forward(a.qkv, a.qk_rstd, a.qkv_raw, q_norm, N, S.HD, S.NH, QKV, S.qk_eps);
    be.head_rmsnorm_forward(a.qkv.at(S.qdim()), a.qk_rstd + N * S.NH, a.qkv_raw.at(S.qdim()), k_norm, N, S.HD, S.NKV,
                            QKV, S.qk_eps);
    be.copy_rows(a.qkv.at(S.qdim() + int64_t(S.NKV) * S.HD), QKV, a.qkv_raw.at(S.qdim() + int64_t(S.NKV) * S.HD), QKV,
                 N, int64_t(S.NKV) * S.HD);
  }
  if (S.rotary) be.rope_forward(a.qkv, pos, N, rope);
  if (cache) be.kv_append(cache->k, cache->v, cache->batch_stride, a.qkv, S.NH, S.NKV, S.HD, cache->B, cache->Tq,
                          cache->past, cache->pages);
  if (!cache || cache->fresh) {
    be.attention_forward(a.att, a.lse, a.qkv, ap);
    return;
  }
  DecodeAttentionParams d;
  d.B = cache->B;
  d.Tq = cache->Tq;
  d.past_per_seq = cache->past;
  d.max_past = cache->max_positions;
  d.NH = S.NH;
  d.NKV = S.NKV;
  d.HD = S.HD;
  d.window = ap.window;
  d.scale = ap.scale;
  // The pointers are the backend's arrays in its activation type (fp32 on the CPU, bf16 on a GPU).
  d.q = static_cast<const float*>(a.qkv.p);
  d.q_stride = QKV;
  d.k = static_cast<const float*>(cache->k.p);
  d.v = static_cast<const float*>(cache->v.p);
  d.kv_batch_stride = cache->batch_stride;
  d.kv_stride = int64_t(S.NKV) * S.HD;
  d.out = static_cast<float*>(a.att.p);
  d.out_stride = S.qdim();
  d.pages = cache->pages;
  be.decode_attention(d);
}

void Block::forward(Backend& be, float* y, const float* x, BlockActivations& a, BlockScratch& s, const int32_t* pos,
                    const AttentionParams& ap, int64_t N, const KVLayer* cache) const {
  const BlockShape& S = shape;
  Act ln1 = a.ln1 ? a.ln1 : s.ln_tmp;
  Act ln2 = a.ln2 ? a.ln2 : s.ln_tmp;
  Act act = a.act ? a.act : s.act_tmp;
  float* h = a.h ? a.h : y;  // decoding: the stream is updated in place
  KILN_CHECK(h, "block forward: no buffer for the mid-block residual");
  norm1.forward(be, ln1, a.ln1_mean, a.ln1_rstd, x, N);
  be.linear_forward(a.qkv_raw, ln1, qkv, N);
  attention_forward(be, a, pos, ap, N, cache);
  be.linear_residual(h, x, a.att, proj, N);
  norm2.forward(be, ln2, a.ln2_mean, a.ln2_rstd, h, N);
  be.linear_forward(a.up, ln2, up, N);
  if (S.gated)
    be.gated_forward(act, a.up, N, S.F, S.act);
  else
    be.activation_forward(act, a.up, N * S.F, S.act);
  if (!y) return;
  be.linear_residual(y, h, act, down, N);
}

void Block::backward(Backend& be, float* dres, const float* x, const BlockActivations& a, BlockScratch& s,
                     const int32_t* pos, const AttentionParams& ap, int64_t N) const {
  const BlockShape& S = shape;
  const int64_t QKV = S.qkv();
  // Selective recomputation: rebuild the cheap, large activations from what was kept. The same kernels on the
  // same inputs give the same bits as the forward did.
  Act act = a.act;
  if (!act) {
    act = s.act_tmp;
    if (S.gated)
      be.gated_forward(act, a.up, N, S.F, S.act);
    else
      be.activation_forward(act, a.up, N * S.F, S.act);
  }
  Act ln2 = a.ln2;
  if (!ln2) {
    norm2.forward(be, s.ln_tmp, a.ln2_mean, a.ln2_rstd, a.h, N);
    ln2 = s.ln_tmp;
  }
  // FFN branch: dres is dL/dy = dL/dh through the residual, plus the branch's share added by norm2.
  Act dy = be.residual_operand(dres, s.dres, N * S.C);
  if (S.gated) {
    be.linear_backward(s.d_act, dy, act, down, N);
    be.gated_backward(s.d_up, a.up, s.d_act, N, S.F, S.act);
  } else {
    be.linear_backward(s.d_up, dy, act, down, N);
    be.activation_backward(s.d_up, a.up, s.d_up, N * S.F, S.act);
  }
  be.linear_backward(s.d_ln, s.d_up, ln2, up, N);
  norm2.backward(be, dres, s.d_ln, a.h, a.ln2_mean, a.ln2_rstd, N);  // dres now holds dL/dh
  // Attention branch.
  dy = be.residual_operand(dres, s.dres, N * S.C);
  be.linear_backward(s.d_att, dy, a.att, proj, N);
  be.attention_backward(s.d_qkv, s.d_att, a.qkv, a.att, a.lse, ap);
  if (S.rotary) be.rope_backward(s.d_qkv, pos, N, rope);
  if (S.qk_norm) {
    // In place: the gradient of the normed q/k heads becomes that of the raw projection's (v passes through).
    be.head_rmsnorm_backward(s.d_qkv, dq_norm, s.d_qkv, a.qkv_raw, q_norm, a.qk_rstd, N, S.HD, S.NH, QKV);
    be.head_rmsnorm_backward(s.d_qkv.at(S.qdim()), dk_norm, s.d_qkv.at(S.qdim()), a.qkv_raw.at(S.qdim()), k_norm,
                             a.qk_rstd + N * S.NH, N, S.HD, S.NKV, QKV);
  }
  Act ln1 = a.ln1;
  if (!ln1) {
    norm1.forward(be, s.ln_tmp, a.ln1_mean, a.ln1_rstd, x, N);
    ln1 = s.ln_tmp;
  }
  be.linear_backward(s.d_ln, s.d_qkv, ln1, qkv, N);
  norm1.backward(be, dres, s.d_ln, x, a.ln1_mean, a.ln1_rstd, N);  // dres now holds dL/dx
}

}  // namespace kiln::nn
