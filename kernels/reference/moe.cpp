// Naive mixture-of-experts ops: one token, one expert, one element at a time, sums in double.
#include <cmath>
#include <vector>

#include "kernels/moe.h"

namespace kiln::ref {

namespace {
// The index of the largest v[i] over i with allowed[i], the lowest index on ties.
int argmax_allowed(const std::vector<double>& v, const std::vector<bool>& allowed) {
  int best = -1;
  for (int i = 0; i < int(v.size()); i++)
    if (allowed[size_t(i)] && (best < 0 || v[size_t(i)] > v[size_t(best)])) best = i;
  return best;
}
}  // namespace

void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r) {
  const int E = r.E, K = r.K, G = r.groups, per = E / G;
  for (int64_t n = 0; n < N; n++) {
    const float* u = logits + n * E;
    std::vector<double> s(static_cast<size_t>(E));
    if (r.sigmoid) {
      for (int e = 0; e < E; e++) s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(u[e])));
    } else {
      double mx = u[0], sum = 0;
      for (int e = 1; e < E; e++) mx = std::max(mx, double(u[e]));
      for (int e = 0; e < E; e++) sum += std::exp(double(u[e]) - mx);
      for (int e = 0; e < E; e++) s[size_t(e)] = std::exp(double(u[e]) - mx) / sum;
    }
    for (int e = 0; e < E; e++) scores[n * E + e] = float(s[size_t(e)]);
    // Selection reads the fp32 affinities plus the bias, as the model stores them.
    std::vector<double> choice(static_cast<size_t>(E));
    for (int e = 0; e < E; e++) choice[size_t(e)] = double(scores[n * E + e]) + (bias ? double(bias[e]) : 0.0);
    if (G > 1) {
      // Group score: the sum of its two highest biased affinities; experts outside the kept groups score 0.
      std::vector<double> gs(static_cast<size_t>(G));
      for (int g = 0; g < G; g++) {
        std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::vector<bool> ok(static_cast<size_t>(per), true);
        const int a = argmax_allowed(v, ok);
        ok[size_t(a)] = false;
        const int b = argmax_allowed(v, ok);
        gs[size_t(g)] = v[size_t(a)] + v[size_t(b)];
      }
      std::vector<bool> gok(static_cast<size_t>(G), true), kept(size_t(G), false);
      for (int i = 0; i < r.topk_groups; i++) {
        const int g = argmax_allowed(gs, gok);
        gok[size_t(g)] = false;
        kept[size_t(g)] = true;
      }
      for (int e = 0; e < E; e++)
        if (!kept[size_t(e / per)]) choice[size_t(e)] = 0.0;
    }
    std::vector<bool> ok(static_cast<size_t>(E), true);
    double sum = 0;
    for (int k = 0; k < K; k++) {
      const int e = argmax_allowed(choice, ok);
      ok[size_t(e)] = false;
      idx[n * K + k] = e;
      sum += scores[n * E + e];
    }
    for (int k = 0; k < K; k++) {
      double g = scores[n * E + idx[n * K + k]];
      if (r.norm_topk) g /= sum + moe_norm_eps(r);
      w[n * K + k] = float(g * r.scale);
    }
  }
}

void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r) {
  const int E = r.E, K = r.K;
  for (int64_t n = 0; n < N; n++) {
    const float* s = scores + n * E;
    // dL/ds over the chosen experts: w_k = scale·s_k / S with S = Σ_j s_j (+ eps), or scale·s_k.
    std::vector<double> ds(static_cast<size_t>(E), 0.0);
    double S = 0, dot = 0;
    for (int k = 0; k < K; k++) S += s[idx[n * K + k]];
    S += moe_norm_eps(r);
    for (int k = 0; k < K; k++) dot += double(dw[n * K + k]) * s[idx[n * K + k]];
    for (int k = 0; k < K; k++) {
      const int e = idx[n * K + k];
      ds[size_t(e)] = r.norm_topk ? r.scale * (double(dw[n * K + k]) / S - dot / (S * S)) : r.scale * dw[n * K + k];
    }
    if (r.sigmoid) {
      for (int e = 0; e < E; e++) dlogits[n * E + e] = float(ds[size_t(e)] * s[e] * (1.0 - s[e]));
    } else {
      double sds = 0;
      for (int e = 0; e < E; e++) sds += ds[size_t(e)] * s[e];
      for (int e = 0; e < E; e++) dlogits[n * E + e] = float(s[e] * (ds[size_t(e)] - sds));
    }
  }
}

void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E) {
  // Expert by expert, tokens in order: the stable sort by expert, written as a search.
  int32_t r = 0;
  for (int e = 0; e < E; e++) {
    offsets[e] = r;
    for (int64_t n = 0; n < N; n++)
      for (int k = 0; k < K; k++)
        if (idx[n * K + k] == e) {
          row_token[r] = int32_t(n);
          slot[n * K + k] = r;
          r++;
        }
  }
  offsets[E] = r;
}

void moe_gather(float* xs, const float* x, const int32_t* row_token, int64_t R, int C) {
  for (int64_t r = 0; r < R; r++)
    for (int c = 0; c < C; c++) xs[r * C + c] = x[int64_t(row_token[r]) * C + c];
}

void moe_gather_backward(float* dx, const float* extra, const float* dxs, const int32_t* slot, int64_t N, int K,
                         int C) {
  for (int64_t n = 0; n < N; n++)
    for (int c = 0; c < C; c++) {
      double acc = dx[n * C + c];
      if (extra) acc += extra[n * C + c];
      for (int k = 0; k < K; k++) acc += dxs[int64_t(slot[n * K + k]) * C + c];
      dx[n * C + c] = float(acc);
    }
}

void moe_combine(float* y, const float* residual, const float* ys, const int32_t* slot, const float* w, int64_t N,
                 int K, int C) {
  for (int64_t n = 0; n < N; n++)
    for (int c = 0; c < C; c++) {
      double acc = residual[n * C + c];
      for (int k = 0; k < K; k++) acc += double(w[n * K + k]) * ys[int64_t(slot[n * K + k]) * C + c];
      y[n * C + c] = float(acc);
    }
}

void moe_combine_backward(float* dys, float* dw, const float* dy, const float* ys, const int32_t* slot,
                          const float* w, int64_t N, int K, int C) {
  for (int64_t n = 0; n < N; n++)
    for (int k = 0; k < K; k++) {
      const int64_t r = slot[n * K + k];
      double acc = 0;
      for (int c = 0; c < C; c++) {
        dys[r * C + c] = w[n * K + k] * dy[n * C + c];
        acc += double(dy[n * C + c]) * ys[r * C + c];
      }
      dw[n * K + k] = float(acc);
    }
}

void grouped_linear_forward(float* y, int64_t ldy, const float* x, const float* w, const int32_t* offsets, int E,
                            int in, int out) {
  for (int e = 0; e < E; e++) {
    const float* W = w + int64_t(e) * out * in;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r++)
      for (int o = 0; o < out; o++) {
        double acc = 0;
        for (int i = 0; i < in; i++) acc += double(x[r * in + i]) * W[int64_t(o) * in + i];
        y[r * ldy + o] = float(acc);
      }
  }
}

void grouped_linear_backward(float* dx, float beta, float* dw, const float* dy, int64_t ldy, const float* x,
                             const float* w, const int32_t* offsets, int E, int in, int out) {
  for (int e = 0; e < E; e++) {
    const float* W = w + int64_t(e) * out * in;
    if (dx)
      for (int64_t r = offsets[e]; r < offsets[e + 1]; r++)
        for (int i = 0; i < in; i++) {
          double acc = beta != 0.0f ? double(beta) * dx[r * in + i] : 0.0;
          for (int o = 0; o < out; o++) acc += double(dy[r * ldy + o]) * W[int64_t(o) * in + i];
          dx[r * in + i] = float(acc);
        }
    if (dw)
      for (int o = 0; o < out; o++)
        for (int i = 0; i < in; i++) {
          double acc = dw[(int64_t(e) * out + o) * in + i];
          for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) acc += double(dy[r * ldy + o]) * x[r * in + i];
          dw[(int64_t(e) * out + o) * in + i] = float(acc);
        }
  }
}

double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha) {
  const int E = r.E, K = r.K;
  double loss = 0;
  for (int s = 0; s < S; s++) {
    const int64_t t0 = starts[s], t1 = starts[s + 1], T = t1 - t0;
    for (int i = 0; i < E; i++) {
      int64_t count = 0;
      double p = 0;  // Σ_t s'_{i,t}
      for (int64_t t = t0; t < t1; t++) {
        for (int k = 0; k < K; k++) count += idx[t * K + k] == i;
        double sum = 0;
        for (int j = 0; j < E; j++) sum += scores[t * E + j];
        p += scores[t * E + i] / sum;
      }
      const double fi = T ? double(E) / (double(K) * double(T)) * double(count) : 0.0;
      f[int64_t(s) * E + i] = float(fi);
      loss += double(alpha) * double(float(fi)) * p;
    }
  }
  return loss;
}

void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale) {
  const int E = r.E;
  for (int s = 0; s < S; s++)
    for (int64_t t = starts[s]; t < starts[s + 1]; t++) {
      const float* sc = scores + t * E;
      double sum = 0, gs = 0;
      for (int j = 0; j < E; j++) sum += sc[j];
      // d/ds'_i = scale·f_i; through s' = s / Σ s: ds_j = (g_j − Σ_i g_i s'_i) / Σ s.
      for (int i = 0; i < E; i++) gs += double(scale) * f[int64_t(s) * E + i] * sc[i] / sum;
      std::vector<double> ds(static_cast<size_t>(E));
      for (int j = 0; j < E; j++) ds[size_t(j)] = (double(scale) * f[int64_t(s) * E + j] - gs) / sum;
      if (r.sigmoid) {
        for (int j = 0; j < E; j++) dlogits[t * E + j] += float(ds[size_t(j)] * sc[j] * (1.0 - sc[j]));
      } else {
        double d = 0;
        for (int j = 0; j < E; j++) d += ds[size_t(j)] * sc[j];
        for (int j = 0; j < E; j++) dlogits[t * E + j] += float(sc[j] * (ds[size_t(j)] - d));
      }
    }
}

}  // namespace kiln::ref
