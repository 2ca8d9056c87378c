// Elementwise ops: the feed-forward activations and residual add.
//   GeluTanh  0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³)))   GPT-2's "gelu_new", "gelu_pytorch_tanh"
//   GeluErf   0.5·x·(1 + erf(x/√2))                          "gelu"
//   Relu      max(x, 0)
//   Silu      x·sigmoid(x)                                  "silu" / "swish" (SwiGLU's gate)
//   Relu2     max(x, 0)²                                    "relu2"
// Gated feed-forwards (SwiGLU, GeGLU) read rows of [gate | up], 2·I values each (the fused gate and up
// projections' output): out[n][i] = act(gate[n][i]) · up[n][i], out is [N, I].
// Backwards overwrite dinp / dgate_up, which may alias dout only for the plain (ungated) ops.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/decode_attention.h"  // KVPages

namespace kiln {

enum class Activation : uint8_t { GeluTanh, GeluErf, Relu, Silu, Relu2 };

namespace cpu {
void activation_forward(float* out, const float* inp, int64_t n, Activation a);
void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a);
void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a);
void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a);
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
// out = a + b (out may alias a or b)
void add(float* out, const float* a, const float* b, int64_t n);
}  // namespace cpu
// cuda:: (kernels/cuda/activation.cu): the same ops on the GPU in bf16 (uint16_t storage, fp32 math) or fp32,
// plus the casts between them and the fp32 residual add of a bf16 branch. All run on `stream`.
namespace cuda {
void gelu_forward(uint16_t* out, const uint16_t* inp, int64_t n, void* stream);
void gelu_forward(float* out, const float* inp, int64_t n, void* stream);
// dinp may alias dout.
void gelu_backward(uint16_t* dinp, const uint16_t* inp, const uint16_t* dout, int64_t n, void* stream);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream);
// out = a + b in fp32 (out may alias a).
void add(float* out, const float* a, const uint16_t* b, int64_t n, void* stream);
void add(float* out, const float* a, const float* b, int64_t n, void* stream);
// Round to nearest even / widen exactly.
void cast(uint16_t* out, const float* inp, int64_t n, void* stream);
void cast(float* out, const uint16_t* inp, int64_t n, void* stream);
// N rows of `width` values from src (row stride ld_src) to dst (row stride ld_dst), exactly.
void copy_rows(uint16_t* dst, int64_t ld_dst, const uint16_t* src, int64_t ld_src, int64_t N, int64_t width,
               void* stream);
void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t N, int64_t width, void* stream);
// Multi-head latent attention's glue (nn/backend.h): out[n][0, width) = Σ_h in[n·ld_in + h·head_stride + [0,
// width)] summed in fp32 and rounded once (out overwritten); rows_append copies B·Tq rows of `width` (row stride
// ld_src) into a per-sequence cache [B][positions][width] (batch_stride apart) at positions past[b] + i (past:
// device [B]), exactly; with pages set, into a paged cache's blocks of rows of `width` (batch_stride unused).
void sum_heads(uint16_t* out, int64_t ld_out, const uint16_t* in, int64_t ld_in, int64_t N, int heads,
               int64_t head_stride, int width, void* stream);
void rows_append(uint16_t* cache, int64_t batch_stride, const uint16_t* src, int64_t ld_src, int width, int B, int Tq,
                 const int32_t* past, void* stream, const KVPages& pages = {});
// Any Activation, plain and gated (gate_up rows [gate | up] of 2·I values); dinp may alias dout (plain only).
void activation_forward(uint16_t* out, const uint16_t* inp, int64_t n, Activation a, void* stream);
void activation_forward(float* out, const float* inp, int64_t n, Activation a, void* stream);
void activation_backward(uint16_t* dinp, const uint16_t* inp, const uint16_t* dout, int64_t n, Activation a,
                         void* stream);
void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a, void* stream);
void gated_forward(uint16_t* out, const uint16_t* gate_up, int64_t N, int I, Activation a, void* stream);
void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a, void* stream);
void gated_backward(uint16_t* dgate_up, const uint16_t* gate_up, const uint16_t* dout, int64_t N, int I,
                    Activation a, void* stream);
void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a,
                    void* stream);
}  // namespace cuda
namespace ref {
void activation_forward(float* out, const float* inp, int64_t n, Activation a);
void activation_backward(float* dinp, const float* inp, const float* dout, int64_t n, Activation a);
void gated_forward(float* out, const float* gate_up, int64_t N, int I, Activation a);
void gated_backward(float* dgate_up, const float* gate_up, const float* dout, int64_t N, int I, Activation a);
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
void add(float* out, const float* a, const float* b, int64_t n);
}  // namespace ref
}  // namespace kiln
