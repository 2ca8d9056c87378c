// Matrix-vector products for decoding one token: every weight is read once, so these are memory-bound and
// the whole game is streaming the matrix at full bandwidth.
//
//   vecmat: y[N] = (accumulate ? y : 0) + x[K] · W[K, N] (+ bias[N])   W row-major: a Linear layer's Conv1D weight
//   matvec: y[M] = A[M, K] · x[K]                                       A row-major: the tied LM head, wte · h
//
// cpu:: splits the rows of the matrix over the threads, so each thread streams one contiguous slice of it
// (vecmat: each thread sums its rows into a private y, and the partial sums are added at the end; matvec: each
// thread owns its outputs). On this machine that reaches ~1.4x OpenBLAS's sgemv, which splits vecmat by
// columns. ref:: is a plain double-precision loop.
//
// The batch forms take R rows of x at once (a decoding step of R sequences, or a verification pass over R
// positions): the matrix is streamed once per call, not once per row, and no operand is packed (sgemm repacks
// the whole weight on every call, which at R <= 64 costs as much as the arithmetic). Each output is summed in one
// fixed order (k ascending from the old y, then the bias) whatever R and the thread count are, so a row's result
// is bit-identical to a one-row call: greedy decoding in a batch is exactly greedy decoding alone.
//   vecmat_batch: y[r·ldy + n] = (accumulate ? y : 0) + Σ_k x[r·ldx + k]·W[k, n] (+ bias[n])   W [K, N]
//   matvec_batch: y[r·ldy + m] = (accumulate ? y : 0) + Σ_k A[m, k]·x[r·ldx + k] (+ bias[m])   A [M, K]
// cpu:: splits the columns of W (vecmat) or the rows of A (matvec) over the threads; register tiles of up to
// 6 rows of x × 64 columns (vecmat) or 6 rows of A × 4 rows of x (matvec) reuse each loaded weight vector.
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
// The CPU backend's products take the batch forms up to this many rows, sgemm above (a long prompt's chunk): at 16,
// 32 and 64 rows of the GPT-2 shapes they measured 2-4x OpenBLAS's sgemm (bench/batch_gemv_bench.cpp).
constexpr int64_t kBatchGemvRows = 64;
void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate);
void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K);
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
