// The products of a decoding step: R rows of x (one token of each of R sequences, or a verification pass over R
// positions; R = 1 is plain decoding) against a weight matrix. Decoding is memory-bound, so the matrix is
// streamed once per call, not once per row, and no operand is packed (sgemm repacks the whole weight on every call,
// which at R <= 64 costs as much as the arithmetic).
//   vecmat_batch: y[r·ldy + n] = (accumulate ? y : 0) + Σ_k x[r·ldx + k]·W[k, n] (+ bias[n])   W [K, N]: Conv1D
//   matvec_batch: y[r·ldy + m] = (accumulate ? y : 0) + Σ_k A[m, k]·x[r·ldx + k] (+ bias[m])   A [M, K]: nn.Linear,
//                                                                                             the tied LM head
// Each output is summed in one fixed order whatever R and the thread count are, so a row's result is
// bit-identical to a one-row call: greedy decoding in a batch is exactly greedy decoding alone.
// cpu:: splits the columns of W (vecmat) or the rows of A (matvec) over the threads; register tiles of up to
// 6 rows of x × 64 columns (vecmat) or 6 rows of A × 4 rows of x (matvec) reuse each loaded weight vector. At one
// row they stream at the machine's read bandwidth (0.92-0.98 of a plain streaming read, decode_bandwidth_bench).
// ref:: is a plain double-precision loop.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
// The CPU backend's products take the batch forms up to this many rows, sgemm above (a long prompt's chunk): at 16,
// 32 and 64 rows of the GPT-2 shapes they measured 2-4x OpenBLAS's sgemm (bench/batch_gemv_bench.cpp).
constexpr int64_t kBatchGemvRows = 64;
void vecmat_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* W, const float* bias,
                  int64_t K, int64_t N, bool accumulate);
void matvec_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* A, const float* bias,
                  int64_t M, int64_t K, bool accumulate);
}  // namespace cpu
namespace ref {
void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate);
void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K);
void vecmat_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* W, const float* bias,
                  int64_t K, int64_t N, bool accumulate);
void matvec_batch(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t R, const float* A, const float* bias,
                  int64_t M, int64_t K, bool accumulate);
}  // namespace ref
}  // namespace kiln
