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
#pragma once
#include <cstdint>

namespace kiln {
namespace cpu {
void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate);
void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K);
}  // namespace cpu
namespace ref {
void vecmat(float* y, const float* x, const float* W, const float* bias, int64_t K, int64_t N, bool accumulate);
void matvec(float* y, const float* A, const float* x, int64_t M, int64_t K);
}  // namespace ref
}  // namespace kiln
