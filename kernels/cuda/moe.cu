// Mixture-of-experts ops on the GPU (kernels/moe.h). First versions, written for clarity and determinism:
//   route, route backward, the balance loss's backward: one thread per token, serial over its E experts (E is
//     at most a few hundred; the top-k is K passes of an argmax, ties to the lower index as on the CPU).
//   dispatch: one block; thread e counts and places expert e's choices in token order (stable, no atomics).
//   gather, combine and their backwards: one thread per (row, column), the K terms summed in k order.
//   grouped products: a tiled SIMT kernel (32×32 output tiles, fp32 accumulation) whose blocks find their
//     expert and row tiles from the device offsets, so the host never reads them (graph capture works). dW_e is one
//     block per output tile per expert, summing its rows in order (deterministic, +=).
#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/gpu.h"
#include "kernels/cuda/simt.cuh"
#include "kernels/moe.h"

namespace kiln::cuda {
namespace {

KILN_DEVICE float ld1(const float* p) { return *p; }
KILN_DEVICE float ld1(const uint16_t* p) { return simt::bf16_to_f32(*p); }
KILN_DEVICE void st1(float* p, float v) { *p = v; }
KILN_DEVICE void st1(uint16_t* p, float v) { *p = simt::f32_to_bf16(v); }

cudaStream_t cs(void* s) { return static_cast<cudaStream_t>(s); }
unsigned blocks_for(int64_t n, int threads) { return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65535))); }

// ------------------------------------------------------------------------------------------- routing

KILN_GLOBAL void __launch_bounds__(128) route_kernel(float* scores, int32_t* idx, float* wout, const float* logits,
                                                     const float* bias, int64_t N, MoeRouting r) {
  const int E = r.E, K = r.K, G = r.groups, per = E / G;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const float* u = logits + n * E;
    float* s = scores + n * E;
    if (r.sigmoid) {
      for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-u[e]));
    } else {
      float mx = u[0], sum = 0;
      for (int e = 1; e < E; e++) mx = fmaxf(mx, u[e]);
      for (int e = 0; e < E; e++) sum += (s[e] = expf(u[e] - mx));
      const float inv = 1.0f / sum;
      for (int e = 0; e < E; e++) s[e] *= inv;
    }
    // Kept groups as a bit mask (G <= 64, checked on the host): the top `topk_groups` by their two best s + b.
    uint64_t kept = ~uint64_t(0);
    if (G > 1) {
      uint64_t taken = 0;
      for (int j = 0; j < r.topk_groups; j++) {
        int best = -1;
        float bv = -INFINITY;
        for (int g = 0; g < G; g++) {
          if (taken >> g & 1) continue;
          float a = -INFINITY, b = -INFINITY;
          for (int i = g * per; i < (g + 1) * per; i++) {
            const float c = s[i] + (bias ? bias[i] : 0.0f);
            if (c > a)
              b = a, a = c;
            else if (c > b)
              b = c;
          }
          if (best < 0 || a + b > bv) best = g, bv = a + b;
        }
        taken |= uint64_t(1) << best;
      }
      kept = taken;
    }
    // K passes of an argmax over the unchosen experts; experts of dropped groups compete with 0 (as on the CPU).
    int32_t* id = idx + n * K;
    for (int k = 0; k < K; k++) {
      int best = -1;
      float bv = -INFINITY;
      for (int e = 0; e < E; e++) {
        bool used = false;
        for (int j = 0; j < k; j++) used |= id[j] == e;
        if (used) continue;
        const float c = (kept >> (e / per) & 1) ? s[e] + (bias ? bias[e] : 0.0f) : 0.0f;
        if (best < 0 || c > bv) best = e, bv = c;
      }
      id[k] = best;
    }
    float sum = 0;
    for (int k = 0; k < K; k++) sum += s[id[k]];
    const float norm = r.norm_topk ? r.scale / (sum + moe_norm_eps(r)) : r.scale;
    for (int k = 0; k < K; k++) wout[n * K + k] = s[id[k]] * norm;
  }
}

KILN_GLOBAL void __launch_bounds__(128) route_backward_kernel(float* dlogits, const float* dw, const float* scores,
                                                              const int32_t* idx, int64_t N, MoeRouting r) {
  const int E = r.E, K = r.K;
  for (int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const float* s = scores + n * E;
    const int32_t* id = idx + n * K;
    const float* g = dw + n * K;
    float* du = dlogits + n * E;
    float S = moe_norm_eps(r), dot = 0;
    for (int k = 0; k < K; k++) S += s[id[k]], dot += g[k] * s[id[k]];
    // du holds dL/ds first (zero off the chosen experts), then the affinity's derivative is applied.
    for (int e = 0; e < E; e++) du[e] = 0.0f;
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

void check_routing(const MoeRouting& r, const char* what) {
  KILN_CHECK(r.E >= 1 && r.K >= 1 && r.K <= r.E && r.groups >= 1 && r.groups <= 64 && r.E % r.groups == 0 &&
                 r.topk_groups >= 1 && r.topk_groups <= r.groups,
             what, ": bad routing E=", r.E, " K=", r.K, " groups=", r.groups, " topk_groups=", r.topk_groups,
             " (the CUDA kernel takes at most 64 groups)");
}

// ------------------------------------------------------------------------------------------- dispatch

KILN_GLOBAL void __launch_bounds__(256) dispatch_kernel(int32_t* offsets, int32_t* row_token, int32_t* slot,
                                                        const int32_t* idx, int64_t NK, int K, int E) {
  for (int e = int(threadIdx.x); e < E; e += int(blockDim.x)) {
    int32_t c = 0;
    for (int64_t i = 0; i < NK; i++) c += idx[i] == e;
    offsets[e + 1] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[0] = 0;
    for (int e = 0; e < E; e++) offsets[e + 1] += offsets[e];
  }
  __syncthreads();
  for (int e = int(threadIdx.x); e < E; e += int(blockDim.x)) {
    int32_t next = offsets[e];
    for (int64_t i = 0; i < NK; i++)
      if (idx[i] == e) {
        row_token[next] = int32_t(i / K);
        slot[i] = next++;
      }
  }
}

// ------------------------------------------------------------------------------------------- gather / combine

template <class T>
KILN_GLOBAL void __launch_bounds__(256) gather_kernel(T* xs, const T* x, const int32_t* row_token, int64_t R, int C) {
  const int64_t total = R * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    xs[i] = x[int64_t(row_token[i / C]) * C + i % C];
}

template <class T>
KILN_GLOBAL void __launch_bounds__(256) gather_backward_kernel(T* dx, const T* extra, const T* dxs,
                                                               const int32_t* slot, int64_t N, int K, int C) {
  const int64_t total = N * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    float d = ld1(dx + i);
    if (extra) d += ld1(extra + i);
    for (int k = 0; k < K; k++) d += ld1(dxs + int64_t(slot[n * K + k]) * C + c);
    st1(dx + i, d);
  }
}

template <class T>
KILN_GLOBAL void __launch_bounds__(256) combine_kernel(float* y, const float* residual, const T* ys,
                                                       const int32_t* slot, const float* w, int64_t N, int K, int C) {
  const int64_t total = N * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    float v = residual[i];
    for (int k = 0; k < K; k++) v += w[n * K + k] * ld1(ys + int64_t(slot[n * K + k]) * C + c);
    y[i] = v;
  }
}

// dys rows: one thread per element. dw: one warp per (token, k), a fixed-order warp reduction.
template <class T>
KILN_GLOBAL void __launch_bounds__(256) combine_backward_dys_kernel(T* dys, const T* dy, const int32_t* slot,
                                                                    const float* w, int64_t N, int K, int C) {
  const int64_t total = N * K * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t nk = i / C, c = i % C;
    st1(dys + int64_t(slot[nk]) * C + c, w[nk] * ld1(dy + (nk / K) * C + c));
  }
}

template <class T>
KILN_GLOBAL void __launch_bounds__(256) combine_backward_dw_kernel(float* dw, const T* dy, const T* ys,
                                                                   const int32_t* slot, int64_t N, int K, int C) {
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t nk = int64_t(blockIdx.x) * (blockDim.x / 32) + simt::warp_id(); nk < N * K; nk += warps) {
    const T* g = dy + (nk / K) * C;
    const T* v = ys + int64_t(slot[nk]) * C;
    float acc = 0;
    for (int c = simt::lane_id(); c < C; c += 32) acc += ld1(g + c) * ld1(v + c);
    acc = simt::warp_sum(acc);
    if (simt::lane_id() == 0) dw[nk] = acc;
  }
}

// ------------------------------------------------------------------------------------------- grouped products

constexpr int kTile = 32, kTK = 16, kThreads = 256;

// 32×32 tiles of out[m, n] (= or beta·out +) Σ_k A(m, k)·B(k, n), A(m, k) = A[m·sam + k·sak],
// B(k, n) = B[k·sbk + n·sbn]. mode 0 (forward, dx): the rows are expert e's [offsets[e], offsets[e+1]); the
// blocks of a grid column walk the row tiles of all experts (tile t, t + gridDim.y, ...), each tile's expert
// found from the device offsets, so the host never reads them (the decoder captures these launches in a CUDA
// graph). W_e is B (B + e·out·in). mode 1 (dW): the block's expert is blockIdx.z, its rows the reduction index,
// m and n tile dW_e. mode 2: one dense product of M rows (the router), grid-strided the same way.
template <class T, class TB, class O>
KILN_GLOBAL void __launch_bounds__(kThreads)
    grouped_kernel(O* out, int64_t ldo, float beta, const T* A, int64_t sam, int64_t sak, const TB* B, int64_t sbk,
                   int64_t sbn, int64_t wstride, const int32_t* offsets, int E, int M, int Ncols, int Kdim, int mode) {
  float* as = simt::dynamic_smem<float>();  // [kTile][kTK + 1]
  float* bs = as + kTile * (kTK + 1);       // [kTK][kTile + 1]
  const int tid = int(threadIdx.x), tx = tid % 32, ty = tid / 32, n0 = int(blockIdx.x) * kTile;
  for (int tile = int(blockIdx.y);; tile += int(gridDim.y)) {  // uniform over the block: barriers stay matched
    int e = 0, m0 = 0, rows = 0, kdim = Kdim;
    int64_t arow0 = 0;
    O* o = out;
    if (mode == 0) {
      int t = tile;
      for (e = 0; e < E; e++) {
        const int n = offsets[e + 1] - offsets[e], tiles = (n + kTile - 1) / kTile;
        if (t < tiles) break;
        t -= tiles;
      }
      if (e == E) return;  // past the last tile
      m0 = t * kTile;
      rows = offsets[e + 1] - offsets[e];
      arow0 = offsets[e];
      o += arow0 * ldo;
    } else if (mode == 2) {
      m0 = tile * kTile;
      rows = M;
      if (m0 >= M) return;
    } else {
      if (tile != int(blockIdx.y)) return;  // dW: one tile per block
      e = int(blockIdx.z);
      m0 = tile * kTile;
      rows = M;
      kdim = offsets[e + 1] - offsets[e];
      arow0 = offsets[e];
      o += int64_t(e) * wstride;
    }
    const T* Ae = mode == 0 ? A + arow0 * sam : A + arow0 * sak;
    const TB* Be = mode == 0 ? B + int64_t(e) * wstride : B + arow0 * sbk;
    float acc[4] = {0, 0, 0, 0};
    for (int k0 = 0; k0 < kdim; k0 += kTK) {
      for (int i = tid; i < kTile * kTK; i += kThreads) {
        const int mm = i / kTK, kk = i % kTK, gm = m0 + mm, gk = k0 + kk;
        as[mm * (kTK + 1) + kk] = gm < rows && gk < kdim ? ld1(Ae + int64_t(gm) * sam + int64_t(gk) * sak) : 0.0f;
        const int kb = i / kTile, nb = i % kTile, gkb = k0 + kb, gn = n0 + nb;
        bs[kb * (kTile + 1) + nb] = gkb < kdim && gn < Ncols ? ld1(Be + int64_t(gkb) * sbk + int64_t(gn) * sbn) : 0.0f;
      }
      __syncthreads();
      for (int kk = 0; kk < kTK; kk++) {
        const float b = bs[kk * (kTile + 1) + tx];
        for (int j = 0; j < 4; j++) acc[j] += as[(ty + 8 * j) * (kTK + 1) + kk] * b;
      }
      __syncthreads();
    }
    const int gn = n0 + tx;
    for (int j = 0; j < 4 && gn < Ncols; j++) {
      const int gm = m0 + ty + 8 * j;
      if (gm >= rows) continue;
      O* p = o + int64_t(gm) * ldo + gn;
      st1(p, beta != 0.0f ? beta * ld1(p) + acc[j] : acc[j]);
    }
  }
}

constexpr size_t kGroupedSmem = sizeof(float) * (kTile * (kTK + 1) + kTK * (kTile + 1));

// Blocks per grid column for the row tiles of all experts (the rows are on the device): each walks several
// tiles when there are more.
unsigned row_blocks(int E) { return unsigned(std::min(E + 32, 1024)); }

template <class T, class TW>
void grouped_fwd(T* y, int64_t ldy, const T* x, const TW* w, const int32_t* offsets, int E, int in, int out,
                 void* stream) {
  KILN_CHECK(E >= 1 && in >= 1 && out >= 1 && ldy >= out, "cuda::grouped_linear_forward: bad sizes E=", E,
             " in=", in, " out=", out, " ldy=", ldy);
  simt::launch(grouped_kernel<T, TW, T>, dim3(unsigned((out + kTile - 1) / kTile), row_blocks(E)), dim3(kThreads),
               kGroupedSmem, cs(stream), y, ldy, 0.0f, x, int64_t(in), int64_t(1), w, int64_t(1), int64_t(in),
               int64_t(out) * in, offsets, E, 0, out, in, 0);
}

template <class T, class TW>
void grouped_bwd(T* dx, float beta, float* dw, const T* dy, int64_t ldy, const T* x, const TW* w,
                 const int32_t* offsets, int E, int in, int out, void* stream) {
  KILN_CHECK(E >= 1 && in >= 1 && out >= 1 && ldy >= out, "cuda::grouped_linear_backward: bad sizes E=", E,
             " in=", in, " out=", out, " ldy=", ldy);
  if (dx)  // dx_e = dy_e · W_e: A = dy (row stride ldy), B(k = o, n = i) = W_e[o·in + i]
    simt::launch(grouped_kernel<T, TW, T>, dim3(unsigned((in + kTile - 1) / kTile), row_blocks(E)), dim3(kThreads),
                 kGroupedSmem, cs(stream), dx, int64_t(in), beta, dy, ldy, int64_t(1), w, int64_t(in), int64_t(1),
                 int64_t(out) * in, offsets, E, 0, in, out, 0);
  if (dw)  // dW_e[o, i] += Σ_r dy[r, o]·x[r, i]: A(m = o, k = r) = dy[r·ldy + o], B(k = r, n = i) = x[r·in + i]
    simt::launch(grouped_kernel<T, T, float>,
                 dim3(unsigned((in + kTile - 1) / kTile), unsigned((out + kTile - 1) / kTile), unsigned(E)),
                 dim3(kThreads), kGroupedSmem, cs(stream), dw, int64_t(in), 1.0f, dy, int64_t(1), ldy, x,
                 int64_t(in), int64_t(1), int64_t(out) * in, offsets, E, out, in, 0, 1);
}

// ------------------------------------------------------------------------------------------- balance loss

// inv[t] = 1 / Σ_j s[t, j].
KILN_GLOBAL void __launch_bounds__(128) row_inv_kernel(float* inv, const float* scores, int64_t N, int E) {
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < N; t += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0;
    for (int j = 0; j < E; j++) sum += scores[t * E + j];
    inv[t] = 1.0f / sum;
  }
}

// One block per sequence, threads over experts; thread 0 sums Σ_i f_i·P_i in expert order (deterministic).
KILN_GLOBAL void __launch_bounds__(128) seq_aux_kernel(float* f, double* loss, const float* scores, const float* inv,
                                                       const int32_t* idx, const int32_t* starts, int E, int K) {
  const int s = int(blockIdx.x);
  const int64_t t0 = starts[s], t1 = starts[s + 1], T = t1 - t0;
  float* fp = simt::dynamic_smem<float>();  // [E] f·P per expert
  const float norm = T ? float(E) / (float(K) * float(T)) : 0.0f;
  for (int i = int(threadIdx.x); i < E; i += int(blockDim.x)) {
    float cnt = 0, p = 0;
    for (int64_t t = t0; t < t1; t++) {
      for (int k = 0; k < K; k++) cnt += idx[t * K + k] == i ? 1.0f : 0.0f;
      p += scores[t * E + i] * inv[t];
    }
    f[int64_t(s) * E + i] = cnt * norm;
    fp[i] = cnt * norm * p;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double l = 0;
    for (int i = 0; i < E; i++) l += double(fp[i]);
    loss[s] = l;
  }
}

KILN_GLOBAL void __launch_bounds__(128) seq_aux_backward_kernel(float* dlogits, const float* f, const float* scores,
                                                                const int32_t* starts, int E, bool sigmoid,
                                                                float scale) {
  const int s = int(blockIdx.x);
  const float* fs = f + int64_t(s) * E;
  for (int64_t t = starts[s] + threadIdx.x; t < starts[s + 1]; t += blockDim.x) {
    const float* sc = scores + t * E;
    float* du = dlogits + t * E;
    float sum = 0, gs = 0;
    for (int j = 0; j < E; j++) sum += sc[j];
    const float inv = 1.0f / sum;
    for (int j = 0; j < E; j++) gs += scale * fs[j] * sc[j] * inv;
    if (sigmoid) {
      for (int j = 0; j < E; j++) du[j] += (scale * fs[j] - gs) * inv * sc[j] * (1.0f - sc[j]);
    } else {
      float d = 0;
      for (int j = 0; j < E; j++) d += (scale * fs[j] - gs) * inv * sc[j];
      for (int j = 0; j < E; j++) du[j] += sc[j] * ((scale * fs[j] - gs) * inv - d);
    }
  }
}

KILN_GLOBAL void __launch_bounds__(128) count_kernel(float* load, const int32_t* offsets, int E) {
  for (int e = int(blockIdx.x * blockDim.x + threadIdx.x); e < E; e += int(gridDim.x * blockDim.x))
    load[e] += float(offsets[e + 1] - offsets[e]);
}

}  // namespace

void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r, void* stream) {
  check_routing(r, "cuda::moe_route");
  if (N <= 0) return;
  simt::launch(route_kernel, dim3(blocks_for(N, 128)), dim3(128), 0, cs(stream), scores, idx, w, logits, bias, N, r);
}

void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r, void* stream) {
  check_routing(r, "cuda::moe_route_backward");
  if (N <= 0) return;
  simt::launch(route_backward_kernel, dim3(blocks_for(N, 128)), dim3(128), 0, cs(stream), dlogits, dw, scores, idx,
               N, r);
}

void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E,
                  void* stream) {
  KILN_CHECK(E >= 1 && K >= 1 && N >= 0 && N * K < (int64_t(1) << 31), "cuda::moe_dispatch: bad sizes N=", N,
             " K=", K, " E=", E);
  simt::launch(dispatch_kernel, dim3(1), dim3(unsigned(std::min(256, (E + 31) / 32 * 32))), 0, cs(stream), offsets,
               row_token, slot, idx, N * K, K, E);
}

#define KILN_MOE_TYPED(T)                                                                                           \
  void moe_gather(T* xs, const T* x, const int32_t* row_token, int64_t R, int C, void* stream) {                    \
    if (R * C <= 0) return;                                                                                          \
    simt::launch(gather_kernel<T>, dim3(blocks_for(R * C, 256)), dim3(256), 0, cs(stream), xs, x, row_token, R, C);  \
  }                                                                                                                  \
  void moe_gather_backward(T* dx, const T* extra, const T* dxs, const int32_t* slot, int64_t N, int K, int C,       \
                           void* stream) {                                                                           \
    if (N * C <= 0) return;                                                                                          \
    simt::launch(gather_backward_kernel<T>, dim3(blocks_for(N * C, 256)), dim3(256), 0, cs(stream), dx, extra, dxs,  \
                 slot, N, K, C);                                                                                     \
  }                                                                                                                  \
  void moe_combine(float* y, const float* residual, const T* ys, const int32_t* slot, const float* w, int64_t N,    \
                   int K, int C, void* stream) {                                                                     \
    if (N * C <= 0) return;                                                                                          \
    simt::launch(combine_kernel<T>, dim3(blocks_for(N * C, 256)), dim3(256), 0, cs(stream), y, residual, ys, slot,   \
                 w, N, K, C);                                                                                        \
  }                                                                                                                  \
  void moe_combine_backward(T* dys, float* dw, const T* dy, const T* ys, const int32_t* slot, const float* w,       \
                            int64_t N, int K, int C, void* stream) {                                                 \
    if (N * K * C <= 0) return;                                                                                      \
    simt::launch(combine_backward_dys_kernel<T>, dim3(blocks_for(N * K * C, 256)), dim3(256), 0, cs(stream), dys,    \
                 dy, slot, w, N, K, C);                                                                              \
    simt::launch(combine_backward_dw_kernel<T>, dim3(blocks_for(N * K, 8)), dim3(256), 0, cs(stream), dw, dy, ys,    \
                 slot, N, K, C);                                                                                     \
  }                                                                                                                  \
  void grouped_linear_forward(T* y, int64_t ldy, const T* x, const T* w, const int32_t* offsets, int E, int in,     \
                              int out, void* stream) {                                                               \
    grouped_fwd(y, ldy, x, w, offsets, E, in, out, stream);                                                          \
  }                                                                                                                  \
  void grouped_linear_backward(T* dx, float beta, float* dw, const T* dy, int64_t ldy, const T* x, const T* w,      \
                               const int32_t* offsets, int E, int in, int out, void* stream) {                       \
    grouped_bwd(dx, beta, dw, dy, ldy, x, w, offsets, E, in, out, stream);                                           \
  }
KILN_MOE_TYPED(uint16_t)
KILN_MOE_TYPED(float)
#undef KILN_MOE_TYPED

void grouped_linear_forward(uint16_t* y, int64_t ldy, const uint16_t* x, const float* w, const int32_t* offsets, int E,
                            int in, int out, void* stream) {
  grouped_fwd(y, ldy, x, w, offsets, E, in, out, stream);
}
void grouped_linear_backward(uint16_t* dx, float beta, float* dw, const uint16_t* dy, int64_t ldy, const uint16_t* x,
                             const float* w, const int32_t* offsets, int E, int in, int out, void* stream) {
  grouped_bwd(dx, beta, dw, dy, ldy, x, w, offsets, E, in, out, stream);
}

void router_forward(float* logits, const uint16_t* x, const float* w, int64_t N, int in, int E, void* stream) {
  KILN_CHECK(N >= 0 && N < (int64_t(1) << 31) && in >= 1 && E >= 1, "cuda::router_forward: bad sizes N=", N, " in=", in,
             " E=", E);
  if (N == 0) return;
  simt::launch(grouped_kernel<uint16_t, float, float>, dim3(unsigned((E + kTile - 1) / kTile), unsigned(std::min<int64_t>((N + kTile - 1) / kTile, 65535))),
               dim3(kThreads), kGroupedSmem, cs(stream), logits, int64_t(E), 0.0f, x, int64_t(in), int64_t(1), w,
               int64_t(1), int64_t(in), int64_t(0), nullptr, 1, int(N), E, in, 2);
}

void router_backward(uint16_t* dx, float* dw, const float* dlogits, const uint16_t* x, const float* w, int64_t N,
                     int in, int E, void* stream) {
  KILN_CHECK(N >= 0 && N < (int64_t(1) << 31) && in >= 1 && E >= 1, "cuda::router_backward: bad sizes N=", N,
             " in=", in, " E=", E);
  if (N == 0) return;
  if (dx)  // dx[n, i] = Σ_e du[n, e]·W[e, i]
    simt::launch(grouped_kernel<float, float, uint16_t>,
                 dim3(unsigned((in + kTile - 1) / kTile), unsigned(std::min<int64_t>((N + kTile - 1) / kTile, 65535))), dim3(kThreads),
                 kGroupedSmem, cs(stream), dx, int64_t(in), 0.0f, dlogits, int64_t(E), int64_t(1), w, int64_t(in),
                 int64_t(1), int64_t(0), nullptr, 1, int(N), in, E, 2);
  if (dw)  // dW[e, i] += Σ_n du[n, e]·x[n, i]
    simt::launch(grouped_kernel<float, uint16_t, float>,
                 dim3(unsigned((in + kTile - 1) / kTile), unsigned((E + kTile - 1) / kTile)), dim3(kThreads),
                 kGroupedSmem, cs(stream), dw, int64_t(in), 1.0f, dlogits, int64_t(1), int64_t(E), x, int64_t(in),
                 int64_t(1), int64_t(0), nullptr, 1, E, in, int(N), 2);
}

void moe_count(float* load, const int32_t* offsets, int E, void* stream) {
  if (E <= 0) return;
  simt::launch(count_kernel, dim3(blocks_for(E, 128)), dim3(128), 0, cs(stream), load, offsets, E);
}

double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha, void* stream) {
  KILN_CHECK(S >= 1 && r.E >= 1 && r.K >= 1, "cuda::moe_seq_aux: bad sizes S=", S, " E=", r.E, " K=", r.K);
  const int64_t N = starts[S];
  gpu::DeviceBuffer dstarts(sizeof(int32_t) * size_t(S + 1), "moe_seq_aux starts"),
      inv(sizeof(float) * size_t(std::max<int64_t>(N, 1)), "moe_seq_aux inv"),
      loss(sizeof(double) * size_t(S), "moe_seq_aux loss");
  gpu::copy_to_device(dstarts.data(), starts, sizeof(int32_t) * size_t(S + 1));
  if (N > 0)
    simt::launch(row_inv_kernel, dim3(blocks_for(N, 128)), dim3(128), 0, cs(stream), inv.as<float>(), scores, N, r.E);
  simt::launch(seq_aux_kernel, dim3(unsigned(S)), dim3(128), sizeof(float) * size_t(r.E), cs(stream), f,
               loss.as<double>(), scores, inv.as<float>(), idx, dstarts.as<int32_t>(), r.E, r.K);
  std::vector<double> l(static_cast<size_t>(S));
  gpu::copy_to_host(l.data(), loss.data(), sizeof(double) * size_t(S));
  double total = 0;
  for (double v : l) total += double(alpha) * v;
  return total;
}

void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale, void* stream) {
  KILN_CHECK(S >= 1 && r.E >= 1, "cuda::moe_seq_aux_backward: bad sizes S=", S, " E=", r.E);
  gpu::DeviceBuffer dstarts(sizeof(int32_t) * size_t(S + 1), "moe_seq_aux starts");
  gpu::copy_to_device(dstarts.data(), starts, sizeof(int32_t) * size_t(S + 1));
  simt::launch(seq_aux_backward_kernel, dim3(unsigned(S)), dim3(128), 0, cs(stream), dlogits, f, scores,
               dstarts.as<int32_t>(), r.E, r.sigmoid, scale);
  gpu::synchronize();  // dstarts is freed on return
}

}  // namespace kiln::cuda
