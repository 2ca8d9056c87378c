// Token + position embedding: out[n] = wte[tokens[n]] + wpe[pos[n]].
// Position ids are explicit so packed sequences can restart them at each document.
// The backward accumulates (+=) into dwte and dwpe.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C);
}  // namespace cpu
namespace ref {
void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C);
}  // namespace ref
}  // namespace kiln
