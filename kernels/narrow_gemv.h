// Matrix products that read the weight in a narrow format, for decoding: one token reads every weight once,
// so reading 2 bytes (bf16, f16) or 34/32 bytes (q8_0) per weight instead of 4 is the speed-up.
//
// The matrix is A[M, K] with K contiguous (nn.Linear's [out, in]; a Conv1D [in, out] weight is transposed
// when it is converted): each output y[m] is one dot product of a row with x, so a thread streams a
// contiguous slice of rows. Formats:
//   bf16, f16  one 16-bit value per weight (round to nearest even from fp32).
//   q8_0       llama.cpp's Q8_0: blocks of 32 weights along K, each an f16 scale d = amax/127 (rounded to
//              f16) and 32 int8 q = round(w / d) in [-127, 127]; w ≈ d·q. Rows are padded to a multiple of
//              32 with zero weights. Stored as two arrays: q [M][ld] as bytes q + 128 (offset binary: what
//              VNNI's unsigned-by-signed byte product reads), d [M][ld/32] f16.
// Products (y[n, M] = x[n, K] · Aᵀ):
//   bf16, f16  fp32 x times the weight widened to fp32, fp32 sums.
//   q8_0       x quantized per block of 32 the same way (fp32 scale dx = amax/127, qx = round(x/dx)), the
//              int8·int8 block sums exact in int32, then Σ_blocks d·dx·sum in fp32 (llama.cpp's Q8_0 × Q8_0).
// Each output row's value does not depend on how many rows of x a call takes (the same sums in the same order
// for N = 1 and N = 8), so a verification pass over K+1 positions computes what K+1 single steps would.
//
// cpu:: dispatches at run time: AVX-512 (F/BW/VL) with VNNI (vpdpbusd) for q8_0, F16C widening for f16, a
// shift for bf16; AVX2 + FMA + F16C where the CPU has no AVX-512 (vpmaddubsw for q8_0); a portable loop
// elsewhere. Calls with more than kNarrowDirectRows rows of x (a prompt) widen tiles of the matrix to fp32 and
// run sgemm on them (x unquantized). ref:: is a plain loop with the same quantization of x and double sums.
// cuda:: is a plain warp-per-output kernel (checked on the SIMT emulator through tests/ops/), which the GPU
// backend runs for every row count (a prompt too) when a weight has a narrow copy on the device
// (models/narrow_weights.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace kiln {

enum class WeightFormat : uint8_t { F32, BF16, F16, Q8_0 };
const char* weight_format_name(WeightFormat f);  // "f32", "bf16", "f16", "q8_0"
// Parses a name above; nullopt otherwise.
std::optional<WeightFormat> parse_weight_format(const std::string& s);
constexpr int kQ8Block = 32;

// A narrow copy of one weight matrix. fmt is never F32 (an fp32 weight has no narrow copy).
struct NarrowMatrix {
  WeightFormat fmt = WeightFormat::BF16;
  int64_t M = 0, K = 0;
  int64_t ld = 0;                     // elements per stored row: K, or K rounded up to 32 (q8_0)
  const void* q = nullptr;            // bf16/f16: uint16 [M][ld]; q8_0: uint8 q + 128 [M][ld]
  const uint16_t* d = nullptr;        // q8_0: f16 scales [M][ld/32]; else null
};

// Bytes of the two arrays of a matrix [M, K] in a format (q first, then d, each 64-byte aligned).
size_t narrow_bytes(WeightFormat f, int64_t M, int64_t K);
// Converts fp32 A into `storage` (narrow_bytes of it) and returns the view. transposed: src is [K, M]
// (Conv1D), else [M, K].
NarrowMatrix narrow_convert(void* storage, WeightFormat f, const float* src, int64_t M, int64_t K, bool transposed);
// The weight [m, k] of a narrow matrix in fp32 (exact).
float narrow_at(const NarrowMatrix& A, int64_t m, int64_t k);

// Calls of cpu::narrow_gemm with more rows than this widen tiles and use sgemm. 64: a Medusa tree (up to 64
// nodes) or a verification pass stays on the direct path, where each row costs what a 1-row step's products do
// (the widening costs ~8 bf16 steps of a 32M model whatever the row count; direct rows ~0.2 step each).
constexpr int kNarrowDirectRows = 64;

namespace cpu {
// y[n·ldy + m] = (accumulate ? y : 0) + Σ_k x[n·ldx + k]·A[m, k] (+ bias[m]) for n < N, m < M.
void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate);
// Which kernel narrow_gemm runs for a format on this CPU ("avx512-vnni", "avx512", "avx2", "portable").
const char* narrow_kernel_name(WeightFormat f);
// The kernel levels, best last. narrow_limit_isa caps the level the kernels use (tests run each level this CPU
// has against ref::); the default is the best the CPU has.
enum class NarrowIsa : uint8_t { Portable, Avx2, Avx512 };
void narrow_limit_isa(NarrowIsa max);
}  // namespace cpu

namespace ref {
// q8_0's quantization of one block of activations: dx and qx as cpu:: computes them.
void quantize_q8_block(const float* x, int n, float* dx, int8_t* qx);
void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate);
}  // namespace ref

namespace cuda {
// The same product on the GPU (all pointers device memory, the matrix's q/d too; y fp32), with scratch of
// narrow_gemm_scratch_bytes (q8_0's quantized x). One warp per output: a plain kernel, not a tuned one.
size_t narrow_gemm_scratch_bytes(int64_t N, int64_t K);
void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate, void* scratch, void* stream);
// The GPU backend's forms, x bf16 (its activations): y fp32 = base + x·Aᵀ + bias (base fp32 of y's stride, may be
// y itself or null: the residual stream, the logits), or y bf16 = x·Aᵀ + bias (rounded once).
void narrow_gemm(float* y, int64_t ldy, const float* base, const uint16_t* x, int64_t ldx, int64_t N,
                 const NarrowMatrix& A, const float* bias, void* scratch, void* stream);
void narrow_gemm(uint16_t* y, int64_t ldy, const uint16_t* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, void* scratch, void* stream);
}  // namespace cuda

}  // namespace kiln
