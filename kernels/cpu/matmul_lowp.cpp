// 16-bit-operand products on the CPU (see kernels/matmul_lowp.h).
//
// BF16 kernel (AVX512-BF16): the classic packed GEMM. For each block of KC depth and NC columns, the
// threads pack op(B) into panels of 64 columns, then for each block of MC rows they pack op(A) into
// panels of 6 rows, converting fp32 operands to bf16 as they pack; a 6×64 micro-kernel then runs
// vdpbf16ps over the packed panels with 24 fp32 accumulators in registers. Packed layouts hold
// "pairs": one 32-bit word is (x[k], x[k+1]) for two consecutive depths, which is what vdpbf16ps
// multiplies and adds into one fp32 lane. A thread computes the B panels it packed itself (same static
// split), so they stay in its own L2.
//
// Everything else (FP16, or BF16 on a CPU without AVX512-BF16) rounds blocks of both operands to the
// 16-bit type, widens them back to fp32 and calls sgemm: exact products, fp32 sums.
#include <cblas.h>
// GCC 12's _mm512_undefined_*() read themselves on purpose, which -Wmaybe-uninitialized flags in callers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "core/error.h"
#include "kernels/cpu/parallel.h"
#include "kernels/matmul.h"
#include "kernels/matmul_lowp.h"

namespace kiln::cpu {

// ---------------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------------
namespace {

// Exact round-to-nearest-even of 16 floats to bf16 in integer arithmetic (keeps subnormals, quiets
// NaN): the fix-up for lanes the hardware instruction flushes (it treats subnormal inputs as zero).
inline __m256i bf16_rne_exact(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// Lanes holding an fp32 subnormal (exponent 0, mantissa not 0).
inline __mmask16 subnormal_lanes(__m512 v) {
  const __m512i ax = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
  return _mm512_cmplt_epu32_mask(_mm512_sub_epi32(ax, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fffff));
}

// 16 floats (masked load) to 16 bf16, exactly.
inline __m256i bf16x16(__m512 v) {
#if defined(__AVX512BF16__)
  if (subnormal_lanes(v) == 0) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
  return bf16_rne_exact(v);
}

void to_bf16_range(uint16_t* dst, const float* src, int64_t b, int64_t e) {
  int64_t i = b;
#if defined(__AVX512BF16__)
  for (; i + 32 <= e; i += 32) {
    const __m512 lo = _mm512_loadu_ps(src + i), hi = _mm512_loadu_ps(src + i + 16);
    if ((subnormal_lanes(lo) | subnormal_lanes(hi)) == 0) {
      _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bf16_rne_exact(lo));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), bf16_rne_exact(hi));
    }
  }
#endif
  for (; i < e; i += 16) {
    const __mmask16 m = e - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e - i)) - 1);
    _mm256_mask_storeu_epi16(dst + i, m, bf16x16(_mm512_maskz_loadu_ps(m, src + i)));
  }
}

void to_fp16_range(uint16_t* dst, const float* src, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 m = e - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e - i)) - 1);
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(dst + i, m, h);
  }
}

inline __m512 widen16(__m256i h, LowpType t) {
  return t == LowpType::BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                             : _mm512_cvtph_ps(h);
}

void from_lowp_range(float* dst, const uint16_t* src, int64_t b, int64_t e, LowpType t) {
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 m = e - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, widen16(_mm256_maskz_loadu_epi16(m, src + i), t));
  }
}

// dst[i] = src[i] rounded to the 16-bit type and widened back to fp32.
void round_trip_range(float* dst, const float* src, int64_t n, LowpType t) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, src + i);
    const __m256i h = t == LowpType::BF16 ? bf16x16(v) : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm512_mask_storeu_ps(dst + i, m, widen16(h, t));
  }
}

int blas_int(int64_t v, const char* what) {
  KILN_CHECK(v >= 0 && v <= INT_MAX, "gemm_lowp: ", what, " = ", v, " does not fit a 32-bit BLAS integer");
  return int(v);
}

}  // namespace

void to_lowp(uint16_t* dst, const float* src, int64_t n, LowpType t) {
  parallel_ranges(n, [&](int64_t b, int64_t e) {
    if (t == LowpType::BF16) to_bf16_range(dst, src, b, e);
    else to_fp16_range(dst, src, b, e);
  });
}

void from_lowp(float* dst, const uint16_t* src, int64_t n, LowpType t) {
  parallel_ranges(n, [&](int64_t b, int64_t e) { from_lowp_range(dst, src, b, e, t); });
}

// ---------------------------------------------------------------------------------------------------
// Emulated path: round blocks to the 16-bit type, widen back, sgemm.
// ---------------------------------------------------------------------------------------------------
namespace {

// Block sizes of the emulated path: two fp32 blocks of kEmuRows × kEmuDepth fit the scratch.
constexpr int64_t kEmuRows = 1024, kEmuDepth = 512;
static_assert(2 * kEmuRows * kEmuDepth * sizeof(float) <= kLowpScratchBytes);

// dst[rows, cols] (row stride cols) = stored[r0.., c0..] rounded to the 16-bit type and widened.
void round_block(float* dst, const LowpOperand& m, int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                 LowpType t) {
#pragma omp parallel for schedule(static) if (rows * cols >= kSerialBelow)
  for (int64_t r = 0; r < rows; r++) {
    const int64_t at = (r0 + r) * m.ld + c0;
    if (m.lowp) from_lowp_range(dst + r * cols, m.lowp + at, 0, cols, t);
    else round_trip_range(dst + r * cols, m.f32 + at, cols, t);
  }
}

}  // namespace

void gemm_lowp_sgemm(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc, void* scratch) {
  float* abuf = static_cast<float*>(scratch);
  float* bbuf = abuf + kEmuRows * kEmuDepth;
  for (int64_t j0 = 0; j0 < N; j0 += kEmuRows) {
    const int64_t nb = std::min(kEmuRows, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kEmuDepth) {
      const int64_t kb = std::min(kEmuDepth, K - k0);
      // op(B) block [kb, nb], kept in the stored orientation: [kb, nb] or [nb, kb] if transposed.
      if (trans_b) round_block(bbuf, B, j0, k0, nb, kb, t);
      else round_block(bbuf, B, k0, j0, kb, nb, t);
      for (int64_t i0 = 0; i0 < M; i0 += kEmuRows) {
        const int64_t mb = std::min(kEmuRows, M - i0);
        if (trans_a) round_block(abuf, A, k0, i0, kb, mb, t);
        else round_block(abuf, A, i0, k0, mb, kb, t);
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    blas_int(mb, "M"), blas_int(nb, "N"), blas_int(kb, "K"), alpha, abuf,
                    trans_a ? int(mb) : int(kb), bbuf, trans_b ? int(kb) : int(nb), k0 == 0 ? beta : 1.0f,
                    C + i0 * ldc + j0, blas_int(ldc, "ldc"));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// BF16 packed kernel (AVX512-BF16)
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512BF16__)
namespace {

constexpr int kMR = 6, kNR = 64;         // micro-tile: 6 rows × 64 columns = 24 zmm accumulators
constexpr int64_t kKC = 256;             // depth of a block (128 pairs): a B micro-panel is 32 KiB
constexpr int64_t kMC = 64 * kMR;        // rows of a packed A block (384)
constexpr int64_t kNC = 16 * kNR;        // columns of a packed B block (1024)
static_assert((kMC * kKC + kKC * kNC) * sizeof(uint16_t) <= kLowpScratchBytes);

// A view of op(X) as rows × depth: element (r, k) is at p[r * rs + k * ks] with one of rs / ks equal to 1.
struct View {
  const float* f32;
  const uint16_t* lowp;
  int64_t rs, ks;
};

inline uint32_t pair_from(const View& v, int64_t r, int64_t k, int64_t kend) {
  const int64_t at = r * v.rs + k * v.ks;
  uint32_t lo, hi = 0;
  if (v.lowp) {
    lo = v.lowp[at];
    if (k + 1 < kend) hi = v.lowp[at + v.ks];
  } else {
    lo = uint16_t(_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(v.f32[at]))));
    if (k + 1 < kend) hi = uint16_t(_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set_ss(v.f32[at + v.ks]))));
  }
  return lo | (hi << 16);
}

// Packs rows [r0, r0 + R) (rows >= rend are zero) × depths [k0, k0 + kc) of a depth-contiguous view
// (ks == 1) into dst[kp * R + r]: each row's depths convert straight to consecutive pairs.
template <int R>
void pack_depth_contiguous(uint32_t* dst, const View& v, int64_t r0, int64_t rend, int64_t k0, int64_t kc) {
  const int64_t kp = (kc + 1) / 2, full = kc / 32 * 32;  // full: depths handled 32 at a time
  alignas(64) uint32_t tmp[16];
  for (int r = 0; r < R; r++) {
    uint32_t* d = dst + r;
    if (r0 + r >= rend) {
      for (int64_t p = 0; p < kp; p++) d[p * R] = 0;
      continue;
    }
    const int64_t base = (r0 + r) * v.rs + k0;
    int64_t k = 0;
    for (; k < full; k += 32) {
      __m512i w;
      if (v.lowp) w = _mm512_loadu_si512(v.lowp + base + k);
      else w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(v.f32 + base + k + 16), _mm512_loadu_ps(v.f32 + base + k));
      _mm512_store_si512(tmp, w);
      uint32_t* dd = d + (k / 2) * R;
      for (int q = 0; q < 16; q++) dd[q * R] = tmp[q];
    }
    for (; k < kc; k += 2) d[(k / 2) * R] = pair_from(v, r0 + r, k0 + k, k0 + kc);
  }
}

// Packs a row-contiguous view (rs == 1): for each pair of depths, R consecutive elements of two stored
// rows are converted and interleaved into R pairs.
template <int R>
void pack_row_contiguous(uint32_t* dst, const View& v, int64_t r0, int64_t rend, int64_t k0, int64_t kc) {
  const int64_t kp = (kc + 1) / 2;
  const int64_t rows = std::min<int64_t>(R, rend - r0);
  // vpermw index: lane 2i takes element i of the low half (depth k), lane 2i+1 element i of the high half.
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int64_t p = 0; p < kp; p++) {
    const int64_t k = k0 + 2 * p;
    const bool has_hi = 2 * p + 1 < kc;
    const int64_t lo_at = r0 + k * v.ks, hi_at = lo_at + v.ks;
    for (int c = 0; c < R; c += 16) {
      const int64_t n = std::clamp<int64_t>(rows - c, 0, 16);
      const __mmask16 m = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
      const __mmask16 mh = has_hi ? m : __mmask16(0);
      __m512i both;
      if (v.lowp) {
        const __m256i lo = _mm256_maskz_loadu_epi16(m, v.lowp + lo_at + c);
        const __m256i hi = _mm256_maskz_loadu_epi16(mh, v.lowp + hi_at + c);
        both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      } else {
        both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mh, v.f32 + hi_at + c),
                                            _mm512_maskz_loadu_ps(m, v.f32 + lo_at + c));
      }
      const __m512i w = _mm512_permutexvar_epi16(idx, both);
      if (R - c >= 16) _mm512_storeu_si512(dst + p * R + c, w);
      else _mm512_mask_storeu_epi32(dst + p * R + c, __mmask16((1u << (R - c)) - 1), w);
    }
  }
}

template <int R>
void pack_panel(uint32_t* dst, const View& v, int64_t r0, int64_t rend, int64_t k0, int64_t kc) {
  if (v.ks == 1) pack_depth_contiguous<R>(dst, v, r0, rend, k0, kc);
  else pack_row_contiguous<R>(dst, v, r0, rend, k0, kc);
}

// C[mr, nr] = alpha · Σ a·b + beta · C over kp pairs; a: [kp][6] pairs, b: [kp][64] pairs.
void micro_kernel(int64_t kp, const uint32_t* a, const uint32_t* b, float* C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
  __m512 acc[kMR][4];
  for (int r = 0; r < kMR; r++)
    for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; p++) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 32), b3 = (__m512bh)_mm512_loadu_si512(b + 48);
#pragma GCC unroll 6
    for (int r = 0; r < kMR; r++) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(a[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], ar, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], ar, b3);
    }
    a += kMR;
    b += kNR;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < mr; r++) {
    float* c = C + r * ldc;
    for (int j = 0; j < 4; j++) {
      const int n = std::clamp(nr - 16 * j, 0, 16);
      if (n == 0) break;
      const __mmask16 m = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
      __m512 v = _mm512_mul_ps(acc[r][j], va);
      if (beta != 0.0f) v = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + 16 * j), v);
      _mm512_mask_storeu_ps(c + 16 * j, m, v);
    }
  }
}

void gemm_bf16_packed(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, LowpOperand A,
                      LowpOperand B, float beta, float* C, int64_t ldc, void* scratch) {
  // op(A) as M rows × K depths; op(B) as N rows × K depths.
  const View va{A.f32, A.lowp, trans_a ? 1 : A.ld, trans_a ? A.ld : 1};
  const View vb{B.f32, B.lowp, trans_b ? B.ld : 1, trans_b ? 1 : B.ld};
  uint32_t* bpack = static_cast<uint32_t*>(scratch);      // [NC / 64 panels][KC / 2][64]
  uint32_t* apack = bpack + kNC * kKC / 2;                // [MC / 6 panels][KC / 2][6]
  const bool threaded = M * N * K >= (int64_t(1) << 18);
#pragma omp parallel if (threaded)
  {
    for (int64_t j0 = 0; j0 < N; j0 += kNC) {
      const int64_t nc = std::min(kNC, N - j0), npanels = (nc + kNR - 1) / kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0), kp = (kc + 1) / 2;
        const float beta_k = k0 == 0 ? beta : 1.0f;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < npanels; q++) pack_panel<kNR>(bpack + q * kp * kNR, vb, j0 + q * kNR, N, k0, kc);
        for (int64_t i0 = 0; i0 < M; i0 += kMC) {
          const int64_t mc = std::min(kMC, M - i0), mpanels = (mc + kMR - 1) / kMR;
#pragma omp for schedule(static)
          for (int64_t q = 0; q < mpanels; q++) pack_panel<kMR>(apack + q * kp * kMR, va, i0 + q * kMR, M, k0, kc);
          // Same static split over the B panels as their packing: each thread reads its own panels.
#pragma omp for schedule(static)
          for (int64_t q = 0; q < npanels; q++) {
            const int64_t jj = j0 + q * kNR;
            const int nr = int(std::min<int64_t>(kNR, N - jj));
            for (int64_t s = 0; s < mpanels; s++) {
              const int64_t ii = i0 + s * kMR;
              const int mr = int(std::min<int64_t>(kMR, M - ii));
              micro_kernel(kp, apack + s * kp * kMR, bpack + q * kp * kNR, C + ii * ldc + jj, ldc, mr, nr, alpha,
                           beta_k);
            }
          }
        }
      }
    }
  }
}

}  // namespace
#endif  // __AVX512BF16__

bool gemm_lowp_has_bf16_kernel() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

void gemm_lowp(LowpType t, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               LowpOperand A, LowpOperand B, float beta, float* C, int64_t ldc, void* scratch) {
  KILN_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm_lowp: negative size M=", M, " N=", N, " K=", K);
  KILN_CHECK((A.f32 != nullptr) != (A.lowp != nullptr) || K == 0 || M == 0,
             "gemm_lowp: operand A needs exactly one of f32 / lowp");
  KILN_CHECK((B.f32 != nullptr) != (B.lowp != nullptr) || K == 0 || N == 0,
             "gemm_lowp: operand B needs exactly one of f32 / lowp");
  KILN_CHECK(scratch != nullptr, "gemm_lowp: scratch is null (needs kLowpScratchBytes)");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // empty sum: C = beta · C (beta 0: C is not read)
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
#if defined(__AVX512BF16__)
  if (t == LowpType::BF16) {
    gemm_bf16_packed(trans_a, trans_b, M, N, K, alpha, A, B, beta, C, ldc, scratch);
    return;
  }
#endif
  gemm_lowp_sgemm(t, trans_a, trans_b, M, N, K, alpha, A, B, beta, C, ldc, scratch);
}

void matmul_forward_lowp(float* out, const float* inp, const uint16_t* weight, const float* bias, int64_t N,
                         int C, int OC, LowpType t, void* scratch) {
  if (bias) {
#pragma omp parallel for schedule(static) if (N * OC > 16384)
    for (int64_t n = 0; n < N; n++) std::memcpy(out + n * OC, bias, sizeof(float) * OC);
  }
  gemm_lowp(t, false, false, N, OC, C, 1.0f, f32_operand(inp, C), lowp_operand(weight, OC), bias ? 1.0f : 0.0f,
            out, OC, scratch);
}

void matmul_backward_lowp(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                          const uint16_t* weight, int64_t N, int C, int OC, LowpType t, void* scratch) {
  if (dinp)
    gemm_lowp(t, false, true, N, C, OC, 1.0f, f32_operand(dout, OC), lowp_operand(weight, OC), 0.0f, dinp, C,
              scratch);
  if (dweight)
    gemm_lowp(t, true, false, C, OC, N, 1.0f, f32_operand(inp, C), f32_operand(dout, OC), 1.0f, dweight, OC,
              scratch);
  // dbias is a plain fp32 column sum (no product): the fp32 kernel's, with the products switched off.
  if (dbias) matmul_backward(nullptr, nullptr, dbias, dout, nullptr, nullptr, N, C, OC);
}

}  // namespace kiln::cpu
