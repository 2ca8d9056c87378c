#include "nn/mla.h"

#include <algorithm>

#include "core/error.h"

namespace kiln::nn {

void MLAActivations::allocate(Workspace& ws, int64_t N, const MLAShape& s, bool decoding) {
  xa = ws.act(N * s.a());
  xn = ws.act(N * s.a());
  rstd_q = ws.f32(N);
  rstd_kv = ws.f32(N);
  if (s.q_lora) qa_n = ws.act(N * s.q_lora);
  if (s.q_lora) q = ws.act(N * s.NH * s.qk());
  c = ws.act(N * s.r);
  kv = ws.act(N * s.kv());
  qkv = ws.act(N * s.qkv());
  att = ws.act(N * s.att());
  lse = ws.f32(int64_t(s.NH) * N);
  if (decoding) {
    q_abs = ws.act(N * s.NH * s.latent());
    lat_out = ws.act(N * s.NH * s.r);
    head_in = ws.act(N * std::max(s.nope, s.r));
    head_out = ws.act(N * std::max(s.r, s.vd));
  }
}

void MLAScratch::allocate(Workspace& ws, int64_t N, const MLAShape& s) {
  d_att = ws.act(N * s.att());
  d_qkv = ws.act(N * s.qkv());
  d_kv = ws.act(N * s.kv());
  if (s.q_lora) d_qa_n = ws.act(N * s.q_lora);
  if (s.q_lora) d_q = ws.act(N * s.NH * s.qk());
  d_c = ws.act(N * s.r);
  d_xa = ws.act(N * s.a());
}

namespace {

// Rows [row0, row0 + rows) of an nn.Linear weight [out, in] as their own weight (a head's slice of kv_b); with
// inout the slice is read as [in = rows, out = w.in] (its transpose: W_UK folded into the query).
Weight slice(const Weight& w, int64_t row0, int rows, bool inout) {
  Weight s;
  s.w = w.w + row0 * w.in;
  s.w16 = w.w16 ? w.w16 + row0 * w.in : nullptr;
  s.in = inout ? rows : w.in;
  s.out = inout ? w.in : rows;
  s.layout = inout ? Layout::InOut : Layout::OutIn;
  return s;
}

}  // namespace

// kv_b's per-head [k_nope | v] rows into the attention rows' key and value heads, the shared rotary key beside
// each k_nope.
static void assemble_kv(Backend& be, const MLAShape& S, const MLAActivations& a, int64_t N) {
  const int64_t QKV = S.qkv(), KV = S.kv(), qk = S.qk();
  for (int h = 0; h < S.NH; h++) {
    const Act k = a.qkv.at(int64_t(S.NH) * qk + h * qk);
    be.copy_rows(k, QKV, a.kv.at(int64_t(h) * (S.nope + S.vd)), KV, N, S.nope);
    be.copy_rows(k.at(S.nope), QKV, a.xn.at(S.qa() + S.r), S.a(), N, S.rope);
    be.copy_rows(a.qkv.at(2 * int64_t(S.NH) * qk + int64_t(h) * S.vd), QKV, a.kv.at(int64_t(h) * (S.nope + S.vd) + S.nope),
                 KV, N, S.vd);
  }
}

void LatentAttention::forward(Backend& be, float* h, const float* residual, Act x, MLAActivations& a,
                              const int32_t* pos, const AttentionParams& ap, int64_t N, const KVLayer* cache) const {
  const MLAShape& S = shape;
  const int64_t A = S.a(), QKV = S.qkv(), qa = S.qa();
  be.linear_forward(a.xa, x, this->a, N);
  // Queries: through the normed bottleneck straight into the attention rows, or copied there.
  if (S.q_lora) {
    be.head_rmsnorm_forward(a.xn, a.rstd_q, a.xa, q_norm, N, S.q_lora, 1, A, S.eps);
    be.copy_rows(a.qa_n, S.q_lora, a.xn, A, N, S.q_lora);
    be.linear_forward(a.q, a.qa_n, q_b, N);
    be.copy_rows(a.qkv, QKV, a.q, int64_t(S.NH) * S.qk(), N, int64_t(S.NH) * S.qk());
  } else {
    be.copy_rows(a.qkv, QKV, a.xa, A, N, qa);
  }
  be.rope_forward(a.qkv.at(S.nope), pos, N, q_rope);
  // The latent: normed c_KV and the rotated shared key, side by side in xn (what a cache row holds).
  be.head_rmsnorm_forward(a.xn.at(qa), a.rstd_kv, a.xa.at(qa), kv_norm, N, S.r, 1, A, S.eps);
  be.copy_rows(a.xn.at(qa + S.r), A, a.xa.at(qa + S.r), A, N, S.rope);
  be.rope_forward(a.xn.at(qa + S.r), pos, N, k_rope);
  if (cache)
    be.rows_append(cache->k, cache->batch_stride, a.xn.at(qa), A, S.latent(), cache->B, cache->Tq, cache->past,
                   cache->pages);
  if (!cache || cache->fresh) {
    be.copy_rows(a.c, S.r, a.xn.at(qa), A, N, S.r);
    be.linear_forward(a.kv, a.c, kv_b, N);
    assemble_kv(be, S, a, N);
    be.attention_forward(a.att, a.lse, a.qkv, ap);
  } else if (cache->absorbed) {
    decode_absorbed(be, a, ap, *cache);
  } else {
    decode_plain(be, a, ap, *cache);
  }
  be.linear_residual(h, residual, a.att, proj, N);
}

void LatentAttention::backward(Backend& be, Act dx, Act dh, Act x, const MLAActivations& a, MLAScratch& s,
                               const int32_t* pos, const AttentionParams& ap, int64_t N) const {
  const MLAShape& S = shape;
  const int64_t A = S.a(), QKV = S.qkv(), KV = S.kv(), qa = S.qa(), qk = S.qk();
  be.linear_backward(s.d_att, dh, a.att, proj, N);
  be.attention_backward(s.d_qkv, s.d_att, a.qkv, a.att, a.lse, ap);
  be.rope_backward(s.d_qkv.at(S.nope), pos, N, q_rope);
  // Query path into d_xa's first columns.
  if (S.q_lora) {
    be.copy_rows(s.d_q, int64_t(S.NH) * qk, s.d_qkv, QKV, N, int64_t(S.NH) * qk);
    be.linear_backward(s.d_qa_n, s.d_q, a.qa_n, q_b, N);
    be.copy_rows(s.d_xa, A, s.d_qa_n, S.q_lora, N, S.q_lora);
    be.head_rmsnorm_backward(s.d_xa, dq_norm, s.d_xa, a.xa, q_norm, a.rstd_q, N, S.q_lora, 1, A);
  } else {
    be.copy_rows(s.d_xa, A, s.d_qkv, QKV, N, qa);
  }
  // Keys' nope parts and values back to kv_b's rows; the shared rotary key sums over the heads.
  for (int h = 0; h < S.NH; h++) {
    be.copy_rows(s.d_kv.at(int64_t(h) * (S.nope + S.vd)), KV, s.d_qkv.at(int64_t(S.NH) * qk + h * qk), QKV, N, S.nope);
    be.copy_rows(s.d_kv.at(int64_t(h) * (S.nope + S.vd) + S.nope), KV, s.d_qkv.at(2 * int64_t(S.NH) * qk + int64_t(h) * S.vd),
                 QKV, N, S.vd);
  }
  be.linear_backward(s.d_c, s.d_kv, a.c, kv_b, N);
  be.copy_rows(s.d_xa.at(qa), A, s.d_c, S.r, N, S.r);
  be.head_rmsnorm_backward(s.d_xa.at(qa), dkv_norm, s.d_xa.at(qa), a.xa.at(qa), kv_norm, a.rstd_kv, N, S.r, 1, A);
  be.sum_heads(s.d_xa.at(qa + S.r), A, s.d_qkv.at(int64_t(S.NH) * qk + S.nope), QKV, N, S.NH, qk, S.rope);
  be.rope_backward(s.d_xa.at(qa + S.r), pos, N, k_rope);
  be.linear_backward(dx, s.d_xa, x, this->a, N);
}

// Scores q_nope·(W_UK c) + q_rope·k_rope = (W_UKᵀ q_nope)·c + q_rope·k_rope: one key/value head per position
// ([c | k_rope] keys, c values), then each head's latent output through its W_UV.
void LatentAttention::decode_absorbed(Backend& be, MLAActivations& a, const AttentionParams& ap,
                                      const KVLayer& cache) const {
  const MLAShape& S = shape;
  const int64_t N = int64_t(cache.B) * cache.Tq, QKV = S.qkv(), L = S.latent(), QA = int64_t(S.NH) * L;
  for (int h = 0; h < S.NH; h++) {
    be.copy_rows(a.head_in, S.nope, a.qkv.at(int64_t(h) * S.qk()), QKV, N, S.nope);
    be.linear_forward(a.head_out, a.head_in, slice(kv_b, int64_t(h) * (S.nope + S.vd), S.nope, true), N);
    be.copy_rows(a.q_abs.at(h * L), QA, a.head_out, S.r, N, S.r);
    be.copy_rows(a.q_abs.at(h * L + S.r), QA, a.qkv.at(int64_t(h) * S.qk() + S.nope), QKV, N, S.rope);
  }
  DecodeAttentionParams d;
  d.B = cache.B;
  d.Tq = cache.Tq;
  d.past_per_seq = cache.past;
  d.max_past = cache.max_positions;
  d.NH = S.NH;
  d.NKV = 1;
  d.HD = int(L);
  d.HDv = S.r;
  d.scale = ap.scale;
  d.q = static_cast<const float*>(a.q_abs.p);
  d.q_stride = QA;
  d.k = d.v = static_cast<const float*>(cache.k.p);  // values: the first r floats of each cached row
  d.kv_batch_stride = cache.batch_stride;
  d.kv_stride = L;
  d.pages = cache.pages;
  d.out = static_cast<float*>(a.lat_out.p);
  d.out_stride = int64_t(S.NH) * S.r;
  be.decode_attention(d);
  for (int h = 0; h < S.NH; h++) {
    be.copy_rows(a.head_in, S.r, a.lat_out.at(int64_t(h) * S.r), d.out_stride, N, S.r);
    be.linear_forward(a.head_out, a.head_in, slice(kv_b, int64_t(h) * (S.nope + S.vd) + S.nope, S.vd, false), N);
    be.copy_rows(a.att.at(int64_t(h) * S.vd), S.att(), a.head_out, S.vd, N, S.vd);
  }
}

// Every cached position's keys and values rebuilt through kv_b, then ordinary attention of the new queries.
void LatentAttention::decode_plain(Backend& be, MLAActivations& a, const AttentionParams& ap,
                                   const KVLayer& cache) const {
  const MLAShape& S = shape;
  KILN_CHECK(be.on_host(), "latent attention: the plain (expanded) decoding form runs on host backends only");
  KILN_CHECK(!cache.pages, "latent attention: the plain decoding form has no paged cache");
  KILN_CHECK(cache.expand_k && cache.expand_v && cache.expand_c && cache.expand_kv,
             "latent attention: the plain decoding form needs its expansion buffers");
  const int64_t L = S.latent(), KV = S.kv(), KS = int64_t(S.NH) * S.qk(), VS = S.att();
  const int64_t P = cache.max_positions;
  for (int b = 0; b < cache.B; b++) {
    const int64_t len = int64_t(cache.past[b]) + cache.Tq;
    const Act lat = cache.k.at(b * cache.batch_stride);
    be.copy_rows(cache.expand_c, S.r, lat, L, len, S.r);
    be.linear_forward(cache.expand_kv, cache.expand_c, kv_b, len);
    const Act K = cache.expand_k.at(b * P * KS), V = cache.expand_v.at(b * P * VS);
    for (int h = 0; h < S.NH; h++) {
      be.copy_rows(K.at(int64_t(h) * S.qk()), KS, cache.expand_kv.at(int64_t(h) * (S.nope + S.vd)), KV, len, S.nope);
      be.copy_rows(K.at(int64_t(h) * S.qk() + S.nope), KS, lat.at(S.r), L, len, S.rope);
      be.copy_rows(V.at(int64_t(h) * S.vd), VS, cache.expand_kv.at(int64_t(h) * (S.nope + S.vd) + S.nope), KV, len,
                   S.vd);
    }
  }
  DecodeAttentionParams d;
  d.B = cache.B;
  d.Tq = cache.Tq;
  d.past_per_seq = cache.past;
  d.max_past = cache.max_positions;
  d.NH = S.NH;
  d.NKV = S.NH;
  d.HD = S.qk();
  d.HDv = S.vd;
  d.scale = ap.scale;
  d.q = static_cast<const float*>(a.qkv.p);
  d.q_stride = S.qkv();
  d.k = static_cast<const float*>(cache.expand_k.p);
  d.kv_batch_stride = P * KS;
  d.kv_stride = KS;
  d.v = static_cast<const float*>(cache.expand_v.p);
  d.v_batch_stride = P * VS;
  d.v_stride = VS;
  d.out = static_cast<float*>(a.att.p);
  d.out_stride = VS;
  be.decode_attention(d);
}

}  // namespace kiln::nn
