// cuda::narrow_gemm (kernels/narrow_gemv.h): one warp per (matrix row, x row), its lanes striding over the
// columns (16-bit formats) or the 32-value blocks (q8_0), then a warp sum. q8_0 first quantizes x per block with
// the CPU's arithmetic (amax by a warp max, 127/amax, round to nearest even) into the scratch, so the int8 block
// sums are the same integers. A plain kernel: correct on every shape; the CPU path is the tuned one.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/simt.cuh"
#include "kernels/cuda/vec.cuh"
#include "kernels/narrow_gemv.h"

namespace kiln::cuda {
namespace {

constexpr int kWarps = 8;

// IEEE half bits to float (normals, subnormals, inf, NaN), the same on the GPU and in the emulator.
KILN_DEVICE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: man · 2^-24, exact in fp32
      float f = float(man) * 5.9604644775390625e-8f;
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

// x is fp32 (the op's plain form) or bf16 (the GPU backend's activations), widened as it is read.
template <class X>
KILN_GLOBAL void quantize_x_kernel(int8_t* qx, float* dx, const X* x, int64_t ldx, int64_t K, int64_t ld, int nb) {
  const int b = int(blockIdx.x) * kWarps + simt::warp_id(), n = int(blockIdx.y), lane = simt::lane_id();
  if (b >= nb) return;  // the whole warp
  const int64_t k = int64_t(b) * kQ8Block + lane;
  const float v = k < K ? simt::ld1(x + int64_t(n) * ldx + k) : 0.0f;
  const float amax = simt::warp_max(fabsf(v));
  const float id = amax > 0 ? 127.0f / amax : 0.0f;
  const float r = fminf(fmaxf(rintf(v * id), -127.0f), 127.0f);
  qx[int64_t(n) * ld + k] = int8_t(int(r));
  if (lane == 0) dx[int64_t(n) * nb + b] = amax / 127.0f;
}

// y[n, m] = (base ? base[n, m] : 0) + x[n]·A[m] + bias[m]; y fp32 or bf16 (rounded once, at the end); base
// fp32 with y's stride (it may be y itself: accumulate).
template <class X, class Y>
KILN_GLOBAL void narrow_kernel(Y* y, int64_t ldy, const float* base, const X* x, int64_t ldx, int fmt, const void* q,
                               const uint16_t* d, int64_t M, int64_t K, int64_t ld, const int8_t* qx, const float* dx,
                               const float* bias) {
  const int64_t m = int64_t(blockIdx.x) * kWarps + simt::warp_id();
  const int n = int(blockIdx.y), lane = simt::lane_id();
  if (m >= M) return;  // the whole warp
  float s = 0;
  if (fmt == int(WeightFormat::Q8_0)) {
    const int64_t nb = ld / kQ8Block;
    const uint8_t* w = static_cast<const uint8_t*>(q) + m * ld;
    const int8_t* xq = qx + int64_t(n) * ld;
    for (int64_t b = lane; b < nb; b += simt::kWarp) {
      // Σ (u − 128)·qx as Σ u·qx − 128·Σ qx (the first form meets a GCC 12 vectorizer bug in the emulator build).
      int t = 0, sq = 0;
      for (int i = 0; i < kQ8Block; i++) {
        t += int(w[b * kQ8Block + i]) * int(xq[b * kQ8Block + i]);
        sq += int(xq[b * kQ8Block + i]);
      }
      t -= 128 * sq;
      s += half_to_float(d[m * nb + b]) * dx[int64_t(n) * nb + b] * float(t);
    }
  } else {
    const uint16_t* w = static_cast<const uint16_t*>(q) + m * ld;
    const X* xr = x + int64_t(n) * ldx;
    const bool bf = fmt == int(WeightFormat::BF16);
    for (int64_t k = lane; k < K; k += simt::kWarp)
      s += (bf ? simt::bf16_to_f32(w[k]) : half_to_float(w[k])) * simt::ld1(xr + k);
  }
  s = simt::warp_sum(s);
  if (lane == 0) {
    if (bias) s += bias[m];
    const int64_t o = int64_t(n) * ldy + m;
    simt::st1(y + o, base ? base[o] + s : s);
  }
}

template <class X, class Y>
void run(Y* y, int64_t ldy, const float* base, const X* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
         const float* bias, void* scratch, void* stream) {
  if (N <= 0 || A.M <= 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  // The grid's y is the row of x: calls of more than 65535 rows (long prompts) go in pieces.
  constexpr int64_t kMaxRows = 65535;
  for (int64_t n0 = 0; n0 < N; n0 += kMaxRows) {
    const int64_t n = std::min(kMaxRows, N - n0);
    int8_t* qx = nullptr;
    float* dx = nullptr;
    if (A.fmt == WeightFormat::Q8_0) {
      const int nb = int(A.ld / kQ8Block);
      qx = static_cast<int8_t*>(scratch);
      dx = reinterpret_cast<float*>(static_cast<char*>(scratch) + (size_t(n * A.ld) + 15) / 16 * 16);
      simt::launch(quantize_x_kernel<X>, dim3(unsigned((nb + kWarps - 1) / kWarps), unsigned(n)), dim3(kWarps * 32), 0,
                   st, qx, dx, x + n0 * ldx, ldx, A.K, A.ld, nb);
    }
    simt::launch(narrow_kernel<X, Y>, dim3(unsigned((A.M + kWarps - 1) / kWarps), unsigned(n)), dim3(kWarps * 32), 0,
                 st, y + n0 * ldy, ldy, base ? base + n0 * ldy : nullptr, x + n0 * ldx, ldx, int(A.fmt), A.q, A.d, A.M,
                 A.K, A.ld, static_cast<const int8_t*>(qx), static_cast<const float*>(dx), bias);
  }
}

}  // namespace

size_t narrow_gemm_scratch_bytes(int64_t N, int64_t K) {
  N = std::min<int64_t>(N, 65535);  // run()'s largest piece
  const int64_t ld = (K + kQ8Block - 1) / kQ8Block * kQ8Block;
  return size_t(N * ld) + size_t(N * (ld / kQ8Block)) * sizeof(float) + 64;
}

void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate, void* scratch, void* stream) {
  run(y, ldy, accumulate ? y : nullptr, x, ldx, N, A, bias, scratch, stream);
}

void narrow_gemm(float* y, int64_t ldy, const float* base, const uint16_t* x, int64_t ldx, int64_t N,
                 const NarrowMatrix& A, const float* bias, void* scratch, void* stream) {
  run(y, ldy, base, x, ldx, N, A, bias, scratch, stream);
}

void narrow_gemm(uint16_t* y, int64_t ldy, const uint16_t* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, void* scratch, void* stream) {
  run(y, ldy, static_cast<const float*>(nullptr), x, ldx, N, A, bias, scratch, stream);
}

}  // namespace kiln::cuda
