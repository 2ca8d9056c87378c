// Elementwise ops: tanh-approximation GELU (GPT-2's "gelu_new") and residual add.
// gelu_backward overwrites dinp.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {
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
}  // namespace cuda
namespace ref {
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
void add(float* out, const float* a, const float* b, int64_t n);
}  // namespace ref
}  // namespace kiln
