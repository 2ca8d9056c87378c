// Mixture-of-experts ops on the CPU: routing and combine parallel over tokens, dispatch a serial counting
// sort (N·K integers), the experts' products one OpenBLAS sgemm per expert over its contiguous rows.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/matmul.h"
#include "kernels/moe.h"

namespace kiln::cpu {

namespace {
constexpr int64_t kParallelRows = 64;  // below this many tokens the row loops run on the calling thread

// The k largest of v[0, n) (indices into out), the lowest index first on ties; v is clobbered.
void top_k(int32_t* out, float* v, int n, int k) {
  for (int j = 0; j < k; j++) {
    int best = 0;
    for (int i = 1; i < n; i++)
      if (v[i] > v[best]) best = i;
    out[j] = best;
    v[best] = -INFINITY;
  }
}
}  // namespace

void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r) {
  const int E = r.E, K = r.K, G = r.groups, per = E / G;
#pragma omp parallel if (N >= kParallelRows)
  {
    std::vector<float> choice(static_cast<size_t>(E)), gs(static_cast<size_t>(G));
    std::vector<int32_t> gi(static_cast<size_t>(G));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      const float* u = logits + n * E;
      float* s = scores + n * E;
      if (r.sigmoid) {
        for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + std::exp(-u[e]));
      } else {
        float mx = u[0], sum = 0;
        for (int e = 1; e < E; e++) mx = std::max(mx, u[e]);
        for (int e = 0; e < E; e++) sum += (s[e] = std::exp(u[e] - mx));
        const float inv = 1.0f / sum;
        for (int e = 0; e < E; e++) s[e] *= inv;
      }
      for (int e = 0; e < E; e++) choice[size_t(e)] = s[e] + (bias ? bias[e] : 0.0f);
      if (G > 1) {
        for (int g = 0; g < G; g++) {  // the sum of the group's two highest s + b
          const float* c = choice.data() + g * per;
          float a = -INFINITY, b = -INFINITY;
          for (int i = 0; i < per; i++) {
            if (c[i] > a)
              b = a, a = c[i];
            else if (c[i] > b)
              b = c[i];
          }
          gs[size_t(g)] = a + b;
        }
        top_k(gi.data(), gs.data(), G, r.topk_groups);
        std::vector<bool> kept(size_t(G), false);
        for (int i = 0; i < r.topk_groups; i++) kept[size_t(gi[size_t(i)])] = true;
        for (int e = 0; e < E; e++)
          if (!kept[size_t(e / per)]) choice[size_t(e)] = 0.0f;
      }
      int32_t* id = idx + n * K;
      top_k(id, choice.data(), E, K);
      float sum = 0;
      for (int k = 0; k < K; k++) sum += s[id[k]];
      const float norm = r.norm_topk ? r.scale / (sum + moe_norm_eps(r)) : r.scale;
      for (int k = 0; k < K; k++) w[n * K + k] = s[id[k]] * norm;
    }
  }
}

void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r) {
  const int E = r.E, K = r.K;
#pragma omp parallel for schedule(static) if (N >= kParallelRows)
  for (int64_t n = 0; n < N; n++) {
    const float* s = scores + n * E;
    const int32_t* id = idx + n * K;
    const float* g = dw + n * K;
    float* du = dlogits + n * E;
    float S = moe_norm_eps(r), dot = 0;
    for (int k = 0; k < K; k++) S += s[id[k]], dot += g[k] * s[id[k]];
    // du holds dL/ds first (zero off the chosen experts), then the affinity's derivative is applied.
    std::memset(du, 0, sizeof(float) * size_t(E));
    for (int k = 0; k < K; k++) du[id[k]] = r.norm_topk ? r.scale * (g[k] - dot / S) / S : r.scale * g[k];
    if (r.sigmoid) {
      for (int k = 0; k < K; k++) du[id[k]] *= s[id[k]] * (1.0f - s[id[k]]);
    } else {
      float sds = 0;
      for (int k = 0; k < K; k++) sds += du[id[k]] * s[id[k]];
      for (int e = 0; e < E; e++) du[e] = s[e] * (du[e] - sds);
    }
  }
}

void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E) {
  // Counting sort: histogram, exclusive prefix sum, then placement in token order (stable).
  std::memset(offsets, 0, sizeof(int32_t) * size_t(E + 1));
  for (int64_t i = 0; i < N * K; i++) offsets[idx[i] + 1]++;
  for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
  std::vector<int32_t> next(offsets, offsets + E);
  for (int64_t i = 0; i < N * K; i++) {
    const int32_t r = next[size_t(idx[i])]++;
    row_token[r] = int32_t(i / K);
    slot[i] = r;
  }
}

void moe_gather(float* xs, const float* x, const int32_t* row_token, int64_t R, int C) {
#pragma omp parallel for schedule(static) if (R >= kParallelRows)
  for (int64_t r = 0; r < R; r++) std::memcpy(xs + r * C, x + int64_t(row_token[r]) * C, sizeof(float) * size_t(C));
}

void moe_gather_backward(float* dx, const float* extra, const float* dxs, const int32_t* slot, int64_t N, int K,
                         int C) {
#pragma omp parallel for schedule(static) if (N >= kParallelRows)
  for (int64_t n = 0; n < N; n++) {
    float* d = dx + n * C;
    if (extra)
#pragma omp simd
      for (int c = 0; c < C; c++) d[c] += extra[n * C + c];
    for (int k = 0; k < K; k++) {
      const float* src = dxs + int64_t(slot[n * K + k]) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) d[c] += src[c];
    }
  }
}

void moe_combine(float* y, const float* residual, const float* ys, const int32_t* slot, const float* w, int64_t N,
                 int K, int C) {
#pragma omp parallel for schedule(static) if (N >= kParallelRows)
  for (int64_t n = 0; n < N; n++) {
    float* out = y + n * C;
    if (out != residual + n * C) std::memcpy(out, residual + n * C, sizeof(float) * size_t(C));
    for (int k = 0; k < K; k++) {
      const float g = w[n * K + k];
      const float* src = ys + int64_t(slot[n * K + k]) * C;
#pragma omp simd
      for (int c = 0; c < C; c++) out[c] += g * src[c];
    }
  }
}

void moe_combine_backward(float* dys, float* dw, const float* dy, const float* ys, const int32_t* slot,
                          const float* w, int64_t N, int K, int C) {
#pragma omp parallel for schedule(static) if (N >= kParallelRows)
  for (int64_t n = 0; n < N; n++) {
    const float* g = dy + n * C;
    for (int k = 0; k < K; k++) {
      const int64_t r = slot[n * K + k];
      const float wk = w[n * K + k];
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int c = 0; c < C; c++) {
        dys[r * C + c] = wk * g[c];
        acc += g[c] * ys[r * C + c];
      }
      dw[n * K + k] = acc;
    }
  }
}

namespace {
// Runs fn(e) for every expert with rows. Many experts of few rows each (the usual MoE shape) run one expert per
// thread, each sgemm single-threaded (OpenBLAS's OpenMP build does not thread inside a parallel region): small
// products do not scale across threads, whole experts do. Few experts run one after another, each product
// threaded.
template <class Fn>
void for_experts(const int32_t* offsets, int E, Fn&& fn) {
  int busy = 0;
  for (int e = 0; e < E; e++) busy += offsets[e + 1] > offsets[e];
  if (busy >= 2 * omp_get_max_threads()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int e = 0; e < E; e++)
      if (offsets[e + 1] > offsets[e]) fn(e);
  } else {
    for (int e = 0; e < E; e++)
      if (offsets[e + 1] > offsets[e]) fn(e);
  }
}
}  // namespace

void grouped_linear_forward(float* y, int64_t ldy, const float* x, const float* w, const int32_t* offsets, int E,
                            int in, int out) {
  for_experts(offsets, E, [&](int e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    gemm(false, true, rows, out, in, 1.0f, x + r0 * in, in, w + int64_t(e) * out * in, in, 0.0f, y + r0 * ldy, ldy);
  });
}

void grouped_linear_backward(float* dx, float beta, float* dw, const float* dy, int64_t ldy, const float* x,
                             const float* w, const int32_t* offsets, int E, int in, int out) {
  for_experts(offsets, E, [&](int e) {
    const int64_t r0 = offsets[e], rows = offsets[e + 1] - r0;
    const float* W = w + int64_t(e) * out * in;
    if (dx) gemm(false, false, rows, in, out, 1.0f, dy + r0 * ldy, ldy, W, in, beta, dx + r0 * in, in);
    if (dw) gemm(true, false, out, in, rows, 1.0f, dy + r0 * ldy, ldy, x + r0 * in, in, 1.0f, dw + int64_t(e) * out * in, in);
  });
}

double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha) {
  const int E = r.E, K = r.K;
  double loss = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : loss) if (S > 1)
  for (int s = 0; s < S; s++) {
    const int64_t t0 = starts[s], t1 = starts[s + 1], T = t1 - t0;
    float* fs = f + int64_t(s) * E;
    std::vector<float> p(static_cast<size_t>(E), 0.0f);
    std::memset(fs, 0, sizeof(float) * size_t(E));
    for (int64_t t = t0; t < t1; t++) {
      for (int k = 0; k < K; k++) fs[idx[t * K + k]] += 1.0f;
      const float* sc = scores + t * E;
      float sum = 0;
      for (int j = 0; j < E; j++) sum += sc[j];
      const float inv = 1.0f / sum;
      for (int j = 0; j < E; j++) p[size_t(j)] += sc[j] * inv;
    }
    const float norm = T ? float(E) / (float(K) * float(T)) : 0.0f;
    double l = 0;
    for (int i = 0; i < E; i++) {
      fs[i] *= norm;
      l += double(fs[i]) * p[size_t(i)];
    }
    loss += double(alpha) * l;
  }
  return loss;
}

void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale) {
  const int E = r.E;
  for (int s = 0; s < S; s++) {
    const float* fs = f + int64_t(s) * E;
#pragma omp parallel for schedule(static) if (starts[s + 1] - starts[s] >= kParallelRows)
    for (int64_t t = starts[s]; t < starts[s + 1]; t++) {
      const float* sc = scores + t * E;
      float* du = dlogits + t * E;
      float sum = 0, gs = 0;
      for (int j = 0; j < E; j++) sum += sc[j];
      const float inv = 1.0f / sum;
      for (int j = 0; j < E; j++) gs += scale * fs[j] * sc[j] * inv;
      if (r.sigmoid) {
        for (int j = 0; j < E; j++) du[j] += (scale * fs[j] - gs) * inv * sc[j] * (1.0f - sc[j]);
      } else {
        float d = 0;
        for (int j = 0; j < E; j++) d += (scale * fs[j] - gs) * inv * sc[j];
        for (int j = 0; j < E; j++) du[j] += sc[j] * ((scale * fs[j] - gs) * inv - d);
      }
    }
  }
}

}  // namespace kiln::cpu
