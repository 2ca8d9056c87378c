// Fused softmax + cross-entropy over the vocabulary.
// logits: [N, V] with row stride ld. losses[n] = -log softmax(logits[n])[targets[n]].
// Rows whose target is negative are ignored (loss 0, gradient 0): prompts in supervised data, padding.
// When grad_scale != 0 the logits are overwritten in place by their gradient
//   dlogits = (softmax - onehot(target)) · grad_scale
// so no second N×V buffer exists. With grad_scale == 0 the logits are left untouched.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {
namespace cpu {
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale);
}
// cuda:: (kernels/cuda/crossentropy.cu): logits in bf16 (or fp32), each row's softmax computed in fp32;
// dlogits overwrite the logits in the same type. Columns V .. ld-1 (vocabulary padding) are ignored and
// their gradient is set to zero. targets and losses are device arrays.
namespace cuda {
void softmax_crossentropy(uint16_t* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale, void* stream);
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale, void* stream);
}  // namespace cuda
namespace ref {
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale);
}
}  // namespace kiln
