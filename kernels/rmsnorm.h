// RMSNorm over rows of C values: out = x · rstd · weight, rstd = 1 / sqrt(mean(x²) + eps) (Llama, Mistral,
// Qwen). One call also serves the per-head q/k norms of Qwen3: a token's row holds `heads` groups of C values
// side by side (row stride ld, in floats; ld = 0 means heads·C), and each group is normalised on its own with
// the same weight[C]. rstd is saved per group, [N·heads] (token-major).
//
// Sums run in fp32 as Hugging Face's LlamaRMSNorm does (x²'s mean in fp32, then x·rstd, then ·weight).
// Gradients: dweight accumulates (+=). dinp accumulates (+=) when `accumulate` (the residual stream's
// gradient, to which the normalised branch adds its share) and is overwritten otherwise; when overwritten
// it may alias dout (each row is read whole before it is written).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads = 1, int64_t ld = 0);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads = 1, int64_t ld = 0);
}  // namespace cpu
// cuda:: (kernels/cuda/rmsnorm.cu). The residual-stream form reads the fp32 stream and the fp32 weight and
// writes bf16 or fp32 (one group per row, heads = 1); the backward reads dout in the same type and writes
// dinp in fp32 (+= when `accumulate`, else =). The per-head form (Qwen3's q/k norms) reads and writes bf16
// rows of the qkv buffer in place or not (in and out share `ld`, in elements; 0: heads·C), its backward
// writes bf16 dinp (may alias dout). dweight accumulates (+=) deterministically: per-block partial sums in
// `scratch`, rmsnorm_backward_scratch_floats(N·heads, C) floats, then one reduction in block order.
namespace cuda {
void rmsnorm_forward(uint16_t* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     void* stream);
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     void* stream);
void rmsnorm_forward(uint16_t* out, float* rstd, const uint16_t* inp, const float* weight, int64_t N, int C,
                     float eps, int heads, int64_t ld, void* stream);
size_t rmsnorm_backward_scratch_floats(int64_t groups, int C);
void rmsnorm_backward(float* dinp, float* dweight, const uint16_t* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, float* scratch, void* stream);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, float* scratch, void* stream);
void rmsnorm_backward(uint16_t* dinp, float* dweight, const uint16_t* dout, const uint16_t* inp,
                      const float* weight, const float* rstd, int64_t N, int C, bool accumulate, int heads,
                      int64_t ld, float* scratch, void* stream);
}  // namespace cuda
namespace ref {
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads = 1, int64_t ld = 0);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads = 1, int64_t ld = 0);
}  // namespace ref
}  // namespace kiln
