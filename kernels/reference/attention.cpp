// Reference attention: materialises the full score matrix of each (sequence, head) in double precision,
// applies softmax and the weighted sum; the backward is the textbook chain rule through softmax.
// Grouped-query attention and the sliding window are plain index arithmetic and a mask here.
// Slow and simple on purpose: it exists only to check kernels/cpu/attention.cpp (and the CUDA kernels).
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/attention.h"

namespace kiln::ref {
namespace {

using Span = AttentionSpan;

// Offsets within a qkv row of query head h and of its key and value heads.
struct Layout {
  int64_t row, q, k, v;
};
Layout layout(const AttentionParams& p, int h) {
  const int NKV = kv_heads(p), kvh = h / (p.NH / NKV);
  return {qkv_row(p), int64_t(h) * p.HD, int64_t(p.NH + kvh) * p.HD,
          int64_t(p.NH + NKV) * p.HD + int64_t(kvh) * v_dim(p)};
}

// Whether query i sees key j (positions within the sequence).
bool visible(const AttentionParams& p, int64_t i, int64_t j) {
  if (p.causal && j > i) return false;
  if (p.window > 0 && j <= i - p.window) return false;
  return true;
}

// Scaled, masked scores of one (sequence, query head) followed by a row softmax: P[i*T + j] (0 where masked);
// lse[i] is the log of row i's softmax denominator including its max.
std::vector<double> probabilities(const float* qkv, const AttentionParams& p, Span sp, int h,
                                  std::vector<double>* lse = nullptr) {
  const Layout L = layout(p, h);
  const int64_t T = sp.len;
  std::vector<double> P(size_t(T * T), 0.0);
  if (lse) lse->assign(size_t(T), 0.0);
  for (int64_t i = 0; i < T; i++) {
    const float* q = qkv + (sp.start + i) * L.row + L.q;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < T; j++) {
      if (!visible(p, i, j)) continue;
      const float* k = qkv + (sp.start + j) * L.row + L.k;
      double dot = 0;
      for (int d = 0; d < p.HD; d++) dot += double(q[d]) * double(k[d]);
      P[i * T + j] = double(p.scale) * dot;
      mx = std::max(mx, P[i * T + j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < T; j++)
      if (visible(p, i, j)) sum += (P[i * T + j] = std::exp(P[i * T + j] - mx));
    for (int64_t j = 0; j < T; j++) P[i * T + j] /= sum;
    if (lse) (*lse)[size_t(i)] = mx + std::log(sum);
  }
  return P;
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p) {
  int64_t N = 0;
  const std::vector<Span> seqs = attention_spans(p, N);
  const int64_t C = attention_out_row(p);
  const int HDv = v_dim(p);
  for (const Span& sp : seqs) {
    const int64_t T = sp.len;
    for (int h = 0; h < p.NH; h++) {
      const Layout L = layout(p, h);
      std::vector<double> row_lse;
      const std::vector<double> P = probabilities(qkv, p, sp, h, &row_lse);
      for (int64_t i = 0; i < T; i++) {
        lse[int64_t(h) * N + sp.start + i] = float(row_lse[size_t(i)]);
        float* o = out + (sp.start + i) * C + int64_t(h) * HDv;
        for (int d = 0; d < HDv; d++) {
          double acc = 0;
          for (int64_t j = 0; j < T; j++) acc += P[i * T + j] * double(qkv[(sp.start + j) * L.row + L.v + d]);
          o[d] = float(acc);
        }
      }
    }
  }
}

// With S = scale·Q·Kᵀ, P = softmax(S), O = P·V:
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
// A key/value head's gradient is the sum over the query heads of its group.
// out and lse are not used: everything is recomputed from q, k, v.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p) {
  (void)out;
  (void)lse;
  int64_t N = 0;
  const std::vector<Span> seqs = attention_spans(p, N);
  const int64_t C = attention_out_row(p), R = qkv_row(p);
  const int HD = p.HD, HDv = v_dim(p), NKV = kv_heads(p);
  for (int64_t n = 0; n < N * R; n++) dqkv[n] = 0.0f;
  for (const Span& sp : seqs) {
    const int64_t T = sp.len;
    // dK, dV per kv head, accumulated in double over the group, written once at the end.
    std::vector<double> gk(size_t(NKV * T * HD), 0.0), gv(size_t(NKV * T * HDv), 0.0);
    for (int h = 0; h < p.NH; h++) {
      const Layout L = layout(p, h);
      const int kvh = h / (p.NH / NKV);
      const std::vector<double> P = probabilities(qkv, p, sp, h);
      auto q = [&](int64_t i, int d) { return double(qkv[(sp.start + i) * R + L.q + d]); };
      auto k = [&](int64_t j, int d) { return double(qkv[(sp.start + j) * R + L.k + d]); };
      auto v = [&](int64_t j, int d) { return double(qkv[(sp.start + j) * R + L.v + d]); };
      auto dO = [&](int64_t i, int d) { return double(dout[(sp.start + i) * C + int64_t(h) * HDv + d]); };

      std::vector<double> dS(size_t(T * T), 0.0);
      for (int64_t i = 0; i < T; i++) {
        double rowdot = 0;
        for (int64_t j = 0; j < T; j++) {
          double dp = 0;
          for (int d = 0; d < HDv; d++) dp += dO(i, d) * v(j, d);
          dS[i * T + j] = dp;
          rowdot += P[i * T + j] * dp;
        }
        for (int64_t j = 0; j < T; j++) dS[i * T + j] = P[i * T + j] * (dS[i * T + j] - rowdot);
      }
      std::vector<double> gq(size_t(T * HD), 0.0);
      double* gkh = gk.data() + size_t(kvh) * T * HD;
      double* gvh = gv.data() + size_t(kvh) * T * HDv;
      for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < T; j++) {
          for (int d = 0; d < HD; d++) {
            gq[i * HD + d] += dS[i * T + j] * k(j, d);
            gkh[j * HD + d] += dS[i * T + j] * q(i, d);
          }
          for (int d = 0; d < HDv; d++) gvh[j * HDv + d] += P[i * T + j] * dO(i, d);
        }
      for (int64_t i = 0; i < T; i++)
        for (int d = 0; d < HD; d++) dqkv[(sp.start + i) * R + L.q + d] = float(double(p.scale) * gq[i * HD + d]);
    }
    for (int kvh = 0; kvh < NKV; kvh++)
      for (int64_t i = 0; i < T; i++) {
        float* dk = dqkv + (sp.start + i) * R + int64_t(p.NH + kvh) * HD;
        float* dv = dqkv + (sp.start + i) * R + int64_t(p.NH + NKV) * HD + int64_t(kvh) * HDv;
        for (int d = 0; d < HD; d++) dk[d] = float(double(p.scale) * gk[(size_t(kvh) * T + i) * HD + d]);
        for (int d = 0; d < HDv; d++) dv[d] = float(gv[(size_t(kvh) * T + i) * HDv + d]);
      }
  }
}

}  // namespace kiln::ref
