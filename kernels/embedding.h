// Token + position embedding: out[n] = wte[tokens[n]] + wpe[pos[n]].
// Position ids are explicit so packed sequences can restart them at each document. wpe (and dwpe) may be null:
// no learned positions (rotary models), out[n] = wte[tokens[n]].
// The backward accumulates (+=) into dwte and dwpe.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {
void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C);
}  // namespace cpu
// cuda:: (kernels/cuda/embedding.cu): fp32 tables and residual stream (wpe/dwpe may be null there too);
// the backward is deterministic (each table row's gradient is summed by one thread group in token order, no
// float atomics). positions/tokens are device arrays; `scratch` holds embedding_backward_scratch_bytes(N) bytes.
namespace cuda {
void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C, void* stream);
size_t embedding_backward_scratch_bytes(int64_t N);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C, void* scratch, void* stream);
}  // namespace cuda
namespace ref {
void embedding_forward(float* out, const int32_t* tokens, const int32_t* pos, const float* wte, const float* wpe,
                       int64_t N, int C);
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, const int32_t* pos,
                        int64_t N, int C);
}  // namespace ref
}  // namespace kiln
