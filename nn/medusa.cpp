#include "nn/medusa.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "kernels/gemv.h"
#include "kernels/matmul.h"

namespace kiln::nn {

namespace {
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// z = h·Wᵀ + b, u = h + SiLU(z) for N rows of head k.
void head_block(const MedusaShape& s, const float* params, int k, const float* h, int64_t N, float* z, float* u) {
  const int C = s.C;
  cpu::gemm(false, true, N, C, C, 1.0f, h, C, params + s.w_off(k), C, 0.0f, z, C);
  const float* b = params + s.b_off(k);
#pragma omp parallel for schedule(static) if (N * C > 65536)
  for (int64_t r = 0; r < N; r++)
    for (int c = 0; c < C; c++) {
      float& zz = z[r * C + c];
      zz += b[c];
      u[r * C + c] = h[r * C + c] + zz * sigmoid(zz);
    }
}
}  // namespace

void MedusaHeads::init_from_lm_head(const MedusaShape& s, float* params, const float* lm_head) {
  for (int k = 0; k < s.K; k++) {
    std::memset(params + s.w_off(k), 0, sizeof(float) * size_t(s.C) * s.C);
    std::memset(params + s.b_off(k), 0, sizeof(float) * size_t(s.C));
    std::memcpy(params + s.h_off(k), lm_head, sizeof(float) * size_t(s.V) * s.C);
  }
}

void MedusaHeads::forward(const float* h, int64_t N, float* logits, MedusaActivations& a) const {
  const MedusaShape& s = shape;
  const int64_t NC = N * s.C;
  a.N = N;
  a.z.resize(size_t(s.K * NC));
  a.u.resize(size_t(s.K * NC));
  for (int k = 0; k < s.K; k++)
    forward_head(k, h, N, logits + k * N * s.V, a.u.data() + k * NC, a.z.data() + k * NC);
}

void MedusaHeads::forward_head(int k, const float* h, int64_t N, float* logits, float* u, float* z) const {
  const MedusaShape& s = shape;
  KILN_CHECK(k >= 0 && k < s.K, "medusa: head ", k, " of ", s.K);
  if (!narrow.empty() || N == 1) {
    // Decoding: matrix-vector products that stream each matrix once (no packing as a gemm does).
    const float* b = params + s.b_off(k);
    for (int64_t r = 0; r < N; r++) {
      const float* hr = h + r * s.C;
      float *zr = z + r * s.C, *ur = u + r * s.C;
      if (narrow.empty())
        cpu::matvec_batch(zr, s.C, hr, s.C, 1, params + s.w_off(k), nullptr, s.C, s.C, false);
      else
        cpu::narrow_gemm(zr, s.C, hr, s.C, 1, narrow[size_t(2 * k)], nullptr, false);
      for (int c = 0; c < s.C; c++) {
        const float zz = zr[c] + b[c];
        zr[c] = zz;
        ur[c] = hr[c] + zz * sigmoid(zz);
      }
      if (narrow.empty())
        cpu::matvec_batch(logits + r * s.V, s.V, ur, s.C, 1, params + s.h_off(k), nullptr, s.V, s.C, false);
      else
        cpu::narrow_gemm(logits + r * s.V, s.V, ur, s.C, 1, narrow[size_t(2 * k + 1)], nullptr, false);
    }
    return;
  }
  head_block(s, params, k, h, N, z, u);
  cpu::gemm(false, true, N, s.V, s.C, 1.0f, u, s.C, params + s.h_off(k), s.C, 0.0f, logits, s.V);
}

void MedusaHeads::set_weight_format(WeightFormat f) {
  narrow.clear();
  narrow_storage.reset();
  if (f == WeightFormat::F32) return;
  const MedusaShape& s = shape;
  const size_t bw = narrow_bytes(f, s.C, s.C), bh = narrow_bytes(f, s.V, s.C);
  narrow_storage = std::make_shared<std::vector<uint64_t>>((size_t(s.K) * (bw + bh + 128)) / 8 + 8);
  char* p = reinterpret_cast<char*>(narrow_storage->data());
  auto align = [](char* q) { return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(q) + 63) & ~uintptr_t(63)); };
  for (int k = 0; k < s.K; k++) {
    p = align(p);
    narrow.push_back(narrow_convert(p, f, params + s.w_off(k), s.C, s.C, /*transposed=*/false));
    p = align(p + bw);
    narrow.push_back(narrow_convert(p, f, params + s.h_off(k), s.V, s.C, /*transposed=*/false));
    p += bh;
  }
}

void MedusaHeads::backward(const float* h, int64_t N, const float* dlogits, const MedusaActivations& a,
                           float* dh) const {
  const MedusaShape& s = shape;
  const int C = s.C, V = s.V;
  KILN_CHECK(grads && a.N == N, "medusa: backward without gradients or after a forward of other rows");
  const int64_t NC = N * C;
  std::vector<float> du(static_cast<size_t>(NC));
  for (int k = 0; k < s.K; k++) {
    const float* dl = dlogits + k * N * V;
    const float* u = a.u.data() + k * NC;
    const float* z = a.z.data() + k * NC;
    // logits = u·Hᵀ: dH += dlᵀ·u, du = dl·H.
    cpu::gemm(true, false, V, C, N, 1.0f, dl, V, u, C, 1.0f, grads + s.h_off(k), C);
    cpu::gemm(false, false, N, C, V, 1.0f, dl, V, params + s.h_off(k), C, 0.0f, du.data(), C);
    // u = h + SiLU(z): dh += du; dz = du·SiLU'(z) (in du's place), SiLU'(z) = σ(z)·(1 + z·(1 − σ(z))).
    if (dh)
      for (int64_t i = 0; i < NC; i++) dh[i] += du[size_t(i)];
    float* db = grads + s.b_off(k);
    for (int64_t r = 0; r < N; r++)
      for (int c = 0; c < C; c++) {
        const float zz = z[r * C + c], sg = sigmoid(zz);
        float& d = du[size_t(r * C + c)];
        d *= sg * (1.0f + zz * (1.0f - sg));
        db[c] += d;
      }
    // z = h·Wᵀ + b: dW += dzᵀ·h, dh += dz·W.
    cpu::gemm(true, false, C, C, N, 1.0f, du.data(), C, h, C, 1.0f, grads + s.w_off(k), C);
    if (dh) cpu::gemm(false, false, N, C, C, 1.0f, du.data(), C, params + s.w_off(k), C, 1.0f, dh, C);
  }
}

CEResult softmax_ce(const float* logits, const int32_t* targets, int64_t N, int V, float scale, float* dlogits) {
  CEResult res;
  double loss = 0;
  int64_t count = 0, correct = 0;
#pragma omp parallel for schedule(static) reduction(+ : loss, count, correct) if (N * V > 65536)
  for (int64_t r = 0; r < N; r++) {
    const float* x = logits + r * V;
    const int32_t t = targets[r];
    float* d = dlogits ? dlogits + r * V : nullptr;
    if (t < 0) {
      if (d) std::fill(d, d + V, 0.0f);
      continue;
    }
    int best = 0;
    for (int v = 1; v < V; v++)
      if (x[v] > x[best]) best = v;
    const float mx = x[best];
    double sum = 0;
    for (int v = 0; v < V; v++) sum += std::exp(double(x[v]) - mx);
    const double lse = mx + std::log(sum);
    loss += lse - double(x[t]);
    count++;
    correct += best == t;
    if (d) {
      for (int v = 0; v < V; v++) d[v] = float(std::exp(double(x[v]) - lse)) * scale;
      d[t] -= scale;
    }
  }
  res.loss_sum = loss;
  res.count = count;
  res.correct = correct;
  return res;
}

}  // namespace kiln::nn
