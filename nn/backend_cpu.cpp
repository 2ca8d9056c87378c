// The CPU backend: each op is the kernels/cpu/ kernel of kernels/*.h; fp32 activations.
// Linear layers take either weight layout: Conv1D [in, out] through the Linear kernels, nn.Linear [out, in]
// through the same sgemm with the weight transposed (the tied LM head's calls). Up to kBatchGemvRows rows (a
// decoding step) take the streaming products of kernels/gemv.h, which are memory-bound and pack nothing.
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/memory.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/argmax.h"
#include "kernels/crossentropy.h"
#include "kernels/embedding.h"
#include "kernels/flow.h"
#include "kernels/gemv.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/rmsnorm.h"
#include "kernels/upsample.h"
#include "nn/backend.h"

namespace kiln::nn {

float* Act::f32() const {
  KILN_CHECK(dtype == DType::F32, "activation buffer is ", dtype_name(dtype), ", expected F32");
  return static_cast<float*>(p);
}

namespace {

float* F(Act a) { return static_cast<float*>(a.p); }

// y[n] += b for every row.
void add_bias_rows(float* y, const float* b, int64_t N, int out) {
#pragma omp parallel for schedule(static) if (N * out > 16384)
  for (int64_t n = 0; n < N; n++) {
    float* r = y + n * out;
#pragma omp simd
    for (int o = 0; o < out; o++) r[o] += b[o];
  }
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(std::optional<LowpType> t) : lowp_(t) {
    if (t) scratch_.resize(kLowpScratchBytes);
  }
  const char* name() const override { return "cpu"; }
  DType act_dtype() const override { return DType::F32; }
  std::optional<LowpType> lowp() const override { return lowp_; }

  void* alloc(size_t bytes, const char* what) override {
    void* p = std::aligned_alloc(kAlign, align_up(bytes ? bytes : 1));
    KILN_CHECK(p, "out of memory allocating ", bytes, " bytes for ", what);
    return p;
  }
  void free(void* p) override { std::free(p); }
  void upload(void* dst, const void* host, size_t bytes) override { std::memcpy(dst, host, bytes); }
  void download(void* host, const void* src, size_t bytes) override { std::memcpy(host, src, bytes); }
  void memset(void* p, int value, size_t bytes) override { std::memset(p, value, bytes); }
  bool on_host() const override { return true; }

  void linear_forward(Act y, Act x, const Weight& w, int64_t N, int64_t ld) override {
    KILN_CHECK(ld == 0 || ld == w.out, "cpu linear_forward: row stride ", ld, " of a ", w.out, "-column output");
    float* out = F(y);
    const float* in = F(x);
    if (w.narrow) return cpu::narrow_gemm(out, w.out, in, w.in, N, *w.narrow, w.b, /*accumulate=*/false);
    const bool lp = w.w16 && lowp_;
    // A decoding step or verification pass (few rows): the streaming products, no packing, each row's result
    // independent of the others.
    if (N <= cpu::kBatchGemvRows && !lp) {
      if (w.layout == Layout::InOut)
        return cpu::vecmat_batch(out, w.out, in, w.in, N, w.w, w.b, w.in, w.out, /*accumulate=*/false);
      return cpu::matvec_batch(out, w.out, in, w.in, N, w.w, w.b, w.out, w.in, /*accumulate=*/false);
    }
    if (w.layout == Layout::InOut) {
      if (lp) return cpu::matmul_forward_lowp(out, in, w.w16, w.b, N, w.in, w.out, *lowp_, scratch_.data());
      return cpu::matmul_forward(out, in, w.w, w.b, N, w.in, w.out);
    }
    if (w.b) {
#pragma omp parallel for schedule(static) if (N * w.out > 16384)
      for (int64_t n = 0; n < N; n++) std::memcpy(out + n * w.out, w.b, sizeof(float) * size_t(w.out));
    }
    const float beta = w.b ? 1.0f : 0.0f;
    if (lp)
      cpu::gemm_lowp(*lowp_, false, true, N, w.out, w.in, 1.0f, f32_operand(in, w.in), lowp_operand(w.w16, w.in),
                     beta, out, w.out, scratch_.data());
    else
      cpu::gemm(false, true, N, w.out, w.in, 1.0f, in, w.in, w.w, w.in, beta, out, w.out);
  }

  void linear_residual(float* out, const float* residual, Act x, const Weight& w, int64_t N) override {
    if (w.narrow) {  // decoding's narrow weights: accumulate onto the stream
      if (out != residual) std::memcpy(out, residual, sizeof(float) * size_t(N * w.out));
      return cpu::narrow_gemm(out, w.out, F(x), w.in, N, *w.narrow, w.b, /*accumulate=*/true);
    }
    if (out != residual) {
      // Training keeps both streams: the branch, then the add (the arithmetic of a separate add).
      linear_forward(Act{out, DType::F32}, x, w, N, 0);
      cpu::add(out, out, residual, N * w.out);
      return;
    }
    // In place (decoding): accumulate straight into the stream (beta = 1), no branch buffer.
    const float* in = F(x);
    if (N <= cpu::kBatchGemvRows && !(w.w16 && lowp_)) {
      if (w.layout == Layout::InOut)
        return cpu::vecmat_batch(out, w.out, in, w.in, N, w.w, w.b, w.in, w.out, /*accumulate=*/true);
      return cpu::matvec_batch(out, w.out, in, w.in, N, w.w, w.b, w.out, w.in, /*accumulate=*/true);
    }
    if (w.w16 && lowp_)
      cpu::gemm_lowp(*lowp_, false, w.layout == Layout::OutIn, N, w.out, w.in, 1.0f, f32_operand(in, w.in),
                     lowp_operand(w.w16, w.layout == Layout::OutIn ? w.in : w.out), 1.0f, out, w.out,
                     scratch_.data());
    else
      cpu::gemm(false, w.layout == Layout::OutIn, N, w.out, w.in, 1.0f, in, w.in, w.w,
                w.layout == Layout::OutIn ? w.in : w.out, 1.0f, out, w.out);
    if (w.b) add_bias_rows(out, w.b, N, w.out);
  }

  void linear_backward(Act dx, Act dy, Act x, const Weight& w, int64_t N, int64_t ld) override {
    KILN_CHECK(ld == 0 || ld == w.out, "cpu linear_backward: row stride ", ld, " of a ", w.out, "-column gradient");
    float* din = F(dx);
    const float* dout = F(dy);
    const float* in = F(x);
    const bool lp = w.w16 && lowp_;
    if (w.layout == Layout::InOut) {
      if (lp) return cpu::matmul_backward_lowp(din, w.dw, w.db, dout, in, w.w16, N, w.in, w.out, *lowp_, scratch_.data());
      return cpu::matmul_backward(din, w.dw, w.db, dout, in, w.w, N, w.in, w.out);
    }
    if (lp) {
      if (din)
        cpu::gemm_lowp(*lowp_, false, false, N, w.in, w.out, 1.0f, f32_operand(dout, w.out),
                       lowp_operand(w.w16, w.in), 0.0f, din, w.in, scratch_.data());
      if (w.dw)
        cpu::gemm_lowp(*lowp_, true, false, w.out, w.in, N, 1.0f, f32_operand(dout, w.out), f32_operand(in, w.in),
                       1.0f, w.dw, w.in, scratch_.data());
    } else {
      if (din) cpu::gemm(false, false, N, w.in, w.out, 1.0f, dout, w.out, w.w, w.in, 0.0f, din, w.in);
      if (w.dw) cpu::gemm(true, false, w.out, w.in, N, 1.0f, dout, w.out, in, w.in, 1.0f, w.dw, w.in);
    }
    // dbias: the Linear kernel's column sum with its products switched off.
    if (w.db) cpu::matmul_backward(nullptr, nullptr, w.db, dout, nullptr, nullptr, N, w.in, w.out);
  }

  Act residual_operand(float* dres, Act, int64_t) override { return {dres, DType::F32}; }

  void layernorm_forward(Act out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t N,
                         int C, float eps) override {
    cpu::layernorm_forward(F(out), mean, rstd, x, w, b, N, C, eps);
  }
  void layernorm_backward(float* dx, float* dw, float* db, Act dout, const float* x, const float* w, const float* mean,
                          const float* rstd, int64_t N, int C) override {
    cpu::layernorm_backward(dx, dw, db, F(dout), x, w, mean, rstd, N, C);
  }
  void rmsnorm_forward(Act out, float* rstd, const float* x, const float* w, int64_t N, int C, float eps) override {
    cpu::rmsnorm_forward(F(out), rstd, x, w, N, C, eps);
  }
  void rmsnorm_backward(float* dx, float* dw, Act dout, const float* x, const float* w, const float* rstd, int64_t N,
                        int C) override {
    cpu::rmsnorm_backward(dx, dw, F(dout), x, w, rstd, N, C, /*accumulate=*/true);
  }
  void head_rmsnorm_forward(Act out, float* rstd, Act in, const float* w, int64_t N, int C, int heads, int64_t ld,
                            float eps) override {
    cpu::rmsnorm_forward(F(out), rstd, F(in), w, N, C, eps, heads, ld);
  }
  void head_rmsnorm_backward(Act din, float* dw, Act dout, Act in, const float* w, const float* rstd, int64_t N, int C,
                             int heads, int64_t ld) override {
    cpu::rmsnorm_backward(F(din), dw, F(dout), F(in), w, rstd, N, C, /*accumulate=*/false, heads, ld);
  }
  void rope_forward(Act x, const int32_t* pos, int64_t N, const RopeParams& p) override {
    cpu::rope_forward(F(x), pos, N, p);
  }
  void rope_backward(Act dx, const int32_t* pos, int64_t N, const RopeParams& p) override {
    cpu::rope_backward(F(dx), pos, N, p);
  }

  void activation_forward(Act out, Act in, int64_t n, Activation a) override {
    cpu::activation_forward(F(out), F(in), n, a);
  }
  void activation_backward(Act din, Act in, Act dout, int64_t n, Activation a) override {
    cpu::activation_backward(F(din), F(in), F(dout), n, a);
  }
  void gated_forward(Act out, Act gate_up, int64_t N, int I, Activation a) override {
    cpu::gated_forward(F(out), F(gate_up), N, I, a);
  }
  void gated_backward(Act dgate_up, Act gate_up, Act dout, int64_t N, int I, Activation a) override {
    cpu::gated_backward(F(dgate_up), F(gate_up), F(dout), N, I, a);
  }
  void add(float* out, const float* a, const float* b, int64_t n) override { cpu::add(out, a, b, n); }
  void modulate_forward(Act out, Act x, Act shift, Act scale, int B, int T, int C, int64_t ld) override {
    cpu::modulate_forward(F(out), F(x), F(shift), F(scale), B, T, C, ld);
  }
  void modulate_backward(Act dx, Act dshift, Act dscale, Act dout, Act x, Act scale, int B, int T, int C,
                         int64_t ld) override {
    cpu::modulate_backward(F(dx), F(dshift), F(dscale), F(dout), F(x), F(scale), B, T, C, ld);
  }
  void gate_forward(float* y, const float* res, const float* u, Act gate, int B, int T, int C, int64_t ld) override {
    cpu::gate_forward(y, res, u, F(gate), B, T, C, ld);
  }
  void gate_backward(Act du, Act dgate, const float* dy, const float* u, Act gate, int B, int T, int C,
                     int64_t ld) override {
    cpu::gate_backward(F(du), F(dgate), dy, u, F(gate), B, T, C, ld);
  }
  void copy_rows(Act dst, int64_t ld_dst, Act src, int64_t ld_src, int64_t N, int64_t width) override {
    for (int64_t n = 0; n < N; n++) std::memcpy(F(dst) + n * ld_dst, F(src) + n * ld_src, sizeof(float) * size_t(width));
  }

  void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                       int64_t HW) override {
    cpu::actnorm_forward(y, logdet, x, logs, bias, B, C, HW);
  }
  void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                        double wsum, int B, int C, int64_t HW) override {
    cpu::actnorm_backward(dx, dlogs, dbias, dy, x, logs, wsum, B, C, HW);
  }
  void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C,
                       int64_t HW) override {
    cpu::actnorm_inverse(x, y, logs, bias, B, C, HW);
  }
  void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW) override {
    cpu::actnorm_init(logs, bias, x, B, C, HW);
  }
  void flow_gather(Act xa, const float* x, const FlowCoupling& c) override { cpu::flow_gather(xa.f32(), x, c); }
  void flow_gather_backward(float* dx, Act dxa, const FlowCoupling& c) override {
    cpu::flow_gather_backward(dx, dxa.f32(), c);
  }
  void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                        const FlowCoupling& c) override {
    cpu::coupling_forward(y, logdet, x, out, scale, c);
  }
  void coupling_backward(float* dx, Act dout, float* dscale, const float* dy, const float* x, const float* out,
                         const float* scale, const double* w, const FlowCoupling& c) override {
    cpu::coupling_backward(dx, dout.f32(), dscale, dy, x, out, scale, w, c);
  }
  void coupling_inverse(float* x, const float* y, const float* out, const float* scale,
                        const FlowCoupling& c) override {
    cpu::coupling_inverse(x, y, out, scale, c);
  }
  void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r) override {
    cpu::pixel_shuffle(out, in, B, C, H, W, r);
  }
  void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r) override {
    cpu::pixel_unshuffle(out, in, B, C, H, W, r);
  }

  void attention_forward(Act out, float* lse, Act qkv, const AttentionParams& p) override {
    // The FlashAttention kernel works on 16-float vectors; other head sizes take the exact naive kernel.
    if (p.HD % 16 == 0 && v_dim(p) % 16 == 0)
      cpu::attention_forward(F(out), lse, F(qkv), p);
    else
      ref::attention_forward(F(out), lse, F(qkv), p);
  }
  void attention_backward(Act dqkv, Act dout, Act qkv, Act out, const float* lse, const AttentionParams& p) override {
    if (p.HD % 16 == 0 && v_dim(p) % 16 == 0)
      cpu::attention_backward(F(dqkv), F(dout), F(qkv), F(out), lse, p);
    else
      ref::attention_backward(F(dqkv), F(dout), F(qkv), F(out), lse, p);
  }
  void decode_attention(const DecodeAttentionParams& p) override { cpu::decode_attention(p); }
  void sum_heads(Act out, int64_t ld_out, Act in, int64_t ld_in, int64_t N, int heads, int64_t head_stride,
                 int width) override {
    for (int64_t n = 0; n < N; n++) {
      float* o = F(out) + n * ld_out;
      const float* r = F(in) + n * ld_in;
      for (int d = 0; d < width; d++) o[d] = r[d];
      for (int h = 1; h < heads; h++)
        for (int d = 0; d < width; d++) o[d] += r[h * head_stride + d];
    }
  }
  void rows_append(Act cache, int64_t batch_stride, Act src, int64_t ld_src, int width, int B, int Tq,
                   const int32_t* past, const KVPages& pages) override {
    for (int b = 0; b < B; b++)
      for (int i = 0; i < Tq; i++) {
        const int64_t j = int64_t(past[b]) + i;
        const int64_t at = pages ? pages.row(b, j) * width : int64_t(b) * batch_stride + j * width;
        std::memcpy(F(cache) + at, F(src) + (int64_t(b) * Tq + i) * ld_src, sizeof(float) * size_t(width));
      }
  }
  void kv_append(Act k_cache, Act v_cache, int64_t batch_stride, Act qkv, int NH, int NKV, int HD, int B, int Tq,
                 const int32_t* past, const KVPages& pages) override {
    const int64_t kv_width = int64_t(NKV) * HD, qkv_ld = int64_t(NH + 2 * NKV) * HD, k_off = int64_t(NH) * HD;
    const size_t bytes = sizeof(float) * size_t(kv_width);
    for (int b = 0; b < B; b++)
      for (int i = 0; i < Tq; i++) {
        const float* row = F(qkv) + (int64_t(b) * Tq + i) * qkv_ld;
        const int64_t j = int64_t(past[b]) + i;
        const int64_t at = pages ? pages.row(b, j) * kv_width : int64_t(b) * batch_stride + j * kv_width;
        std::memcpy(F(k_cache) + at, row + k_off, bytes);
        std::memcpy(F(v_cache) + at, row + k_off + kv_width, bytes);
      }
  }

  void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
                 const MoeRouting& r) override {
    cpu::moe_route(scores, idx, w, logits, bias, N, r);
  }
  void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                          const MoeRouting& r) override {
    cpu::moe_route_backward(dlogits, dw, scores, idx, N, r);
  }
  void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K,
                    int E) override {
    cpu::moe_dispatch(offsets, row_token, slot, idx, N, K, E);
  }
  void moe_gather(Act xs, Act x, const int32_t* row_token, int64_t R, int C) override {
    cpu::moe_gather(F(xs), F(x), row_token, R, C);
  }
  void moe_gather_backward(Act dx, Act extra, Act dxs, const int32_t* slot, int64_t N, int K, int C) override {
    cpu::moe_gather_backward(F(dx), F(extra), F(dxs), slot, N, K, C);
  }
  void moe_combine(float* y, const float* residual, Act ys, const int32_t* slot, const float* w, int64_t N, int K,
                   int C) override {
    cpu::moe_combine(y, residual, F(ys), slot, w, N, K, C);
  }
  void moe_combine_backward(Act dys, float* dw, Act dy, Act ys, const int32_t* slot, const float* w, int64_t N, int K,
                            int C) override {
    cpu::moe_combine_backward(F(dys), dw, F(dy), F(ys), slot, w, N, K, C);
  }
  // The experts' products stay fp32 under --lowp (the 16-bit copy covers 2-D matrices only).
  void grouped_linear_forward(Act y, int64_t ldy, Act x, const float* w, const int32_t* offsets, int E, int in,
                              int out) override {
    cpu::grouped_linear_forward(F(y), ldy, F(x), w, offsets, E, in, out);
  }
  void grouped_linear_backward(Act dx, float beta, float* dw, Act dy, int64_t ldy, Act x, const float* w,
                               const int32_t* offsets, int E, int in, int out) override {
    cpu::grouped_linear_backward(F(dx), beta, dw, F(dy), ldy, F(x), w, offsets, E, in, out);
  }
  double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                     const MoeRouting& r, float alpha) override {
    return cpu::moe_seq_aux(f, scores, idx, starts, S, r, alpha);
  }
  void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                            const MoeRouting& r, float scale) override {
    cpu::moe_seq_aux_backward(dlogits, f, scores, starts, S, r, scale);
  }
  void moe_count(float* load, const int32_t* offsets, int E) override {
    for (int e = 0; e < E; e++) load[e] += float(offsets[e + 1] - offsets[e]);
  }

  void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                         int64_t N, int C) override {
    cpu::embedding_forward(out, tokens, pos, wte, wpe, N, C);
  }
  void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                          int64_t N, int C) override {
    cpu::embedding_backward(dwte, dwpe, dout, tokens, pos, N, C);
  }
  void softmax_crossentropy(Act logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                            float grad_scale) override {
    cpu::softmax_crossentropy(F(logits), losses, targets, N, V, ld, grad_scale);
  }

  void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n,
                    const AdamWHyper& h) override {
    cpu::adamw_update(param, grad, m, v, n, h);
    if (param16 && lowp_) cpu::to_lowp(param16, param, n, *lowp_);
  }
  double sum_squares(const float* x, int64_t n) override { return cpu::sum_squares(x, n); }
  void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t) override { cpu::to_lowp(dst, src, n, t); }
  void argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld) override {
    for (int64_t r = 0; r < rows; r++) out[r] = argmax(x + r * ld, n);
  }

 private:
  std::optional<LowpType> lowp_;
  Buffer scratch_;  // the 16-bit products' packing space
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(std::optional<LowpType> lowp) { return std::make_unique<CpuBackend>(lowp); }

}  // namespace kiln::nn
