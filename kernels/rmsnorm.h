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
#include <cstdint>

namespace kiln {
namespace cpu {
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads = 1, int64_t ld = 0);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads = 1, int64_t ld = 0);
}  // namespace cpu
namespace ref {
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int C, float eps,
                     int heads = 1, int64_t ld = 0);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int C, bool accumulate, int heads = 1, int64_t ld = 0);
}  // namespace ref
}  // namespace kiln
