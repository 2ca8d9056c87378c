// Mixture-of-experts ops (DeepSeekMoE, Qwen3-MoE), in the order a MoE layer runs them:
//   route     router logits u [N, E] (fp32) -> affinities s (softmax over E, or sigmoid per expert), the top-K
//             experts of each token chosen by s + b (b: a per-expert selection bias, or none), optionally only
//             among the best `topk_groups` of `groups` groups (a group scored by the sum of its two highest
//             s + b); gate weights w from the unbiased s of the chosen experts, normalised to sum 1
//             (norm_topk) and times `scale` (routed_scaling_factor).
//   dispatch  a counting sort of the N·K choices by expert, stable in token order: expert e's rows are
//             [offsets[e], offsets[e+1]) of the sorted order; row_token[r] is the token of sorted row r and
//             slot[n·K + k] the sorted row of token n's k-th choice.
//   gather    xs[r] = x[row_token[r]]: each expert's tokens contiguous.
//   grouped   y_e = x_e · W_eᵀ for every expert's contiguous rows, W stacked [E, out, in] (nn.Linear).
//   combine   y[n] = residual[n] + Σ_k w[n, k] · ys[slot[n·K + k]].
// Backwards sit beside each op. Tie-breaking in the top-k choices: the lower expert (group) index first.
// All fp32 (the CPU and the reference); ref:: accumulates in double and is written for clarity.
#pragma once
#include <cstdint>

namespace kiln {

struct MoeRouting {
  int E = 0, K = 0;                 // experts, experts per token
  int groups = 1, topk_groups = 1;  // group-limited routing (groups = 1: none)
  bool sigmoid = false;             // affinities: sigmoid (DeepSeek-V3) or softmax over E (Qwen3-MoE)
  bool norm_topk = true;            // gate weights normalised to sum 1 over the chosen experts
  float scale = 1.0f;               // routed_scaling_factor
};

// The denominator's guard of a normalised sigmoid gate (DeepSeek-V3's 1e-20); softmax gates have none. The
// CUDA kernels call it too.
#ifdef __CUDACC__
__host__ __device__
#endif
inline float moe_norm_eps(const MoeRouting& r) { return r.sigmoid ? 1e-20f : 0.0f; }

namespace cpu {
// scores [N, E] = s; idx [N, K]; w [N, K]. bias [E] or null.
void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r);
// dlogits [N, E] (overwritten) = dL/du from dw = dL/dw [N, K] through the gate weights (selection is constant).
void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r);
// offsets [E + 1], row_token [N·K], slot [N·K].
void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E);
void moe_gather(float* xs, const float* x, const int32_t* row_token, int64_t R, int C);
// dx[n] += extra[n] (extra may be null) + Σ_k dxs[slot[n·K + k]], in k order (deterministic).
void moe_gather_backward(float* dx, const float* extra, const float* dxs, const int32_t* slot, int64_t N, int K,
                         int C);
// y may alias residual.
void moe_combine(float* y, const float* residual, const float* ys, const int32_t* slot, const float* w, int64_t N,
                 int K, int C);
// dys[slot[n·K + k]] = w[n, k]·dy[n]; dw[n, k] = dy[n]·ys[slot[n·K + k]] (both overwritten).
void moe_combine_backward(float* dys, float* dw, const float* dy, const float* ys, const int32_t* slot,
                          const float* w, int64_t N, int K, int C);
// y (row stride ldy) = x · W_eᵀ over each expert's rows; x rows of `in` values.
void grouped_linear_forward(float* y, int64_t ldy, const float* x, const float* w, const int32_t* offsets, int E,
                            int in, int out);
// dx = beta·dx + dy · W_e (dx rows of `in`; null: not computed); dw_e += dy_eᵀ · x_e (null: not computed).
void grouped_linear_backward(float* dx, float beta, float* dw, const float* dy, int64_t ldy, const float* x,
                             const float* w, const int32_t* offsets, int E, int in, int out);
// Sequence-wise balance loss (DeepSeek-V3, eq. 17-20) over S sequences of tokens [starts[s], starts[s+1]):
//   f[s, i] = E / (K·T_s) · #{t in s : expert i chosen at t}     P_i = (1/T_s) Σ_t s'_{i,t},  s' = s / Σ_j s_j
//   loss = alpha · Σ_s T_s · Σ_i f[s, i]·P_i     (each sequence weighted by its tokens, as the token losses are)
// moe_seq_aux writes f [S, E] and returns the loss; the backward adds scale · dloss/du to dlogits (f constant).
double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha);
void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale);
}  // namespace cpu

// cuda:: (kernels/cuda/moe.cu): the same contracts on device pointers, on `stream`. Routing, its backward and
// the balance loss are fp32; activations (x, xs, ys, dy, ...) and the experts' weights are bf16 (uint16_t) or
// fp32 (one type per call), summed in fp32. Dispatch is a stable counting sort on the device (one block).
// moe_seq_aux takes `starts` on the host and returns the loss on the host (it waits for the stream).
namespace cuda {
void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r, void* stream);
void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r, void* stream);
void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E,
                  void* stream);
#define KILN_MOE_CUDA_TYPED(T)                                                                                     \
  void moe_gather(T* xs, const T* x, const int32_t* row_token, int64_t R, int C, void* stream);                    \
  void moe_gather_backward(T* dx, const T* extra, const T* dxs, const int32_t* slot, int64_t N, int K, int C,      \
                           void* stream);                                                                          \
  void moe_combine(float* y, const float* residual, const T* ys, const int32_t* slot, const float* w, int64_t N,   \
                   int K, int C, void* stream);                                                                    \
  void moe_combine_backward(T* dys, float* dw, const T* dy, const T* ys, const int32_t* slot, const float* w,      \
                            int64_t N, int K, int C, void* stream);                                                \
  void grouped_linear_forward(T* y, int64_t ldy, const T* x, const T* w, const int32_t* offsets, int E, int in,    \
                              int out, void* stream);                                                              \
  void grouped_linear_backward(T* dx, float beta, float* dw, const T* dy, int64_t ldy, const T* x, const T* w,     \
                               const int32_t* offsets, int E, int in, int out, void* stream);
KILN_MOE_CUDA_TYPED(uint16_t)
KILN_MOE_CUDA_TYPED(float)
#undef KILN_MOE_CUDA_TYPED
// The training backend's form: bf16 activations, the fp32 master weights read directly.
void grouped_linear_forward(uint16_t* y, int64_t ldy, const uint16_t* x, const float* w, const int32_t* offsets, int E,
                            int in, int out, void* stream);
void grouped_linear_backward(uint16_t* dx, float beta, float* dw, const uint16_t* dy, int64_t ldy, const uint16_t* x,
                             const float* w, const int32_t* offsets, int E, int in, int out, void* stream);
// The router's product with its fp32 weight W [E, in] (routing is decided in fp32): logits [N, E] = x·Wᵀ; the
// backward overwrites dx [N, in] = dlogits·W (null: skipped) and adds dW += dlogitsᵀ·x (null: skipped).
void router_forward(float* logits, const uint16_t* x, const float* w, int64_t N, int in, int E, void* stream);
void router_backward(uint16_t* dx, float* dw, const float* dlogits, const uint16_t* x, const float* w, int64_t N,
                     int in, int E, void* stream);
// load[e] += offsets[e + 1] − offsets[e].
void moe_count(float* load, const int32_t* offsets, int E, void* stream);
double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha, void* stream);
void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale, void* stream);
}  // namespace cuda

namespace ref {
void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
               const MoeRouting& r);
void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                        const MoeRouting& r);
void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E);
void moe_gather(float* xs, const float* x, const int32_t* row_token, int64_t R, int C);
void moe_gather_backward(float* dx, const float* extra, const float* dxs, const int32_t* slot, int64_t N, int K,
                         int C);
void moe_combine(float* y, const float* residual, const float* ys, const int32_t* slot, const float* w, int64_t N,
                 int K, int C);
void moe_combine_backward(float* dys, float* dw, const float* dy, const float* ys, const int32_t* slot,
                          const float* w, int64_t N, int K, int C);
void grouped_linear_forward(float* y, int64_t ldy, const float* x, const float* w, const int32_t* offsets, int E,
                            int in, int out);
void grouped_linear_backward(float* dx, float beta, float* dw, const float* dy, int64_t ldy, const float* x,
                             const float* w, const int32_t* offsets, int E, int in, int out);
double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                   const MoeRouting& r, float alpha);
void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                          const MoeRouting& r, float scale);
}  // namespace ref

}  // namespace kiln
