// 16-bit-operand products on the CPU (see kernels/matmul_lowp.h).
//
// BF16 kernel (AVX512-BF16): a packed GEMM of our own. The threads take disjoint slices of C (columns
// when op(A) is the smaller operand, else rows) and run independently, with no barriers. Each walks
// its slice in blocks of KC depths × NC columns × MC rows, packing op(B) into panels of 48 columns and
// op(A) into panels of 8 rows, converting fp32 operands to bf16 as it packs; an 8×48 micro-kernel runs
// vdpbf16ps over the packed panels with 24 fp32 accumulators in registers. Packed layouts hold
// "pairs": one 32-bit word is (x[k], x[k+1]) for two consecutive depths, which is what vdpbf16ps
// multiplies and adds into one fp32 lane. Depth-contiguous operands (activations, transposed weights)
// are packed by 16×16 transposes in registers; the others by interleaving two rows with vpermw.
// vdpbf16ps treats subnormal bf16 operands as zero and flushes subnormal results: differences far
// below the 1e-5 relative accumulation error.
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

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/cpu/parallel.h"
#include "kernels/matmul.h"
#include "kernels/matmul_lowp.h"

// The conversions use AVX-512 (F, BW, VL) where the build targets it, else plain loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KILN_LOWP_AVX512 1
#else
#define KILN_LOWP_AVX512 0
#endif

namespace kiln::cpu {

// ---------------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------------
namespace {

#if KILN_LOWP_AVX512
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

#else
// Without AVX-512: the scalar conversions of core/dtype.h (the same rounding), which the compiler vectorises.
void to_bf16_range(uint16_t* dst, const float* src, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; i++) dst[i] = f32_to_bf16(src[i]);
}

void to_fp16_range(uint16_t* dst, const float* src, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; i++) dst[i] = f32_to_f16(src[i]);
}

void from_lowp_range(float* dst, const uint16_t* src, int64_t b, int64_t e, LowpType t) {
  if (t == LowpType::BF16)
    for (int64_t i = b; i < e; i++) dst[i] = bf16_to_f32(src[i]);
  else
    for (int64_t i = b; i < e; i++) dst[i] = f16_to_f32(src[i]);
}

void round_trip_range(float* dst, const float* src, int64_t n, LowpType t) {
  if (t == LowpType::BF16)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(f32_to_bf16(src[i]));
  else
    for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(f32_to_f16(src[i]));
}
#endif  // KILN_LOWP_AVX512

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

constexpr int kMR = 8, kNR = 48;    // micro-tile: 8 rows × 48 columns = 24 zmm accumulators
constexpr int kNV = kNR / 16;        // zmm vectors per micro-tile row
constexpr int64_t kKC = 512;         // depth of a block (256 pairs): a B micro-panel is 48 KiB, in L2
constexpr int64_t kMC = 48 * kMR;    // rows of a packed A block (384)
constexpr int64_t kNC = 21 * kNR;    // columns of a packed B block (1008)
constexpr size_t kThreadScratchWords = (kMC * kKC + kKC * kNC) / 2;  // packed pairs, 32-bit each
static_assert(kThreadScratchWords * 4 * kLowpMaxThreads <= kLowpScratchBytes);

// A view of op(X) as rows × depth: element (r, k) is at p[r * rs + k * ks] with one of rs / ks equal to 1.
struct View {
  const float* f32;
  const uint16_t* lowp;
  int64_t rs, ks;
  View offset(int64_t rows) const {  // the view starting at row `rows`
    return {f32 ? f32 + rows * rs : nullptr, lowp ? lowp + rows * rs : nullptr, rs, ks};
  }
};

inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1);
}

// 16 pairs (32 consecutive depths, the first n of them real, the rest zero) of a depth-contiguous row.
inline __m512i load_pairs(const View& v, int64_t at, int64_t n) {
  if (v.lowp) return _mm512_maskz_loadu_epi16(first_lanes32(n), v.lowp + at);
  const float* p = v.f32 + at;
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(first_lanes16(n - 16), p + 16),
                                      _mm512_maskz_loadu_ps(first_lanes16(n), p));
}

// Asks for the 32 depths at `at` ahead of use: each row of a depth-contiguous view is its own stream,
// too many streams for the hardware prefetcher to follow.
inline void prefetch_pairs(const View& v, int64_t at) {
  if (v.lowp) {
    _mm_prefetch(reinterpret_cast<const char*>(v.lowp + at), _MM_HINT_T0);
  } else {
    _mm_prefetch(reinterpret_cast<const char*>(v.f32 + at), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v.f32 + at + 16), _MM_HINT_T0);
  }
}

// Transposes a 16×16 block of 32-bit words in registers: r[i] holds row i on entry, column i on exit.
inline void transpose16x16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; i++) {  // pairs of rows interleaved within each 128-bit block
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {  // b[4i + c], block q: column 4q + c of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; c++) {  // gather block q of b[c], b[4 + c], b[8 + c], b[12 + c] into column 4q + c
    const __m512i x = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), y = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee);
    const __m512i x2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i y2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(x, x2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x, x2, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(y, y2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(y, y2, 0xdd);
  }
}

// Packs rows [r0, r0 + R) (rows >= rend are zero) × depths [k0, k0 + kc) of a view into dst[kp][R]
// pairs, for a depth-contiguous view (ks == 1: op(A) = activations, op(B) = a transposed weight). Rows
// are loaded 16 pairs per register and transposed in registers. R = 8 loads two 32-depth chunks of
// the 8 rows, whose transposes land in the low and high halves.
template <int R>
void pack_depth_contiguous(uint32_t* dst, const View& v, int64_t r0, int64_t rend, int64_t k0, int64_t kc) {
  static_assert(R == 8 || R % 16 == 0);
  const int64_t kp = (kc + 1) / 2;
  __m512i r[16];
  if constexpr (R == 8) {
    for (int64_t k = 0; k < kc; k += 64) {
      for (int i = 0; i < 8; i++) {
        const bool real = r0 + i < rend;
        const int64_t at = (r0 + i) * v.rs + k0 + k;
        r[i] = real ? load_pairs(v, at, kc - k) : _mm512_setzero_si512();
        if (real && k + 128 < kc) {
          prefetch_pairs(v, at + 128);
          prefetch_pairs(v, at + 160);
        }
        r[8 + i] = real && kc - k > 32 ? load_pairs(v, at + 32, kc - k - 32) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      const int64_t p0 = k / 2;
      for (int64_t q = 0; q < 16 && p0 + q < kp; q++)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (p0 + q) * 8), _mm512_castsi512_si256(r[q]));
      for (int64_t q = 0; q < 16 && p0 + 16 + q < kp; q++)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (p0 + 16 + q) * 8), _mm512_extracti64x4_epi64(r[q], 1));
    }
  } else {
    for (int g = 0; g < R / 16; g++) {
      for (int64_t k = 0; k < kc; k += 32) {
        for (int i = 0; i < 16; i++) {
          const int64_t row = r0 + g * 16 + i;
          r[i] = row < rend ? load_pairs(v, row * v.rs + k0 + k, kc - k) : _mm512_setzero_si512();
          if (row < rend && k + 64 < kc) prefetch_pairs(v, row * v.rs + k0 + k + 64);
        }
        transpose16x16(r);
        const int64_t p0 = k / 2;
        for (int64_t q = 0; q < 16 && p0 + q < kp; q++) _mm512_storeu_si512(dst + (p0 + q) * R + g * 16, r[q]);
      }
    }
  }
}

// The same for a row-contiguous view (rs == 1): for each pair of depths, consecutive elements of two
// stored rows are converted and interleaved into pairs.
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
      const __mmask16 m = first_lanes16(rows - c), mh = has_hi ? m : __mmask16(0);
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
      else _mm512_mask_storeu_epi32(dst + p * R + c, first_lanes16(R - c), w);
    }
  }
}

template <int R>
void pack_panel(uint32_t* dst, const View& v, int64_t r0, int64_t rend, int64_t k0, int64_t kc) {
  if (v.ks == 1) pack_depth_contiguous<R>(dst, v, r0, rend, k0, kc);
  else pack_row_contiguous<R>(dst, v, r0, rend, k0, kc);
}

// C[mr, nr] = alpha · Σ a·b + beta · C over kp pairs; a: [kp][kMR] pairs, b: [kp][kNR] pairs.
void micro_kernel(int64_t kp, const uint32_t* a, const uint32_t* b, float* C, int64_t ldc, int mr, int nr,
                  float alpha, float beta) {
  if (beta != 0.0f) {  // C is read at the end: start fetching it now (it may be far away, e.g. dW)
    for (int r = 0; r < mr; r++)
      for (int j = 0; j < kNV && 16 * j < nr; j++) _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + 16 * j), _MM_HINT_T0);
  }
  __m512 acc[kMR][kNV];
  for (int r = 0; r < kMR; r++)
    for (int j = 0; j < kNV; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp; p++) {
    __m512bh bv[kNV];
    for (int j = 0; j < kNV; j++) bv[j] = (__m512bh)_mm512_loadu_si512(b + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < kMR; r++) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(a[r]));
      for (int j = 0; j < kNV; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], ar, bv[j]);
    }
    a += kMR;
    b += kNR;
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int r = 0; r < mr; r++) {
    float* c = C + r * ldc;
    for (int j = 0; j < kNV && 16 * j < nr; j++) {
      const __mmask16 m = first_lanes16(nr - 16 * j);
      __m512 v = _mm512_mul_ps(acc[r][j], va);
      if (beta != 0.0f) v = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + 16 * j), v);
      _mm512_mask_storeu_ps(c + 16 * j, m, v);
    }
  }
}

// One thread's whole product, serially: GotoBLAS blocking over packed panels. When op(A) fits one
// packed block (the usual M = tokens case) it is packed once per depth block and B streams past it;
// otherwise B blocks are packed once and A blocks stream past them.
void gemm_bf16_serial(const View& va, const View& vb, int64_t M, int64_t N, int64_t K, float alpha, float beta,
                      float* C, int64_t ldc, uint32_t* apack, uint32_t* bpack) {
  auto compute = [&](int64_t i0, int64_t mc, int64_t j0, int64_t nc, int64_t kp, float beta_k) {
    for (int64_t q = 0; q * kNR < nc; q++) {
      const int64_t jj = j0 + q * kNR;
      const int nr = int(std::min<int64_t>(kNR, N - jj));
      for (int64_t s = 0; s * kMR < mc; s++) {
        const int64_t ii = i0 + s * kMR;
        micro_kernel(kp, apack + s * kp * kMR, bpack + q * kp * kNR, C + ii * ldc + jj, ldc,
                     int(std::min<int64_t>(kMR, M - ii)), nr, alpha, beta_k);
      }
    }
  };
  auto pack_a = [&](int64_t i0, int64_t mc, int64_t k0, int64_t kc) {
    const int64_t kp = (kc + 1) / 2;
    for (int64_t s = 0; s * kMR < mc; s++) pack_panel<kMR>(apack + s * kp * kMR, va, i0 + s * kMR, M, k0, kc);
  };
  auto pack_b = [&](int64_t j0, int64_t nc, int64_t k0, int64_t kc) {
    const int64_t kp = (kc + 1) / 2;
    for (int64_t q = 0; q * kNR < nc; q++) pack_panel<kNR>(bpack + q * kp * kNR, vb, j0 + q * kNR, N, k0, kc);
  };
  if (M <= kMC) {
    // A is small: repacking it for every column block costs little, and keeps each C block's
    // read-modify-write over the depth blocks in cache.
    for (int64_t j0 = 0; j0 < N; j0 += kNC) {
      const int64_t nc = std::min(kNC, N - j0);
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        pack_a(0, M, k0, kc);
        pack_b(j0, nc, k0, kc);
        compute(0, M, j0, nc, (kc + 1) / 2, k0 == 0 ? beta : 1.0f);
      }
    }
    return;
  }
  for (int64_t j0 = 0; j0 < N; j0 += kNC) {
    const int64_t nc = std::min(kNC, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      pack_b(j0, nc, k0, kc);
      for (int64_t i0 = 0; i0 < M; i0 += kMC) {
        const int64_t mc = std::min(kMC, M - i0);
        pack_a(i0, mc, k0, kc);
        compute(i0, mc, j0, nc, (kc + 1) / 2, k0 == 0 ? beta : 1.0f);
      }
    }
  }
}

// Threads take disjoint slices of C and run independently (no barriers, so a thread preempted by other
// work on the machine holds up no one). The slices split N when op(A) is the smaller operand (each
// thread then packs all of A itself), else M (each packs all of B).
void gemm_bf16_packed(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, LowpOperand A,
                      LowpOperand B, float beta, float* C, int64_t ldc, void* scratch) {
  // op(A) as M rows × K depths; op(B) as N rows × K depths.
  const View va{A.f32, A.lowp, trans_a ? 1 : A.ld, trans_a ? A.ld : 1};
  const View vb{B.f32, B.lowp, trans_b ? B.ld : 1, trans_b ? 1 : B.ld};
  const bool split_n = M <= N;
  const int64_t panel = split_n ? kNR : kMR, total = split_n ? N : M;
  const int64_t panels = (total + panel - 1) / panel;
  int nt = int(std::min<int64_t>({omp_get_max_threads(), kLowpMaxThreads, panels}));
  if (M * N * K < (int64_t(1) << 18)) nt = 1;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    const int64_t lo = std::min(total, panels * t / n * panel), hi = std::min(total, panels * (t + 1) / n * panel);
    uint32_t* bpack = static_cast<uint32_t*>(scratch) + size_t(t) * kThreadScratchWords;
    uint32_t* apack = bpack + kNC * kKC / 2;
    if (lo < hi) {
      if (split_n)
        gemm_bf16_serial(va, vb.offset(lo), M, hi - lo, K, alpha, beta, C + lo, ldc, apack, bpack);
      else
        gemm_bf16_serial(va.offset(lo), vb, hi - lo, N, K, alpha, beta, C + lo * ldc, ldc, apack, bpack);
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
  KILN_CHECK(M == 0 || K == 0 || A.ld >= (trans_a ? M : K), "gemm_lowp: lda = ", A.ld, " is below the row length");
  KILN_CHECK(N == 0 || K == 0 || B.ld >= (trans_b ? K : N), "gemm_lowp: ldb = ", B.ld, " is below the row length");
  KILN_CHECK(M == 0 || ldc >= N, "gemm_lowp: ldc = ", ldc, " is below N = ", N);
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
