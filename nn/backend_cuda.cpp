// The GPU backend: every module op on the kernels of kernels/cuda/ (through core/gpu.h's stream), so the one
// composition of nn/block.h and models/transformer.h runs every family on the GPU (or the SIMT emulator).
// Activations are bf16 (Act dtype BF16); matrix products read the bf16 weight copy (Weight::w16), or a
// decoder's narrow copy (Weight::narrow: cuda::narrow_gemm), and accumulate in fp32; the residual stream, norm statistics, parameters and gradients are fp32. Both weight
// layouts go through cuda::linear_forward / linear_backward. The scratch some kernels need (norm and embedding
// backward partials, attention dQ accumulators, decode-attention splits) is one buffer reserved at plan time
// for the largest shapes (reserve_scratch); the ops run in order on one stream, so they share it.
#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/gpu.h"
#include "kernels/activation.h"
#include "kernels/adamw.h"
#include "kernels/argmax.h"
#include "kernels/attention.h"
#include "kernels/crossentropy.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/flow.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "kernels/moe.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/upsample.h"
#include "nn/backend.h"

namespace kiln::nn {
namespace {

uint16_t* H(Act a) {
  KILN_CHECK(!a.p || a.dtype == DType::BF16, "cuda backend: activation buffer is ", dtype_name(a.dtype),
             ", expected BF16");
  return static_cast<uint16_t*>(a.p);
}

cuda::DecodeAttention to_cuda(const DecodeAttentionParams& p) {
  cuda::DecodeAttention d;
  d.HDv = p.hdv();  // latent attention: values of their own width and strides
  d.v_stride = p.vs();
  d.v_batch_stride = p.vbs();
  d.B = p.B;
  d.Tq = p.Tq;
  d.past_per_seq = p.past_per_seq;
  d.max_past = p.max_past;
  d.NH = p.NH;
  d.NKV = p.NKV;
  d.HD = p.HD;
  d.window = p.window;
  d.scale = p.scale;
  d.q = reinterpret_cast<const uint16_t*>(p.q);
  d.q_stride = p.q_stride;
  d.k = reinterpret_cast<const uint16_t*>(p.k);
  d.v = reinterpret_cast<const uint16_t*>(p.v);
  d.kv_batch_stride = p.kv_batch_stride;
  d.kv_stride = p.kv_stride;
  d.out = reinterpret_cast<uint16_t*>(p.out);
  d.out_stride = p.out_stride;
  d.pages = p.pages;
  d.tree = p.tree;  // device masks (TransformerDecoder::forward_tree uploads them)
  return d;
}

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }
  DType act_dtype() const override { return DType::BF16; }
  std::optional<LowpType> lowp() const override { return LowpType::BF16; }
  void* alloc(size_t bytes, const char* what) override { return gpu::malloc(std::max<size_t>(bytes, 1), what); }
  void free(void* p) override { gpu::free(p); }
  void upload(void* dst, const void* host, size_t bytes) override {
    gpu::copy_to_device(dst, host, bytes);
    gpu::synchronize();  // the host array may change or go right after
  }
  void download(void* host, const void* src, size_t bytes) override { gpu::copy_to_host(host, src, bytes); }
  void memset(void* p, int value, size_t bytes) override { gpu::memset(p, value, bytes); }
  int max_decode_queries() const override { return 16; }  // the decode-attention kernel's limit

  size_t scratch_bytes(const OpScratch& s) const override {
    size_t b = 0;
    if (s.rows > 0 && s.C > 0) {
      b = std::max(b, cuda::layernorm_backward_scratch_floats(s.rows, s.C) * 4);
      b = std::max(b, cuda::rmsnorm_backward_scratch_floats(s.rows, s.C) * 4);
    }
    if (s.rows > 0) b = std::max(b, cuda::embedding_backward_scratch_bytes(s.rows));
    if (s.head_groups > 0 && s.HD > 0) b = std::max(b, cuda::rmsnorm_backward_scratch_floats(s.head_groups, s.HD) * 4);
    if (s.attention.B > 0 && s.attention.T > 0) b = std::max(b, cuda::attention_backward_scratch_bytes(s.attention));
    if (s.decode.B > 0) b = std::max(b, cuda::decode_attention_scratch_bytes(to_cuda(s.decode)));
    if (s.narrow_rows > 0 && s.narrow_in > 0) b = std::max(b, cuda::narrow_gemm_scratch_bytes(s.narrow_rows, s.narrow_in));
    return b;
  }
  void reserve_scratch(const OpScratch& s) override {
    const size_t need = scratch_bytes(s);
    if (need > scratch_.size()) scratch_.resize(need, "op scratch");
  }

  // ---- linear layers ----
  void linear_forward(Act y, Act x, const Weight& w, int64_t N, int64_t ld) override {
    if (w.narrow) {  // decoding's narrow weights (models/narrow_weights.h): every row count, a prompt too
      if (ld == 0) ld = w.out;
      if (y.dtype == DType::F32)
        cuda::narrow_gemm(static_cast<float*>(y.p), ld, nullptr, H(x), w.in, N, *w.narrow, w.b, narrow_scratch(w, N), s());
      else
        cuda::narrow_gemm(H(y), ld, H(x), w.in, N, *w.narrow, w.b, narrow_scratch(w, N), s());
      return;
    }
    if (!w.w16 && fp32_router(y, w, ld)) return cuda::router_forward(static_cast<float*>(y.p), H(x), w.w, N, w.in, w.out, s());
    KILN_CHECK(w.w16, "cuda linear_forward: the weight has no bf16 copy");
    const bool oc_c = w.layout == Layout::OutIn;
    if (ld == 0) ld = w.out;
    if (y.dtype == DType::F32)
      cuda::linear_forward(static_cast<float*>(y.p), ld, nullptr, H(x), w.w16, oc_c, w.b, N, w.in, w.out, s());
    else
      cuda::linear_forward(H(y), ld, H(x), w.w16, oc_c, w.b, N, w.in, w.out, s());
  }
  void linear_residual(float* out, const float* residual, Act x, const Weight& w, int64_t N) override {
    if (w.narrow)
      return cuda::narrow_gemm(out, w.out, residual, H(x), w.in, N, *w.narrow, w.b, narrow_scratch(w, N), s());
    KILN_CHECK(w.w16, "cuda linear_residual: the weight has no bf16 copy");
    cuda::linear_forward(out, w.out, residual, H(x), w.w16, w.layout == Layout::OutIn, w.b, N, w.in, w.out, s());
  }
  void linear_backward(Act dx, Act dy, Act x, const Weight& w, int64_t N, int64_t ld) override {
    if (!w.w16 && fp32_router(dy, w, ld))
      return cuda::router_backward(H(dx), w.dw, static_cast<const float*>(dy.p), H(x), w.w, N, w.in, w.out, s());
    KILN_CHECK(w.w16, "cuda linear_backward: the weight has no bf16 copy");
    cuda::linear_backward(H(dx), w.dw, w.db, H(dy), ld ? ld : w.out, H(x), w.w16, w.layout == Layout::OutIn, N, w.in,
                          w.out, s());
  }
  Act residual_operand(float* dres, Act scratch, int64_t n) override {
    cuda::cast(H(scratch), dres, n, s());
    return scratch;
  }

  // ---- norms ----
  void layernorm_forward(Act out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t N,
                         int C, float eps) override {
    cuda::layernorm_forward(H(out), mean, rstd, x, w, b, N, C, eps, s());
  }
  void layernorm_backward(float* dx, float* dw, float* db, Act dout, const float* x, const float* w, const float* mean,
                          const float* rstd, int64_t N, int C) override {
    float* sc = scratch("layernorm_backward", cuda::layernorm_backward_scratch_floats(N, C) * 4);
    cuda::layernorm_backward(dx, dw, db, H(dout), x, w, mean, rstd, N, C, sc, s());
  }
  void rmsnorm_forward(Act out, float* rstd, const float* x, const float* w, int64_t N, int C, float eps) override {
    cuda::rmsnorm_forward(H(out), rstd, x, w, N, C, eps, s());
  }
  void rmsnorm_backward(float* dx, float* dw, Act dout, const float* x, const float* w, const float* rstd, int64_t N,
                        int C) override {
    float* sc = scratch("rmsnorm_backward", cuda::rmsnorm_backward_scratch_floats(N, C) * 4);
    cuda::rmsnorm_backward(dx, dw, H(dout), x, w, rstd, N, C, /*accumulate=*/true, sc, s());
  }
  void head_rmsnorm_forward(Act out, float* rstd, Act in, const float* w, int64_t N, int C, int heads, int64_t ld,
                            float eps) override {
    cuda::rmsnorm_forward(H(out), rstd, H(in), w, N, C, eps, heads, ld, s());
  }
  void head_rmsnorm_backward(Act din, float* dw, Act dout, Act in, const float* w, const float* rstd, int64_t N, int C,
                             int heads, int64_t ld) override {
    float* sc = scratch("head_rmsnorm_backward", cuda::rmsnorm_backward_scratch_floats(N * heads, C) * 4);
    cuda::rmsnorm_backward(H(din), dw, H(dout), H(in), w, rstd, N, C, /*accumulate=*/false, heads, ld, sc, s());
  }
  void rope_forward(Act x, const int32_t* pos, int64_t N, const RopeParams& p) override {
    cuda::rope_forward(H(x), pos, N, p, s());
  }
  void rope_backward(Act dx, const int32_t* pos, int64_t N, const RopeParams& p) override {
    cuda::rope_backward(H(dx), pos, N, p, s());
  }

  // ---- elementwise ----
  void activation_forward(Act out, Act in, int64_t n, Activation a) override {
    cuda::activation_forward(H(out), H(in), n, a, s());
  }
  void activation_backward(Act din, Act in, Act dout, int64_t n, Activation a) override {
    cuda::activation_backward(H(din), H(in), H(dout), n, a, s());
  }
  void gated_forward(Act out, Act gate_up, int64_t N, int I, Activation a) override {
    cuda::gated_forward(H(out), H(gate_up), N, I, a, s());
  }
  void gated_backward(Act dgate_up, Act gate_up, Act dout, int64_t N, int I, Activation a) override {
    cuda::gated_backward(H(dgate_up), H(gate_up), H(dout), N, I, a, s());
  }
  void add(float* out, const float* a, const float* b, int64_t n) override { cuda::add(out, a, b, n, s()); }
  void modulate_forward(Act out, Act x, Act shift, Act scale, int B, int T, int C, int64_t ld) override {
    cuda::modulate_forward(H(out), H(x), H(shift), H(scale), B, T, C, ld, s());
  }
  void modulate_backward(Act dx, Act dshift, Act dscale, Act dout, Act x, Act scale, int B, int T, int C,
                         int64_t ld) override {
    cuda::modulate_backward(H(dx), H(dshift), H(dscale), H(dout), H(x), H(scale), B, T, C, ld, s());
  }
  void gate_forward(float* y, const float* res, const float* u, Act gate, int B, int T, int C, int64_t ld) override {
    cuda::gate_forward(y, res, u, H(gate), B, T, C, ld, s());
  }
  void gate_backward(Act du, Act dgate, const float* dy, const float* u, Act gate, int B, int T, int C,
                     int64_t ld) override {
    cuda::gate_backward(H(du), H(dgate), dy, u, H(gate), B, T, C, ld, s());
  }
  void copy_rows(Act dst, int64_t ld_dst, Act src, int64_t ld_src, int64_t N, int64_t width) override {
    KILN_CHECK(dst.dtype == src.dtype, "cuda copy_rows: ", dtype_name(src.dtype), " rows into ", dtype_name(dst.dtype));
    if (dst.dtype == DType::F32)
      cuda::copy_rows(static_cast<float*>(dst.p), ld_dst, static_cast<const float*>(src.p), ld_src, N, width, s());
    else
      cuda::copy_rows(H(dst), ld_dst, H(src), ld_src, N, width, s());
  }

  // ---- normalizing flows (kernels/cuda/flow.cu): fp32 values, the MLP's side (xa, dxa, dout) bf16 or fp32 ----
  void actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C,
                       int64_t HW) override {
    cuda::actnorm_forward(y, logdet, x, logs, bias, B, C, HW, s());
  }
  void actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs,
                        double wsum, int B, int C, int64_t HW) override {
    cuda::actnorm_backward(dx, dlogs, dbias, dy, x, logs, wsum, B, C, HW, s());
  }
  void actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C,
                       int64_t HW) override {
    cuda::actnorm_inverse(x, y, logs, bias, B, C, HW, s());
  }
  void actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW) override {
    cuda::actnorm_init(logs, bias, x, B, C, HW, s());
  }
  void flow_gather(Act xa, const float* x, const FlowCoupling& c) override {
    if (xa.dtype == DType::F32)
      cuda::flow_gather(static_cast<float*>(xa.p), x, c, s());
    else
      cuda::flow_gather(H(xa), x, c, s());
  }
  void flow_gather_backward(float* dx, Act dxa, const FlowCoupling& c) override {
    if (dxa.dtype == DType::F32)
      cuda::flow_gather_backward(dx, static_cast<const float*>(dxa.p), c, s());
    else
      cuda::flow_gather_backward(dx, H(dxa), c, s());
  }
  void coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale,
                        const FlowCoupling& c) override {
    cuda::coupling_forward(y, logdet, x, out, scale, c, s());
  }
  void coupling_backward(float* dx, Act dout, float* dscale, const float* dy, const float* x, const float* out,
                         const float* scale, const double* w, const FlowCoupling& c) override {
    if (dout.dtype == DType::F32)
      cuda::coupling_backward(dx, static_cast<float*>(dout.p), dscale, dy, x, out, scale, w, c, s());
    else
      cuda::coupling_backward(dx, H(dout), dscale, dy, x, out, scale, w, c, s());
  }
  void coupling_inverse(float* x, const float* y, const float* out, const float* scale,
                        const FlowCoupling& c) override {
    cuda::coupling_inverse(x, y, out, scale, c, s());
  }
  void pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r) override {
    cuda::pixel_shuffle(out, in, B, C, H, W, r, s());
  }
  void pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r) override {
    cuda::pixel_unshuffle(out, in, B, C, H, W, r, s());
  }

  // ---- attention ----
  void attention_forward(Act out, float* lse, Act qkv, const AttentionParams& p) override {
    cuda::attention_forward(H(out), lse, H(qkv), p, s());
  }
  void attention_backward(Act dqkv, Act dout, Act qkv, Act out, const float* lse, const AttentionParams& p) override {
    void* sc = scratch("attention_backward", cuda::attention_backward_scratch_bytes(p));
    cuda::attention_backward(H(dqkv), H(dout), H(qkv), H(out), lse, p, sc, s());
  }
  void decode_attention(const DecodeAttentionParams& p) override {
    const cuda::DecodeAttention d = to_cuda(p);
    void* sc = scratch("decode_attention", cuda::decode_attention_scratch_bytes(d));
    cuda::decode_attention(d, sc, s());
  }
  void sum_heads(Act out, int64_t ld_out, Act in, int64_t ld_in, int64_t N, int heads, int64_t head_stride,
                 int width) override {
    cuda::sum_heads(H(out), ld_out, H(in), ld_in, N, heads, head_stride, width, s());
  }
  void rows_append(Act cache, int64_t batch_stride, Act src, int64_t ld_src, int width, int B, int Tq,
                   const int32_t* past, const KVPages& pages) override {
    cuda::rows_append(H(cache), batch_stride, H(src), ld_src, width, B, Tq, past, s(), pages);
  }
  void kv_append(Act k_cache, Act v_cache, int64_t batch_stride, Act qkv, int NH, int NKV, int HD, int B, int Tq,
                 const int32_t* past, const KVPages& pages) override {
    cuda::kv_cache_append(H(k_cache), H(v_cache), H(qkv), past, B, Tq, NH, NKV, HD, batch_stride, s(), pages);
  }

  // ---- mixture of experts (kernels/cuda/moe.cu): bf16 rows, fp32 routing and master weights ----
  void moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N,
                 const MoeRouting& r) override {
    cuda::moe_route(scores, idx, w, logits, bias, N, r, s());
  }
  void moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N,
                          const MoeRouting& r) override {
    cuda::moe_route_backward(dlogits, dw, scores, idx, N, r, s());
  }
  void moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K,
                    int E) override {
    cuda::moe_dispatch(offsets, row_token, slot, idx, N, K, E, s());
  }
  void moe_gather(Act xs, Act x, const int32_t* row_token, int64_t R, int C) override {
    cuda::moe_gather(H(xs), H(x), row_token, R, C, s());
  }
  void moe_gather_backward(Act dx, Act extra, Act dxs, const int32_t* slot, int64_t N, int K, int C) override {
    cuda::moe_gather_backward(H(dx), H(extra), H(dxs), slot, N, K, C, s());
  }
  void moe_combine(float* y, const float* residual, Act ys, const int32_t* slot, const float* w, int64_t N, int K,
                   int C) override {
    cuda::moe_combine(y, residual, H(ys), slot, w, N, K, C, s());
  }
  void moe_combine_backward(Act dys, float* dw, Act dy, Act ys, const int32_t* slot, const float* w, int64_t N, int K,
                            int C) override {
    cuda::moe_combine_backward(H(dys), dw, H(dy), H(ys), slot, w, N, K, C, s());
  }
  void grouped_linear_forward(Act y, int64_t ldy, Act x, const float* w, const int32_t* offsets, int E, int in,
                              int out) override {
    cuda::grouped_linear_forward(H(y), ldy, H(x), w, offsets, E, in, out, s());
  }
  void grouped_linear_backward(Act dx, float beta, float* dw, Act dy, int64_t ldy, Act x, const float* w,
                               const int32_t* offsets, int E, int in, int out) override {
    cuda::grouped_linear_backward(H(dx), beta, dw, H(dy), ldy, H(x), w, offsets, E, in, out, s());
  }
  double moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S,
                     const MoeRouting& r, float alpha) override {
    return cuda::moe_seq_aux(f, scores, idx, starts, S, r, alpha, s());
  }
  void moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S,
                            const MoeRouting& r, float scale) override {
    cuda::moe_seq_aux_backward(dlogits, f, scores, starts, S, r, scale, s());
  }
  void moe_count(float* load, const int32_t* offsets, int E) override { cuda::moe_count(load, offsets, E, s()); }

  // ---- embeddings, loss ----
  void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                         int64_t N, int C) override {
    cuda::embedding_forward(out, tokens, pos, wte, wpe, N, C, s());
  }
  void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                          int64_t N, int C) override {
    void* sc = scratch("embedding_backward", cuda::embedding_backward_scratch_bytes(N));
    cuda::embedding_backward(dwte, dwpe, dout, tokens, pos, N, C, sc, s());
  }
  void softmax_crossentropy(Act logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                            float grad_scale) override {
    if (logits.dtype == DType::F32)
      cuda::softmax_crossentropy(static_cast<float*>(logits.p), losses, targets, N, V, ld, grad_scale, s());
    else
      cuda::softmax_crossentropy(H(logits), losses, targets, N, V, ld, grad_scale, s());
  }

  // ---- optimizer ----
  void adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n,
                    const AdamWHyper& h) override {
    cuda::adamw_update(param, param16, grad, m, v, n, h, s());
  }
  double sum_squares(const float* x, int64_t n) override {
    // The optimizer's buffer, sized on its first call (before the steps that must not allocate).
    const size_t need = (1 + cuda::sum_squares_scratch_floats(n)) * 4;
    if (norm_scratch_.size() < need) norm_scratch_.resize(need, "gradient norm scratch");
    float* out = norm_scratch_.as<float>();
    gpu::memset(out, 0, 4);
    cuda::sum_squares(out, x, n, out + 1, s());
    float sq = 0;
    gpu::copy_to_host(&sq, out, 4);
    return double(sq);
  }
  void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t) override {
    KILN_CHECK(t == LowpType::BF16, "the cuda backend's 16-bit type is bf16");
    cuda::cast(dst, src, n, s());
  }
  void argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld) override {
    cuda::argmax_rows(out, x, rows, n, ld, s());
  }

 private:
  static void* s() { return gpu::stream(); }
  // The MoE router: an fp32 weight without a bf16 copy (nn.Linear, no bias) and fp32 logits.
  static bool fp32_router(Act y, const Weight& w, int64_t ld) {
    return y.dtype == DType::F32 && w.w && !w.b && w.layout == Layout::OutIn && (ld == 0 || ld == w.out);
  }
  // The reserved scratch, checked against what this call needs.
  float* scratch(const char* op, size_t bytes) {
    KILN_CHECK(bytes <= scratch_.size(), "cuda ", op, ": needs ", bytes, " bytes of scratch, the plan reserved ",
               scratch_.size(), " (plan the model for this shape first)");
    return scratch_.as<float>();
  }
  // q8_0 quantizes x into the scratch; the 16-bit formats need none.
  void* narrow_scratch(const Weight& w, int64_t N) {
    if (w.narrow->fmt != WeightFormat::Q8_0) return nullptr;
    return scratch("narrow_gemm", cuda::narrow_gemm_scratch_bytes(N, w.in));
  }
  gpu::DeviceBuffer scratch_, norm_scratch_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace kiln::nn
