// Elementwise ops: tanh-approximation GELU (GPT-2's "gelu_new") and residual add.
// gelu_backward overwrites dinp.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
// out = a + b (out may alias a or b)
void add(float* out, const float* a, const float* b, int64_t n);
}  // namespace cpu
namespace ref {
void gelu_forward(float* out, const float* inp, int64_t n);
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);
void add(float* out, const float* a, const float* b, int64_t n);
}  // namespace ref
}  // namespace kiln
