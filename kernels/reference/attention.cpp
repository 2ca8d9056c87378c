// Reference attention: materialises the full score matrix of each (sequence, head) in double precision,
// applies softmax and the weighted sum; the backward is the textbook chain rule through softmax.
// Slow and simple on purpose: it exists only to check kernels/cpu/attention.cpp.
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "kernels/attention.h"

namespace kiln::ref {
namespace {

using Span = AttentionSpan;
std::vector<Span> spans(const AttentionParams& p, int64_t& N) { return attention_spans(p, N); }

// Scaled, masked scores of one (sequence, head) followed by a row softmax: P[i*T + j]; lse[i] is the log
// of row i's softmax denominator including its max.
std::vector<double> probabilities(const float* qkv, const AttentionParams& p, Span sp, int h,
                                  std::vector<double>* lse = nullptr) {
  const int64_t C = int64_t(p.NH) * p.HD, T = sp.len;
  std::vector<double> P(size_t(T * T), 0.0);
  if (lse) lse->assign(size_t(T), 0.0);
  for (int64_t i = 0; i < T; i++) {
    const float* q = qkv + (sp.start + i) * 3 * C + int64_t(h) * p.HD;
    const int64_t jend = p.causal ? i + 1 : T;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < jend; j++) {
      const float* k = qkv + (sp.start + j) * 3 * C + C + int64_t(h) * p.HD;
      double dot = 0;
      for (int d = 0; d < p.HD; d++) dot += double(q[d]) * double(k[d]);
      P[i * T + j] = double(p.scale) * dot;
      mx = std::max(mx, P[i * T + j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < jend; j++) sum += (P[i * T + j] = std::exp(P[i * T + j] - mx));
    for (int64_t j = 0; j < jend; j++) P[i * T + j] /= sum;
    if (lse) (*lse)[size_t(i)] = mx + std::log(sum);
  }
  return P;
}

}  // namespace

void attention_forward(float* out, float* lse, const float* qkv, const AttentionParams& p) {
  int64_t N = 0;
  const std::vector<Span> seqs = spans(p, N);
  const int64_t C = int64_t(p.NH) * p.HD;
  for (const Span& sp : seqs) {
    const int64_t T = sp.len;
    for (int h = 0; h < p.NH; h++) {
      std::vector<double> row_lse;
      const std::vector<double> P = probabilities(qkv, p, sp, h, &row_lse);
      for (int64_t i = 0; i < T; i++) {
        lse[int64_t(h) * N + sp.start + i] = float(row_lse[size_t(i)]);
        const int64_t jend = p.causal ? i + 1 : T;
        float* o = out + (sp.start + i) * C + int64_t(h) * p.HD;
        for (int d = 0; d < p.HD; d++) {
          double acc = 0;
          for (int64_t j = 0; j < jend; j++)
            acc += P[i * T + j] * double(qkv[(sp.start + j) * 3 * C + 2 * C + int64_t(h) * p.HD + d]);
          o[d] = float(acc);
        }
      }
    }
  }
}

// With S = scale·Q·Kᵀ, P = softmax(S), O = P·V:
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
// out and lse are not used: everything is recomputed from q, k, v.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        const AttentionParams& p) {
  int64_t N = 0;
  const std::vector<Span> seqs = spans(p, N);
  const int64_t C = int64_t(p.NH) * p.HD;
  const int HD = p.HD;
  for (int64_t n = 0; n < N * 3 * C; n++) dqkv[n] = 0.0f;
  for (const Span& sp : seqs) {
    const int64_t T = sp.len;
    for (int h = 0; h < p.NH; h++) {
      const std::vector<double> P = probabilities(qkv, p, sp, h);
      auto q = [&](int64_t i, int d) { return double(qkv[(sp.start + i) * 3 * C + int64_t(h) * HD + d]); };
      auto k = [&](int64_t j, int d) { return double(qkv[(sp.start + j) * 3 * C + C + int64_t(h) * HD + d]); };
      auto v = [&](int64_t j, int d) { return double(qkv[(sp.start + j) * 3 * C + 2 * C + int64_t(h) * HD + d]); };
      auto dO = [&](int64_t i, int d) { return double(dout[(sp.start + i) * C + int64_t(h) * HD + d]); };

      std::vector<double> dS(size_t(T * T), 0.0);
      for (int64_t i = 0; i < T; i++) {
        double rowdot = 0;
        for (int64_t j = 0; j < T; j++) {
          double dp = 0;
          for (int d = 0; d < HD; d++) dp += dO(i, d) * v(j, d);
          dS[i * T + j] = dp;
          rowdot += P[i * T + j] * dp;
        }
        for (int64_t j = 0; j < T; j++) dS[i * T + j] = P[i * T + j] * (dS[i * T + j] - rowdot);
      }
      // dQ, dK, dV accumulated in double, then written once.
      std::vector<double> gq(size_t(T * HD), 0.0), gk(size_t(T * HD), 0.0), gv(size_t(T * HD), 0.0);
      for (int64_t i = 0; i < T; i++)
        for (int64_t j = 0; j < T; j++)
          for (int d = 0; d < HD; d++) {
            gq[i * HD + d] += dS[i * T + j] * k(j, d);
            gk[j * HD + d] += dS[i * T + j] * q(i, d);
            gv[j * HD + d] += P[i * T + j] * dO(i, d);
          }
      for (int64_t i = 0; i < T; i++) {
        float* dq = dqkv + (sp.start + i) * 3 * C + int64_t(h) * HD;
        for (int d = 0; d < HD; d++) {
          dq[d] = float(double(p.scale) * gq[i * HD + d]);
          dq[C + d] = float(double(p.scale) * gk[i * HD + d]);
          dq[2 * C + d] = float(gv[i * HD + d]);
        }
      }
    }
  }
}

}  // namespace kiln::ref
