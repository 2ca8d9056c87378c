// Fused softmax + cross-entropy over the vocabulary.
// logits: [N, V] with row stride ld. losses[n] = -log softmax(logits[n])[targets[n]].
// Rows whose target is negative are ignored (loss 0, gradient 0): prompts in supervised data, padding.
// When grad_scale != 0 the logits are overwritten in place by their gradient
//   dlogits = (softmax - onehot(target)) · grad_scale
// so no second N×V buffer exists. With grad_scale == 0 the logits are left untouched.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale);
}
namespace ref {
void softmax_crossentropy(float* logits, float* losses, const int32_t* targets, int64_t N, int V, int64_t ld,
                          float grad_scale);
}
}  // namespace kiln
