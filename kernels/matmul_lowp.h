// Matrix products with 16-bit operands and fp32 accumulation, for mixed-precision training.
//
// Every product rounds both operands to the 16-bit type (round to nearest, ties to even) and accumulates
// in fp32; results, bias and gradients stay fp32. Activations live in fp32 memory and are converted while
// the kernel packs them; weights are usually passed already converted (the model keeps a 16-bit copy of
// each weight matrix, refreshed after every optimizer step), so only activations cost a conversion.
//
// BF16 runs on the AVX512-BF16 dot-product instructions (vdpbf16ps) where the build targets them, in a
// kernel of our own: about 1.9x fp32 sgemm at the GPT-2 training shapes on a 2-core Zen 4, level with
// oneDNN's bf16 matmul and needing no library (bench/lowp_gemm_bench.cpp measures all of them; Debian's
// OpenBLAS 0.3.21 is built without sbgemm). Those instructions treat subnormal bf16 operands as zero.
// FP16 has no arithmetic on this CPU: its operands are rounded to fp16, widened back to fp32 (exactly)
// and multiplied with fp32 sgemm. The product of two fp16 (or bf16) values is exact in fp32, so this is
// an exact emulation of fp16-operand / fp32-accumulate hardware, up to the order of the sums.
//
// Linear layers follow kernels/matmul.h: weight in Hugging Face Conv1D layout [C, OC]; dinp is
// overwritten; dweight and dbias accumulate (+=); any gradient pointer may be null. dbias is a plain
// fp32 column sum of dout (no product, so nothing is rounded).
#pragma once
#include <cstddef>
#include <cstdint>

namespace kiln {

enum class LowpType { BF16, FP16 };

const char* lowp_type_name(LowpType t);  // "bf16" / "fp16"

// A matrix operand given either in fp32 (rounded to the 16-bit type as it is read) or already in the
// 16-bit type. Exactly one of f32 / lowp is set; ld is the row stride of the stored matrix, in elements.
struct LowpOperand {
  const float* f32 = nullptr;
  const uint16_t* lowp = nullptr;
  int64_t ld = 0;
};
inline LowpOperand f32_operand(const float* p, int64_t ld) { return {p, nullptr, ld}; }
inline LowpOperand lowp_operand(const uint16_t* p, int64_t ld) { return {nullptr, p, ld}; }

// Scratch memory for one gemm_lowp / matmul_*_lowp call: at least this many bytes, 64-byte aligned. The
// size does not depend on the shapes (the kernels work through fixed-size blocks: 1.4 MiB of packed
// operands per thread), so a model allocates one block of it up front and passes it to every call.
// A product uses at most kLowpMaxThreads OpenMP threads.
constexpr int kLowpMaxThreads = 16;
constexpr size_t kLowpScratchBytes = size_t(kLowpMaxThreads) * (384 + 1024) * 512 * sizeof(uint16_t);

namespace cpu {
// dst[i] = src[i] rounded to the 16-bit type, round to nearest even. NaN stays NaN (quiet, sign and top
// payload bits kept); fp16 overflows to ±inf beyond its range like a real cast; subnormals are rounded
// exactly, not flushed. Threaded and vectorised.
void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t);
// dst[i] = src[i] widened to fp32 (exact).
void from_lowp(float* dst, const uint16_t* src, int64_t n, LowpType t);

// Row-major C[M, N] = alpha · op(A)[M, K] · op(B)[K, N] + beta · C with 16-bit operands, fp32
// accumulation; op = transpose when the flag is set. A is stored [M, K] (or [K, M] if trans_a), B is
// stored [K, N] (or [N, K] if trans_b). With beta == 0, C is not read (it may hold NaN).
void gemm_lowp(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc, void* scratch);

// The emulated path on its own (round blocks of both operands, widen, fp32 sgemm): what gemm_lowp runs
// for FP16, and for BF16 on a CPU without AVX512-BF16. Public so tests and benchmarks can reach it.
void gemm_lowp_sgemm(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc, void* scratch);
// True when this build runs BF16 products on the AVX512-BF16 kernel.
bool gemm_lowp_has_bf16_kernel();

// out[N, OC] = inp[N, C] · weight[C, OC] + bias, weight in the 16-bit type.
void matmul_forward_lowp(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int C, int OC, LowpType t, void* scratch);
// dinp = dout · weightᵀ (overwritten), dweight += inpᵀ · dout (fp32 gradient), dbias += colsum(dout).
void matmul_backward_lowp(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int C, int OC, LowpType t, void* scratch);
}  // namespace cpu

// Naive reference versions for tests: scalar conversions, operands rounded one at a time, sums in double.
namespace ref {
uint16_t round_to_bf16(float x);
uint16_t round_to_fp16(float x);
uint16_t round_to_lowp(float x, LowpType t);
float lowp_to_float(uint16_t h, LowpType t);

void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t);
void gemm_lowp(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc);
void matmul_forward_lowp(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int C, int OC, LowpType t);
void matmul_backward_lowp(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int C, int OC, LowpType t);
}  // namespace ref

}  // namespace kiln
