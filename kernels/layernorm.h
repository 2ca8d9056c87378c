// LayerNorm over the last dimension C: out = (x - mean) · rstd · weight + bias.
// The forward saves mean and rstd per row for the backward.
// Gradients accumulate (+=) into dinp, dweight and dbias: dinp is usually the residual stream's
// gradient, to which the normalised branch adds its share.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C);
}  // namespace cpu
// cuda:: (kernels/cuda/layernorm.cu): the input is the fp32 residual stream, the weights are the fp32
// master parameters, the output (the next matmul's operand) is bf16 or fp32. The backward reads dout in the
// same type, accumulates (+=) dinp in fp32 and dweight/dbias in fp32 (deterministically: per-block partial
// sums in `scratch`, layernorm_backward_scratch_floats(N, C) floats, then one reduction).
namespace cuda {
void layernorm_forward(uint16_t* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps, void* stream);
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps, void* stream);
size_t layernorm_backward_scratch_floats(int64_t N, int C);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const uint16_t* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C,
                        float* scratch, void* stream);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C,
                        float* scratch, void* stream);
}  // namespace cuda
namespace ref {
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int C, float eps);
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int C);
}  // namespace ref
}  // namespace kiln
