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

// The fp32 products run on OpenBLAS, which picks its kernels from the CPU model when it loads. On a host it
// does not recognise (a virtual machine calling itself "Intel Xeon Processor") it falls back to its SSE3
// "Prescott" kernels, 3-4x slower than the AVX-512 ones the CPU has. blas_core(): the kernels in use.
// blas_core_for_this_cpu(): the OPENBLAS_CORETYPE the CPU's features call for when the detected core is one of
// those pre-AVX2 fallbacks (SkylakeX with AVX-512, Haswell with AVX2), else null. It must be set before the
// library loads, so the kiln CLI sets it and re-executes itself (tools/kiln/main.cpp).
const char* blas_core();
const char* blas_core_for_this_cpu();
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC);
}  // namespace cpu

// cuda:: (kernels/cuda/matmul.cu): bf16 operands (uint16_t storage), fp32 accumulation, through cuBLASLt on the
// GPU. Row-major calls are translated once into cuBLASLt's column-major call (C^T = op(B)^T · op(A)^T); the
// emulated build runs that same column-major call (transposes, m/n/k, leading dimensions, alpha/beta, bias
// and GELU epilogues) as plain loops, so the translation is tested without a GPU. cuBLASLt's plans (matmul
// descriptor, layouts, heuristic's algorithm) are cached per shape, the 32 MiB workspace is allocated once:
// a steady-state step does no cuBLASLt setup and no allocation. Everything runs on `stream`
// (kiln::gpu::stream(); the plans' shared bias scratch assumes one stream). Bad shapes fail naming the call.
//
// cuBLASLt wants a bf16 output's bias in bf16 (the bias type is D's type), so a bf16-output matmul first
// rounds the fp32 bias into a bf16 scratch copy (OC <= 65536); fp32-output calls take the fp32 bias as is.
namespace cuda {
// out[N, OC] = inp · weight + bias (bias may be null). With gelu_pre: gelu_pre = inp · weight + bias and
// out = gelu_tanh(gelu_pre) (cuBLASLt's GELU_AUX epilogue when OC % 8 == 0, else a separate pass).
void matmul_forward(uint16_t* out, const uint16_t* inp, const uint16_t* weight, const float* bias, int64_t N,
                    int C, int OC, void* stream, uint16_t* gelu_pre = nullptr);
// The same with the bias already in bf16 (the model's bf16 parameter copy): no rounding pass before the
// product, one kernel per call (what the CUDA-graph decode step wants).
void matmul_forward_bf16_bias(uint16_t* out, const uint16_t* inp, const uint16_t* weight, const uint16_t* bias,
                              int64_t N, int C, int OC, void* stream, uint16_t* gelu_pre = nullptr);
// out = residual + inp · weight + bias in fp32 (the fused residual add; out may alias residual).
void matmul_forward_residual(float* out, const float* residual, const uint16_t* inp, const uint16_t* weight,
                             const float* bias, int64_t N, int C, int OC, void* stream);
// dinp (bf16, overwritten) = dout · weight^T; dweight (fp32) += inp^T · dout, accumulated by the matmul itself
// (beta = 1); dbias (fp32) += dout's column sums (a deterministic reduction). dinp and dbias may be null.
void matmul_backward(uint16_t* dinp, float* dweight, float* dbias, const uint16_t* dout, const uint16_t* inp,
                     const uint16_t* weight, int64_t N, int C, int OC, void* stream);
// A Linear layer's product in either weight layout: weight [C, OC] (Conv1D), or with w_oc_c [OC, C] (nn.Linear):
// out[N, OC] (row stride ld_out) = inp · W + bias, bias (fp32, may be null) fused in the epilogue. The fp32 form
// adds residual (may alias out; null: none) as the residual-stream update does.
void linear_forward(uint16_t* out, int64_t ld_out, const uint16_t* inp, const uint16_t* weight, bool w_oc_c,
                    const float* bias, int64_t N, int C, int OC, void* stream);
void linear_forward(float* out, int64_t ld_out, const float* residual, const uint16_t* inp, const uint16_t* weight,
                    bool w_oc_c, const float* bias, int64_t N, int C, int OC, void* stream);
// Its backward: dinp (bf16, overwritten) = dout · Wᵀ, dweight (fp32, in W's layout) += the weight gradient,
// dbias += dout's column sums; dout has row stride ld_dout. Any of dinp, dweight, dbias may be null.
void linear_backward(uint16_t* dinp, float* dweight, float* dbias, const uint16_t* dout, int64_t ld_dout,
                     const uint16_t* inp, const uint16_t* weight, bool w_oc_c, int64_t N, int C, int OC, void* stream);
// Row-major like cpu::gemm; with beta == 0, C is not read. bf16 or fp32 output.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
          int64_t lda, const uint16_t* B, int64_t ldb, float beta, uint16_t* C, int64_t ldc, void* stream);
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
          int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C, int64_t ldc, void* stream);
}  // namespace cuda

namespace ref {
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int64_t N, int C,
                    int OC);

// The fp32 products run on OpenBLAS, which picks its kernels from the CPU model when it loads. On a host it
// does not recognise (a virtual machine calling itself "Intel Xeon Processor") it falls back to its SSE3
// "Prescott" kernels, 3-4x slower than the AVX-512 ones the CPU has. blas_core(): the kernels in use.
// blas_core_for_this_cpu(): the OPENBLAS_CORETYPE the CPU's features call for when the detected core is one of
// those pre-AVX2 fallbacks (SkylakeX with AVX-512, Haswell with AVX2), else null. It must be set before the
// library loads, so the kiln CLI sets it and re-executes itself (tools/kiln/main.cpp).
const char* blas_core();
const char* blas_core_for_this_cpu();
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int C, int OC);
}  // namespace ref

}  // namespace kiln
