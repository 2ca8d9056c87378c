#include "nn/attention.h"

namespace kiln::nn {

void AttentionActivations::allocate(Workspace& ws, int64_t N, const AttentionShape& s) {
  qkv = ws.act(N * s.qkv());
  qkv_raw = qkv;
  if (s.qk_norm) {
    qkv_raw = ws.act(N * s.qkv());
    qk_rstd = ws.f32(N * (s.NH + s.NKV));
  }
  att = ws.act(N * s.qdim());
  lse = ws.f32(int64_t(s.NH) * N);
}

void AttentionScratch::allocate(Workspace& ws, int64_t N, const AttentionShape& s) {
  d_att = ws.act(N * s.qdim());
  d_qkv = ws.act(N * s.qkv());
}

// qkv projection -> (q/k norms) -> rotation -> attention (over the new tokens, or the cache) -> output projection.
void Attention::forward(Backend& be, float* h, const float* residual, Act x, AttentionActivations& a,
                        const int32_t* pos, const AttentionParams& ap, int64_t N, const KVLayer* cache) const {
  const AttentionShape& S = shape;
  const int64_t QKV = S.qkv();
  be.linear_forward(a.qkv_raw, x, qkv, N);
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
  } else {
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
    d.tree = cache->tree;
    be.decode_attention(d);
  }
  be.linear_residual(h, residual, a.att, proj, N);
}

void Attention::backward(Backend& be, Act dx, Act dh, Act x, const AttentionActivations& a, AttentionScratch& s,
                         const int32_t* pos, const AttentionParams& ap, int64_t N) const {
  const AttentionShape& S = shape;
  const int64_t QKV = S.qkv();
  be.linear_backward(s.d_att, dh, a.att, proj, N);
  be.attention_backward(s.d_qkv, s.d_att, a.qkv, a.att, a.lse, ap);
  if (S.rotary) be.rope_backward(s.d_qkv, pos, N, rope);
  if (S.qk_norm) {
    // In place: the gradient of the normed q/k heads becomes that of the raw projection's (v passes through).
    be.head_rmsnorm_backward(s.d_qkv, dq_norm, s.d_qkv, a.qkv_raw, q_norm, a.qk_rstd, N, S.HD, S.NH, QKV);
    be.head_rmsnorm_backward(s.d_qkv.at(S.qdim()), dk_norm, s.d_qkv.at(S.qdim()), a.qkv_raw.at(S.qdim()), k_norm,
                             a.qk_rstd + N * S.NH, N, S.HD, S.NKV, QKV);
  }
  be.linear_backward(dx, s.d_qkv, x, qkv, N);
}

}  // namespace kiln::nn
