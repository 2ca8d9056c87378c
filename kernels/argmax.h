// Arg max over rows: the greedy choice of the next token, on the device so a decode step returns 4 bytes
// per sequence instead of a row of logits. Ties go to the lowest index; NaN never wins; a row with nothing
// but NaN gives 0 (the same rule as kiln::argmax in infer/sampler.h, the host version and the reference).
#pragma once
#include <cstdint>

namespace kiln {
// The host version: the arg max of x[0..n) (the lowest index among equal maxima; NaN never wins).
int32_t argmax(const float* x, int n);
}  // namespace kiln

namespace kiln::cuda {
// out[r] = arg max of x[r·ld .. r·ld + n) for r < rows (device arrays).
void argmax_rows(int32_t* out, const float* x, int64_t rows, int n, int64_t ld, void* stream);
}  // namespace kiln::cuda
