// Default op bodies: a backend that lacks an op says so in one line.
#include "core/error.h"
#include "nn/backend.h"

namespace kiln::nn {

namespace {
[[noreturn]] void fail_op(const char* op, const char* backend) {
  fail("the ", backend, " backend has no ", op, " yet");
}
}  // namespace
#define unsupported(op) fail_op(op, name())

void Backend::linear_forward(Act y, Act x, const Weight& w, int64_t N, int64_t ld) { unsupported("linear_forward"); }
void Backend::linear_residual(float* out, const float* residual, Act x, const Weight& w, int64_t N) { unsupported("linear_residual"); }
void Backend::linear_backward(Act dx, Act dy, Act x, const Weight& w, int64_t N, int64_t ld) { unsupported("linear_backward"); }
Act Backend::residual_operand(float* dres, Act scratch, int64_t n) { unsupported("residual_operand"); }
void Backend::layernorm_forward(Act out, float* mean, float* rstd, const float* x, const float* w, const float* b, int64_t N, int C, float eps) { unsupported("layernorm_forward"); }
void Backend::layernorm_backward(float* dx, float* dw, float* db, Act dout, const float* x, const float* w, const float* mean, const float* rstd, int64_t N, int C) { unsupported("layernorm_backward"); }
void Backend::rmsnorm_forward(Act out, float* rstd, const float* x, const float* w, int64_t N, int C, float eps) { unsupported("rmsnorm_forward"); }
void Backend::rmsnorm_backward(float* dx, float* dw, Act dout, const float* x, const float* w, const float* rstd, int64_t N, int C) { unsupported("rmsnorm_backward"); }
void Backend::head_rmsnorm_forward(Act out, float* rstd, Act in, const float* w, int64_t N, int C, int heads, int64_t ld, float eps) { unsupported("head_rmsnorm_forward"); }
void Backend::head_rmsnorm_backward(Act din, float* dw, Act dout, Act in, const float* w, const float* rstd, int64_t N, int C, int heads, int64_t ld) { unsupported("head_rmsnorm_backward"); }
void Backend::rope_forward(Act x, const int32_t* pos, int64_t N, const RopeParams& p) { unsupported("rope_forward"); }
void Backend::rope_backward(Act dx, const int32_t* pos, int64_t N, const RopeParams& p) { unsupported("rope_backward"); }
void Backend::activation_forward(Act out, Act in, int64_t n, Activation a) { unsupported("activation_forward"); }
void Backend::activation_backward(Act din, Act in, Act dout, int64_t n, Activation a) { unsupported("activation_backward"); }
void Backend::gated_forward(Act out, Act gate_up, int64_t N, int I, Activation a) { unsupported("gated_forward"); }
void Backend::gated_backward(Act dgate_up, Act gate_up, Act dout, int64_t N, int I, Activation a) { unsupported("gated_backward"); }
void Backend::add(float* out, const float* a, const float* b, int64_t n) { unsupported("add"); }
void Backend::copy_rows(Act dst, int64_t ld_dst, Act src, int64_t ld_src, int64_t N, int64_t width) { unsupported("copy_rows"); }
void Backend::actnorm_forward(float* y, double* logdet, const float* x, const float* logs, const float* bias, int B, int C, int64_t HW) { unsupported("actnorm_forward"); }
void Backend::actnorm_backward(float* dx, float* dlogs, float* dbias, const float* dy, const float* x, const float* logs, double wsum, int B, int C, int64_t HW) { unsupported("actnorm_backward"); }
void Backend::actnorm_inverse(float* x, const float* y, const float* logs, const float* bias, int B, int C, int64_t HW) { unsupported("actnorm_inverse"); }
void Backend::actnorm_init(float* logs, float* bias, const float* x, int B, int C, int64_t HW) { unsupported("actnorm_init"); }
void Backend::flow_gather(Act xa, const float* x, const FlowCoupling& c) { unsupported("flow_gather"); }
void Backend::flow_gather_backward(float* dx, Act dxa, const FlowCoupling& c) { unsupported("flow_gather_backward"); }
void Backend::coupling_forward(float* y, double* logdet, const float* x, const float* out, const float* scale, const FlowCoupling& c) { unsupported("coupling_forward"); }
void Backend::coupling_backward(float* dx, Act dout, float* dscale, const float* dy, const float* x, const float* out, const float* scale, const double* w, const FlowCoupling& c) { unsupported("coupling_backward"); }
void Backend::coupling_inverse(float* x, const float* y, const float* out, const float* scale, const FlowCoupling& c) { unsupported("coupling_inverse"); }
void Backend::pixel_shuffle(float* out, const float* in, int B, int C, int H, int W, int r) { unsupported("pixel_shuffle"); }
void Backend::pixel_unshuffle(float* out, const float* in, int B, int C, int H, int W, int r) { unsupported("pixel_unshuffle"); }
void Backend::modulate_forward(Act out, Act x, Act shift, Act scale, int B, int T, int C, int64_t ld) { unsupported("modulate_forward"); }
void Backend::modulate_backward(Act dx, Act dshift, Act dscale, Act dout, Act x, Act scale, int B, int T, int C, int64_t ld) { unsupported("modulate_backward"); }
void Backend::gate_forward(float* y, const float* res, const float* u, Act gate, int B, int T, int C, int64_t ld) { unsupported("gate_forward"); }
void Backend::gate_backward(Act du, Act dgate, const float* dy, const float* u, Act gate, int B, int T, int C, int64_t ld) { unsupported("gate_backward"); }
void Backend::attention_forward(Act out, float* lse, Act qkv, const AttentionParams& p) { unsupported("attention_forward"); }
void Backend::attention_backward(Act dqkv, Act dout, Act qkv, Act out, const float* lse, const AttentionParams& p) { unsupported("attention_backward"); }
void Backend::decode_attention(const DecodeAttentionParams& p) { unsupported("decode_attention"); }
void Backend::kv_append(Act k_cache, Act v_cache, int64_t batch_stride, Act qkv, int NH, int NKV, int HD, int B, int Tq, const int32_t* past, const KVPages&) { unsupported("kv_append"); }
void Backend::sum_heads(Act out, int64_t ld_out, Act in, int64_t ld_in, int64_t N, int heads, int64_t head_stride, int width) { unsupported("sum_heads"); }
void Backend::rows_append(Act cache, int64_t batch_stride, Act src, int64_t ld_src, int width, int B, int Tq, const int32_t* past, const KVPages& pages) { unsupported("rows_append"); }
void Backend::moe_route(float* scores, int32_t* idx, float* w, const float* logits, const float* bias, int64_t N, const MoeRouting& r) { unsupported("moe_route"); }
void Backend::moe_route_backward(float* dlogits, const float* dw, const float* scores, const int32_t* idx, int64_t N, const MoeRouting& r) { unsupported("moe_route_backward"); }
void Backend::moe_dispatch(int32_t* offsets, int32_t* row_token, int32_t* slot, const int32_t* idx, int64_t N, int K, int E) { unsupported("moe_dispatch"); }
void Backend::moe_gather(Act xs, Act x, const int32_t* row_token, int64_t R, int C) { unsupported("moe_gather"); }
void Backend::moe_gather_backward(Act dx, Act extra, Act dxs, const int32_t* slot, int64_t N, int K, int C) { unsupported("moe_gather_backward"); }
void Backend::moe_combine(float* y, const float* residual, Act ys, const int32_t* slot, const float* w, int64_t N, int K, int C) { unsupported("moe_combine"); }
void Backend::moe_combine_backward(Act dys, float* dw, Act dy, Act ys, const int32_t* slot, const float* w, int64_t N, int K, int C) { unsupported("moe_combine_backward"); }
void Backend::grouped_linear_forward(Act y, int64_t ldy, Act x, const float* w, const int32_t* offsets, int E, int in, int out) { unsupported("grouped_linear_forward"); }
void Backend::grouped_linear_backward(Act dx, float beta, float* dw, Act dy, int64_t ldy, Act x, const float* w, const int32_t* offsets, int E, int in, int out) { unsupported("grouped_linear_backward"); }
double Backend::moe_seq_aux(float* f, const float* scores, const int32_t* idx, const int32_t* starts, int S, const MoeRouting& r, float alpha) { unsupported("moe_seq_aux"); }
void Backend::moe_seq_aux_backward(float* dlogits, const float* f, const float* scores, const int32_t* starts, int S, const MoeRouting& r, float scale) { unsupported("moe_seq_aux_backward"); }
void Backend::moe_count(float* load, const int32_t* offsets, int E) { unsupported("moe_count"); }
void Backend::embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe, int64_t N, int C) { unsupported("embedding_forward"); }
void Backend::embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos, int64_t N, int C) { unsupported("embedding_backward"); }
void Backend::softmax_crossentropy(Act logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld, float grad_scale) { unsupported("softmax_crossentropy"); }
void Backend::adamw_update(float* param, uint16_t* param16, float* grad, float* m, float* v, int64_t n, const AdamWHyper& h) { unsupported("adamw_update"); }
double Backend::sum_squares(const float* x, int64_t n) { unsupported("sum_squares"); }
void Backend::to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t) { unsupported("to_lowp"); }
void Backend::argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld) { unsupported("argmax_rows"); }

}  // namespace kiln::nn
