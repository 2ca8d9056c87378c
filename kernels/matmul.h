// Matrix products for Linear layers. Weights use Hugging Face's Conv1D layout [in, out], so files map
// straight to memory: out[N, OC] = inp[N, C] · weight[C, OC] + bias[OC].
//
// Gradients: dinp is overwritten; dweight and dbias accumulate (+=), so gradient accumulation over
// micro-batches needs no extra buffers. Any of dinp, dweight, dbias may be null (not computed).
#pragma once
#include <cstdint>

namespace kiln {

// Row-major GEMM: C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] + beta · C, op = transpose if the flag is set.
// lda/ldb/ldc are row strides of the stored (untransposed) matrices.
namespace cpu {
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int C,
                    int OC);
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC);
}  // namespace cpu

namespace ref {
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int C,
                    int OC);
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC);
}  // namespace ref

}  // namespace kiln
