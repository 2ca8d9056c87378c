// LayerNorm over the last dimension C: out = (x - mean) · rstd · weight + bias.
// The forward saves mean and rstd per row for the backward.
// Gradients accumulate (+=) into dinp, dweight and dbias: dinp is usually the residual stream's
// gradient, to which the normalised branch adds its share.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C);
}  // namespace cpu
namespace ref {
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C);
}  // namespace ref
}  // namespace kiln
