// Narrow-weight products on the CPU (see kernels/narrow_gemv.h).
//
// Direct path (up to kNarrowDirectRows rows of x): the threads take contiguous slices of the matrix's rows and
// stream them once per group of up to 8 rows of x, each (row, x row) pair with its own fp32 accumulators, so a
// row's result is the same whatever the group size.
//   q8_0 (VNNI): vpdpbusd multiplies unsigned by signed bytes, so x is stored offset by 128 (xu = qx + 128, in
//   [1, 255]) and the offset's contribution 128·Σw is removed per lane in the accumulator's start value
//   (a second vpdpbusd of 1-bytes with w gives Σw per lane): t = vpdpbusd(−128·Σw, xu, w) = Σ qx·w exactly. One
//   64-byte vector is two blocks, so lanes 0-7 carry block 2j and 8-15 block 2j+1; their scales d·dx are
//   spread to the lanes by a permute, and the int32 lanes are scaled and summed in fp32.
//   bf16 / f16: 16 weights widened per load (a shift / vcvtph2ps), two accumulators per pair (even and odd
//   16-column chunks) to cover the FMA latency.
// Wide path: tiles of 128 matrix rows widened to fp32, then sgemm (a prompt's rows reuse each tile).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "kernels/matmul.h"
#include "kernels/narrow_gemv.h"

namespace kiln {

const char* weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::F32: return "f32";
    case WeightFormat::BF16: return "bf16";
    case WeightFormat::F16: return "f16";
    case WeightFormat::Q8_0: return "q8_0";
  }
  return "?";
}

std::optional<WeightFormat> parse_weight_format(const std::string& s) {
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::F16, WeightFormat::Q8_0})
    if (s == weight_format_name(f)) return f;
  return std::nullopt;
}

namespace {

constexpr size_t kAlignBytes = 64;
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
int64_t row_ld(WeightFormat f, int64_t K) { return f == WeightFormat::Q8_0 ? (K + kQ8Block - 1) / kQ8Block * kQ8Block : K; }
size_t q_bytes(WeightFormat f, int64_t M, int64_t K) {
  return round_up(size_t(M) * size_t(row_ld(f, K)) * (f == WeightFormat::Q8_0 ? 1 : 2), kAlignBytes);
}

// Quantizes one block of n <= 32 values (the rest of the block is zero): d = amax/127, q = round(v/d).
// Weights round d to f16 first and divide by the rounded value (what the stored scale reconstructs).
void quantize_weight_block(const float* v, int n, uint16_t* d16, int8_t* q) {
  float amax = 0;
  for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(v[i]));
  *d16 = f32_to_f16(amax / 127.0f);
  const float d = f16_to_f32(*d16);
  const float id = d > 0 ? 1.0f / d : 0.0f;
  for (int i = 0; i < kQ8Block; i++) {
    const float r = i < n ? std::nearbyint(v[i] * id) : 0.0f;
    q[i] = int8_t(std::clamp(r, -127.0f, 127.0f));
  }
}

}  // namespace

size_t narrow_bytes(WeightFormat f, int64_t M, int64_t K) {
  KILN_CHECK(f != WeightFormat::F32, "narrow_bytes: f32 has no narrow copy");
  size_t n = q_bytes(f, M, K);
  if (f == WeightFormat::Q8_0) n += round_up(size_t(M) * size_t(row_ld(f, K) / kQ8Block) * 2, kAlignBytes);
  return n;
}

NarrowMatrix narrow_convert(void* storage, WeightFormat f, const float* src, int64_t M, int64_t K, bool transposed) {
  KILN_CHECK(f != WeightFormat::F32, "narrow_convert: f32 has no narrow copy");
  NarrowMatrix A;
  A.fmt = f;
  A.M = M;
  A.K = K;
  A.ld = row_ld(f, K);
  char* base = static_cast<char*>(storage);
  A.q = base;
  uint16_t* d = f == WeightFormat::Q8_0 ? reinterpret_cast<uint16_t*>(base + q_bytes(f, M, K)) : nullptr;
  A.d = d;
  const int64_t ld = A.ld, nb = ld / kQ8Block;
  // Rows in tiles of 64: a transposed source is gathered a tile at a time (64 contiguous floats per k).
  constexpr int64_t kTile = 64;
#pragma omp parallel
  {
    std::vector<float> row(size_t(kTile * K));
#pragma omp for schedule(static)
    for (int64_t m0 = 0; m0 < M; m0 += kTile) {
      const int64_t mt = std::min(kTile, M - m0);
      if (transposed) {
        for (int64_t k = 0; k < K; k++)
          for (int64_t i = 0; i < mt; i++) row[size_t(i * K + k)] = src[k * M + m0 + i];
      } else {
        std::memcpy(row.data(), src + m0 * K, sizeof(float) * size_t(mt * K));
      }
      for (int64_t i = 0; i < mt; i++) {
        const float* r = row.data() + i * K;
        const int64_t m = m0 + i;
        if (f == WeightFormat::Q8_0) {
          int8_t* q = static_cast<int8_t*>(const_cast<void*>(A.q)) + m * ld;
          for (int64_t b = 0; b < nb; b++)
            quantize_weight_block(r + b * kQ8Block, int(std::min<int64_t>(kQ8Block, K - b * kQ8Block)),
                                  d + m * nb + b, q + b * kQ8Block);
        } else {
          uint16_t* q = static_cast<uint16_t*>(const_cast<void*>(A.q)) + m * ld;
          for (int64_t k = 0; k < K; k++) q[k] = f == WeightFormat::BF16 ? f32_to_bf16(r[k]) : f32_to_f16(r[k]);
        }
      }
    }
  }
  return A;
}

float narrow_at(const NarrowMatrix& A, int64_t m, int64_t k) {
  switch (A.fmt) {
    case WeightFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(A.q)[m * A.ld + k]);
    case WeightFormat::F16: return f16_to_f32(static_cast<const uint16_t*>(A.q)[m * A.ld + k]);
    case WeightFormat::Q8_0:
      return f16_to_f32(A.d[m * (A.ld / kQ8Block) + k / kQ8Block]) *
             float(static_cast<const int8_t*>(A.q)[m * A.ld + k]);
    case WeightFormat::F32: break;
  }
  return 0;
}

namespace ref {

void quantize_q8_block(const float* x, int n, float* dx, int8_t* qx) {
  float amax = 0;
  for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(x[i]));
  *dx = amax / 127.0f;
  const float id = amax > 0 ? 127.0f / amax : 0.0f;
  for (int i = 0; i < kQ8Block; i++) qx[i] = i < n ? int8_t(std::clamp(std::nearbyint(x[i] * id), -127.0f, 127.0f)) : 0;
}

}  // namespace ref

namespace cpu {
namespace {

bool g_portable = false;

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
bool has_vnni() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// x of one call quantized for q8_0: per row, xu = qx + 128 [ld] bytes and per pair of blocks the 16 lane
// scales (dx of block 2j in lanes 0-7, of block 2j+1 in 8-15; a missing odd block: 0).
struct XQ {
  std::vector<uint8_t> xu;
  std::vector<int8_t> qx;
  std::vector<float> dx, lanes;
  int64_t ld = 0, nb = 0, np = 0;
};

void quantize_x(XQ& X, const float* x, int64_t ldx, int64_t N, int64_t K, int64_t ld) {
  X.ld = ld;
  X.nb = ld / kQ8Block;
  X.np = (X.nb + 1) / 2;
  X.xu.assign(size_t(N * ld + 64), 128);  // + 64: an odd last block is read as a whole 64-byte pair
  X.qx.assign(size_t(N * ld), 0);
  X.dx.assign(size_t(N * X.nb), 0.0f);
  X.lanes.assign(size_t(N * X.np * 16), 0.0f);
  for (int64_t n = 0; n < N; n++)
    for (int64_t b = 0; b < X.nb; b++) {
      int8_t* q = X.qx.data() + n * ld + b * kQ8Block;
      float* dx = X.dx.data() + n * X.nb + b;
      ref::quantize_q8_block(x + n * ldx + b * kQ8Block, int(std::min<int64_t>(kQ8Block, K - b * kQ8Block)), dx, q);
      for (int i = 0; i < kQ8Block; i++) X.xu[size_t(n * ld + b * kQ8Block + i)] = uint8_t(int(q[i]) + 128);
      float* l = X.lanes.data() + (n * X.np + b / 2) * 16 + (b % 2) * 8;
      for (int i = 0; i < 8; i++) l[i] = *dx;
    }
}

// ---- portable kernels: one (row, x row) at a time ----

void rows_portable(float* dot, const float* x, int64_t ldx, int64_t n0, int64_t nr, const NarrowMatrix& A,
                   const XQ& X, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = n0; n < n0 + nr; n++) {
      float s = 0;
      if (A.fmt == WeightFormat::Q8_0) {
        const int8_t* w = static_cast<const int8_t*>(A.q) + m * A.ld;
        const int8_t* q = X.qx.data() + n * X.ld;
        for (int64_t b = 0; b < X.nb; b++) {
          int32_t t = 0;
          for (int i = 0; i < kQ8Block; i++) t += int32_t(w[b * kQ8Block + i]) * int32_t(q[b * kQ8Block + i]);
          s += f16_to_f32(A.d[m * X.nb + b]) * X.dx[size_t(n * X.nb + b)] * float(t);
        }
      } else {
        const uint16_t* w = static_cast<const uint16_t*>(A.q) + m * A.ld;
        const float* xr = x + n * ldx;
        for (int64_t k = 0; k < A.K; k++)
          s += (A.fmt == WeightFormat::BF16 ? bf16_to_f32(w[k]) : f16_to_f32(w[k])) * xr[k];
      }
      dot[(n - n0) * (m1 - m0) + (m - m0)] = s;
    }
}

// ---- AVX-512 kernels ----
#define KILN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define KILN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))

// 16 weights of row w from column k as fp32 (columns past K: zero).
template <WeightFormat F>
KILN_AVX512 inline __m512 widen16(const uint16_t* w, int64_t k, int64_t K) {
  __m256i h;
  if (k + 16 <= K)
    h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
  else
    h = _mm256_maskz_loadu_epi16(__mmask16((1u << (K - k)) - 1), w + k);
  if constexpr (F == WeightFormat::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
KILN_AVX512 inline __m512 x16(const float* x, int64_t k, int64_t K) {
  if (k + 16 <= K) return _mm512_loadu_ps(x + k);
  return _mm512_maskz_loadu_ps(__mmask16((1u << (K - k)) - 1), x + k);
}

// dot[n][m - m0] for NR rows of x against rows [m0, m1) of a 16-bit matrix.
template <WeightFormat F, int NR>
KILN_AVX512 void rows16(float* dot, int64_t ldd, const float* x, int64_t ldx, const NarrowMatrix& A, int64_t m0,
                        int64_t m1) {
  const int64_t K = A.K;
  for (int64_t m = m0; m < m1; m++) {
    const uint16_t* w = static_cast<const uint16_t*>(A.q) + m * A.ld;
    __m512 a0[NR], a1[NR];
    for (int n = 0; n < NR; n++) a0[n] = a1[n] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      const __m512 w0 = widen16<F>(w, k, K), w1 = widen16<F>(w, k + 16, K);
      for (int n = 0; n < NR; n++) {
        a0[n] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + n * ldx + k), a0[n]);
        a1[n] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + n * ldx + k + 16), a1[n]);
      }
    }
    for (; k < K; k += 16) {
      const __m512 w0 = widen16<F>(w, k, K);
      for (int n = 0; n < NR; n++) a0[n] = _mm512_fmadd_ps(w0, x16(x + n * ldx, k, K), a0[n]);
    }
    for (int n = 0; n < NR; n++) dot[n * ldd + (m - m0)] = _mm512_reduce_add_ps(_mm512_add_ps(a0[n], a1[n]));
  }
}

// Lane permutation spreading 16 block scales to pair j (blocks 2j, 2j+1), j < 8.
KILN_VNNI inline __m512i pair_index(int j) {
  return _mm512_inserti32x8(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
}

template <int NR>
KILN_VNNI void rows_q8_vnni(float* dot, int64_t ldd, const XQ& X, const NarrowMatrix& A, int64_t n0, int64_t m0,
                            int64_t m1) {
  const int64_t ld = A.ld, nb = X.nb, np = X.np;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i idx[8];
  for (int j = 0; j < 8; j++) idx[j] = pair_index(j);
  for (int64_t m = m0; m < m1; m++) {
    const int8_t* w = static_cast<const int8_t*>(A.q) + m * ld;
    const uint16_t* d = A.d + m * nb;
    __m512 acc[NR];
    for (int n = 0; n < NR; n++) acc[n] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 16) {  // 16 blocks (8 pairs) share one load of the scales
      const int64_t gb = std::min<int64_t>(16, nb - g);
      const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << gb) - 1), d + g));
      const int64_t pairs = (gb + 1) / 2;
      for (int64_t j = 0; j < pairs; j++) {
        const int64_t p = g / 2 + j, off = p * 64;
        const __m512i wv = 2 * p + 1 < nb ? _mm512_loadu_si512(w + off)
                                          : _mm512_maskz_loadu_epi8(__mmask64(0xffffffffull), w + off);
        const __m512i sw = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv);
        const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sw, 7));
        const __m512 dl = _mm512_permutexvar_ps(idx[j], dw);
        for (int n = 0; n < NR; n++) {
          const __m512i xv = _mm512_loadu_si512(X.xu.data() + (n0 + n) * ld + off);
          const __m512i t = _mm512_dpbusd_epi32(start, xv, wv);
          const __m512 s = _mm512_mul_ps(dl, _mm512_loadu_ps(X.lanes.data() + ((n0 + n) * np + p) * 16));
          acc[n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), s, acc[n]);
        }
      }
    }
    for (int n = 0; n < NR; n++) dot[n * ldd + (m - m0)] = _mm512_reduce_add_ps(acc[n]);
  }
}

template <int NR>
void rows_simd(float* dot, int64_t ldd, const float* x, int64_t ldx, const NarrowMatrix& A, const XQ& X, int64_t n0,
               int64_t m0, int64_t m1) {
  switch (A.fmt) {
    case WeightFormat::BF16: return rows16<WeightFormat::BF16, NR>(dot, ldd, x + n0 * ldx, ldx, A, m0, m1);
    case WeightFormat::F16: return rows16<WeightFormat::F16, NR>(dot, ldd, x + n0 * ldx, ldx, A, m0, m1);
    case WeightFormat::Q8_0: return rows_q8_vnni<NR>(dot, ldd, X, A, n0, m0, m1);
    case WeightFormat::F32: return;
  }
}

void rows_group(float* dot, int64_t ldd, const float* x, int64_t ldx, int64_t nr, const NarrowMatrix& A,
                const XQ& X, int64_t n0, int64_t m0, int64_t m1) {
  switch (nr) {
    case 1: return rows_simd<1>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 2: return rows_simd<2>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 3: return rows_simd<3>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 4: return rows_simd<4>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 5: return rows_simd<5>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 6: return rows_simd<6>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    case 7: return rows_simd<7>(dot, ldd, x, ldx, A, X, n0, m0, m1);
    default: return rows_simd<8>(dot, ldd, x, ldx, A, X, n0, m0, m1);
  }
}

bool use_simd(WeightFormat f) {
  if (g_portable) return false;
  return f == WeightFormat::Q8_0 ? has_vnni() : has_avx512();
}

// Rows of the matrix a thread takes at a time (its slice is contiguous; partial dots for them live on its stack).
constexpr int64_t kRowChunk = 64;

void narrow_direct(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                   const float* bias, bool accumulate) {
  // The caller's thread quantizes x once; the team reads it through this reference (not its own thread_local).
  thread_local XQ xq;
  XQ& X = xq;
  if (A.fmt == WeightFormat::Q8_0) quantize_x(X, x, ldx, N, A.K, A.ld);
  const bool simd = use_simd(A.fmt);
  const int64_t M = A.M;
  const bool parallel = M * A.K * N >= (1 << 15);
#pragma omp parallel if (parallel)
  {
    const int T = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t per = (M + T - 1) / T;
    const int64_t b = std::min(M, per * t), e = std::min(M, b + per);
    float dot[8 * kRowChunk];
    for (int64_t m0 = b; m0 < e; m0 += kRowChunk) {
      const int64_t m1 = std::min(e, m0 + kRowChunk), mt = m1 - m0;
      for (int64_t n0 = 0; n0 < N; n0 += 8) {
        const int64_t nr = std::min<int64_t>(8, N - n0);
        if (simd)
          rows_group(dot, mt, x, ldx, nr, A, X, n0, m0, m1);
        else
          rows_portable(dot, x, ldx, n0, nr, A, X, m0, m1);
        for (int64_t n = 0; n < nr; n++)
          for (int64_t i = 0; i < mt; i++) {
            float s = dot[n * mt + i];
            if (bias) s += bias[m0 + i];
            float& out = y[(n0 + n) * ldy + m0 + i];
            out = accumulate ? out + s : s;
          }
      }
    }
  }
}

// Widens rows [m0, m0 + mt) of A into tile [mt][K] fp32.
void widen_tile(float* tile, const NarrowMatrix& A, int64_t m0, int64_t mt) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < mt; i++)
    for (int64_t k = 0; k < A.K; k++) tile[i * A.K + k] = narrow_at(A, m0 + i, k);
}

void narrow_wide(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate) {
  constexpr int64_t kTileRows = 128;
  thread_local std::vector<float> tile;
  tile.resize(size_t(kTileRows * A.K));
  for (int64_t m0 = 0; m0 < A.M; m0 += kTileRows) {
    const int64_t mt = std::min(kTileRows, A.M - m0);
    widen_tile(tile.data(), A, m0, mt);
    gemm(false, true, N, mt, A.K, 1.0f, x, ldx, tile.data(), A.K, accumulate ? 1.0f : 0.0f, y + m0, ldy);
  }
  if (bias)
    for (int64_t n = 0; n < N; n++)
      for (int64_t m = 0; m < A.M; m++) y[n * ldy + m] += bias[m];
}

}  // namespace

void narrow_gemm(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                 const float* bias, bool accumulate) {
  KILN_CHECK(A.fmt != WeightFormat::F32, "narrow_gemm: an f32 matrix");
  if (N <= 0 || A.M <= 0) return;
  if (N > kNarrowDirectRows) return narrow_wide(y, ldy, x, ldx, N, A, bias, accumulate);
  narrow_direct(y, ldy, x, ldx, N, A, bias, accumulate);
}

const char* narrow_kernel_name(WeightFormat f) {
  if (!use_simd(f)) return "portable";
  return f == WeightFormat::Q8_0 ? "avx512-vnni" : "avx512";
}

void narrow_force_portable(bool on) { g_portable = on; }

}  // namespace cpu
}  // namespace kiln
