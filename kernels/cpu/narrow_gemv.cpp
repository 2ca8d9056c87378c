// Narrow-weight products on the CPU (see kernels/narrow_gemv.h).
//
// Direct path (up to kNarrowDirectRows rows of x): the threads take contiguous slices of the matrix's rows and
// stream them once per group of x rows (8 for q8_0, 2 matrix rows at a time at one or two x rows, else 1;
// 2 for the 16-bit formats, 4 matrix rows at a time: the accumulators the registers hold), each (row, x row)
// pair with its own fp32 accumulators, so a row's result is the same whatever the group size. x is prepared once per call by the calling thread (quantized, or split for bf16).
//   q8_0 (VNNI): vpdpbusd multiplies unsigned by signed bytes, so the weights are stored offset by 128
//   (u = q + 128) and x stays signed; each int32 lane starts at −128·Σ qx of its 4 bytes (made once per x),
//   so t = vpdpbusd(start, u, qx) = Σ q·qx exactly. One 64-byte vector is two blocks (lanes 0-7 block 2j, 8-15
//   block 2j+1); the products d·dx of 16 blocks are made once and spread to the lanes by a permute; the int32
//   lanes are scaled and summed in fp32 over two accumulators (even and odd pairs). The scales are a second
//   stream (after all the weights), prefetched as the weights are.
//   bf16: one 64-byte load is 16 (even, odd) pairs of weights; a shift gives the even columns exactly as fp32
//   and a mask the odd ones, against x split the same way. f16: vcvtph2ps per 16. Two accumulators per pair.
// Wide path: tiles of 128 matrix rows widened to fp32, then sgemm (a prompt's rows reuse each tile).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
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
// The direct kernels prefetch each matrix row this far ahead of where they read it: the rows are short runs (a
// 768-wide bf16 row is 1.5 KB, four read side by side), too short for the hardware prefetcher to get ahead, and a
// one-row product was waiting on memory (bf16 LM head at 1 row: 8.1 ms without, 3.2 ms with 16 KB ahead; 4 KB
// 6.2, 8 KB 4.1, 32 KB 6.7: bench/verify_pass_bench --gemm 50257,768). Into L2 (T1), not L1: a prefetch to L1
// holds one of the core's few L1 fill buffers until its line arrives. Measured with a scratch A/B program (not
// kept): one thread, GPT-2 124M's matrices at one row, each pass after its own streaming read, T0 and T1
// alternating, 40 rounds, 4 runs, loaded machine: f16 0.83 -> 0.87 of the read, q8_0 0.89 -> 0.90, bf16 0.89
// either way.
constexpr int kPrefetchBytes = 16384;
constexpr auto kPrefetchHint = _MM_HINT_T1;
size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
int64_t row_ld(WeightFormat f, int64_t K) { return f == WeightFormat::Q8_0 ? (K + kQ8Block - 1) / kQ8Block * kQ8Block : K; }
size_t q_bytes(WeightFormat f, int64_t M, int64_t K) {
  return round_up(size_t(M) * size_t(row_ld(f, K)) * (f == WeightFormat::Q8_0 ? 1 : 2), kAlignBytes);
}

// Quantizes one block of n <= 32 values (the rest of the block is zero): d = amax/127, q = round(v/d).
// Weights round d to f16 first and divide by the rounded value (what the stored scale reconstructs).
void quantize_weight_block(const float* v, int n, uint16_t* d16, uint8_t* q) {
  float amax = 0;
  for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(v[i]));
  *d16 = f32_to_f16(amax / 127.0f);
  const float d = f16_to_f32(*d16);
  const float id = d > 0 ? 1.0f / d : 0.0f;
  for (int i = 0; i < kQ8Block; i++) {
    const float r = i < n ? std::nearbyint(v[i] * id) : 0.0f;
    q[i] = uint8_t(int(std::clamp(r, -127.0f, 127.0f)) + 128);
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
          uint8_t* q = static_cast<uint8_t*>(const_cast<void*>(A.q)) + m * ld;
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
             float(int(static_cast<const uint8_t*>(A.q)[m * A.ld + k]) - 128);
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

NarrowIsa g_limit = NarrowIsa::Avx512;  // the best level the kernels may use (tests lower it)

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl");
  return ok;
}
bool has_vnni() {
  static const bool ok = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// x of one call prepared for the kernels (the caller's thread fills it once; the team reads it).
//   q8_0: per row qx [ld + 64] (zero-padded: an odd last block is read as a whole 64-byte pair), dx
//   [nb + 16] (zero-padded for 16-wide loads), and per pair of blocks the start value of each int32 lane of
//   vpdpbusd: −128·Σ qx over the lane's 4 bytes (the weights are stored offset by 128).
//   bf16: per row the whole 32-column chunks with even columns first, then odd ones (what one 64-byte load of
//   weights splits into), [K / 32 · 32].
struct XQ {
  std::vector<int8_t> qx;
  std::vector<float> dx, split;
  std::vector<int32_t> start;
  int64_t ld = 0, nb = 0, np = 0, ldq = 0, ldd = 0, lds = 0;
};

void quantize_x(XQ& X, const float* x, int64_t ldx, int64_t N, int64_t K, int64_t ld) {
  X.ld = ld;
  X.nb = ld / kQ8Block;
  X.np = (X.nb + 1) / 2;
  X.ldq = ld + 64;
  X.ldd = X.nb + 16;
  X.qx.assign(size_t(N * X.ldq), 0);
  X.dx.assign(size_t(N * X.ldd), 0.0f);
  X.start.assign(size_t(N * X.np * 16), 0);
  for (int64_t n = 0; n < N; n++) {
    int8_t* q = X.qx.data() + n * X.ldq;
    for (int64_t b = 0; b < X.nb; b++)
      ref::quantize_q8_block(x + n * ldx + b * kQ8Block, int(std::min<int64_t>(kQ8Block, K - b * kQ8Block)),
                             X.dx.data() + n * X.ldd + b, q + b * kQ8Block);
    int32_t* st = X.start.data() + n * X.np * 16;
    for (int64_t l = 0; l < X.np * 16; l++)
      st[l] = -128 * (int32_t(q[4 * l]) + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
  }
}

#define KILN_VNNI_Q __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
// quantize_x with AVX-512: the same arithmetic (amax, 127/amax as a scalar, x·id rounded to nearest even by
// vcvtps2dq, as nearbyint does), and the lane start values from a vpdpbusd of 1-bytes with qx.
KILN_VNNI_Q void quantize_x_simd(XQ& X, const float* x, int64_t ldx, int64_t N, int64_t K, int64_t ld) {
  X.ld = ld;
  X.nb = ld / kQ8Block;
  X.np = (X.nb + 1) / 2;
  X.ldq = ld + 64;
  X.ldd = X.nb + 16;
  X.qx.resize(size_t(N * X.ldq));
  X.dx.resize(size_t(N * X.ldd));
  X.start.resize(size_t(N * X.np * 16));
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t n = 0; n < N; n++) {
    int8_t* q = X.qx.data() + n * X.ldq;
    float* dx = X.dx.data() + n * X.ldd;
    const float* xr = x + n * ldx;
    for (int64_t b = 0; b < X.nb; b++) {
      const int64_t k = b * kQ8Block, left = std::min<int64_t>(kQ8Block, K - k);
      const __mmask16 m0 = __mmask16(left >= 16 ? 0xffff : (1u << left) - 1);
      const __mmask16 m1 = __mmask16(left >= 32 ? 0xffff : left <= 16 ? 0 : (1u << (left - 16)) - 1);
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, xr + k), v1 = _mm512_maskz_loadu_ps(m1, xr + k + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      dx[b] = amax / 127.0f;
      const __m512 id = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k + 16), _mm512_cvtsepi32_epi8(q1));
    }
    std::memset(q + ld, 0, 64);
    std::memset(dx + X.nb, 0, 16 * sizeof(float));
    for (int64_t p = 0; p < X.np; p++) {
      const __m512i v = _mm512_loadu_si512(q + p * 64);
      const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v);
      _mm512_storeu_si512(X.start.data() + (n * X.np + p) * 16, _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128)));
    }
  }
}

KILN_VNNI_Q void split_x(XQ& X, const float* x, int64_t ldx, int64_t N, int64_t K) {
  X.lds = K / 32 * 32;
  X.split.resize(size_t(N * X.lds));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t n = 0; n < N; n++)
    for (int64_t c = 0; c < X.lds; c += 32) {
      const __m512 a = _mm512_loadu_ps(x + n * ldx + c), b = _mm512_loadu_ps(x + n * ldx + c + 16);
      _mm512_storeu_ps(X.split.data() + n * X.lds + c, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(X.split.data() + n * X.lds + c + 16, _mm512_permutex2var_ps(a, odd, b));
    }
}

// ---- portable kernels: one (row, x row) at a time ----

void rows_portable(float* dot, const float* x, int64_t ldx, int64_t n0, int64_t nr, const NarrowMatrix& A,
                   const XQ& X, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m++)
    for (int64_t n = n0; n < n0 + nr; n++) {
      float s = 0;
      if (A.fmt == WeightFormat::Q8_0) {
        const uint8_t* w = static_cast<const uint8_t*>(A.q) + m * A.ld;
        const int8_t* q = X.qx.data() + n * X.ldq;
        for (int64_t b = 0; b < X.nb; b++) {
          // Σ (u − 128)·qx as Σ u·qx − 128·Σ qx: GCC 12's vectorizer turns the first form into a wrong
          // unsigned-by-signed dot product at -O2 and above.
          int32_t t = 0, sq = 0;
          for (int i = 0; i < kQ8Block; i++) {
            t += int32_t(w[b * kQ8Block + i]) * int32_t(q[b * kQ8Block + i]);
            sq += q[b * kQ8Block + i];
          }
          t -= 128 * sq;
          s += f16_to_f32(A.d[m * X.nb + b]) * X.dx[size_t(n * X.ldd + b)] * float(t);
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

// dot[n][m - m0] for NR rows of x against rows [m0, m1) of a 16-bit matrix, MR rows of the matrix at a time:
// each loaded weight vector meets NR rows of x and each x vector MR rows (loads per FMA 0.5 at 4 × 2, against
// 1.1 with one row). Each (row, x row) pair sums into two accumulators over chunks of 32 columns, so its value does
// not depend on MR, NR or N. bf16: one 64-byte load is 16 pairs of weights; a shift gives the even columns and a
// mask the odd ones, exactly as fp32, against x split the same way (XQ::split). f16: vcvtph2ps per 16.
template <WeightFormat F, int MR, int NR>
KILN_AVX512 void tile16(float* dot, int64_t ldd, const float* x, int64_t ldx, const XQ& X, int64_t n0,
                        const NarrowMatrix& A, int64_t m, int64_t m0) {
  const int64_t K = A.K;
  const __m512i hi = _mm512_set1_epi32(int32_t(0xffff0000u));
  const uint16_t* w[MR];
  for (int i = 0; i < MR; i++) w[i] = static_cast<const uint16_t*>(A.q) + (m + i) * A.ld;
  __m512 ae[MR][NR], ao[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) ae[i][n] = ao[i][n] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512 e[MR], o[MR];
    for (int i = 0; i < MR; i++) {
      _mm_prefetch(reinterpret_cast<const char*>(w[i] + k) + kPrefetchBytes, kPrefetchHint);
      if constexpr (F == WeightFormat::BF16) {
        const __m512i v = _mm512_loadu_si512(w[i] + k);
        e[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        o[i] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
      } else {
        e[i] = widen16<F>(w[i], k, K);
        o[i] = widen16<F>(w[i], k + 16, K);
      }
    }
    for (int n = 0; n < NR; n++) {
      const float* xr = F == WeightFormat::BF16 ? X.split.data() + (n0 + n) * X.lds + k : x + (n0 + n) * ldx + k;
      const __m512 xe = _mm512_loadu_ps(xr), xo = _mm512_loadu_ps(xr + 16);
      for (int i = 0; i < MR; i++) {
        ae[i][n] = _mm512_fmadd_ps(e[i], xe, ae[i][n]);
        ao[i][n] = _mm512_fmadd_ps(o[i], xo, ao[i][n]);
      }
    }
  }
  for (; k < K; k += 16)  // the last columns (fewer than 32) 16 at a time, x unsplit
    for (int i = 0; i < MR; i++) {
      const __m512 w0 = widen16<F>(w[i], k, K);
      for (int n = 0; n < NR; n++) ae[i][n] = _mm512_fmadd_ps(w0, x16(x + (n0 + n) * ldx, k, K), ae[i][n]);
    }
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) dot[n * ldd + (m + i - m0)] = _mm512_reduce_add_ps(_mm512_add_ps(ae[i][n], ao[i][n]));
}

template <WeightFormat F, int NR>
KILN_AVX512 void rows16(float* dot, int64_t ldd, const float* x, int64_t ldx, const XQ& X, int64_t n0,
                        const NarrowMatrix& A, int64_t m0, int64_t m1) {
  // 2·MR·NR accumulators, 2·MR weight vectors and 2 of x within 32 registers. At one x row each matrix row is a
  // stream of its own, and fewer streams read faster on a Zen 4 core: bf16 one row (0.74 -> 0.92 of the read at 1
  // thread, 0.83 -> 0.87 at 2, alternating builds of decode_bandwidth_bench --steps 16), f16 two (0.80 -> 0.86 and
  // 0.85 -> 0.89; one row gave 0.78 and 0.86: its conversion wants the x loads shared). Two from two x rows (four
  // at two x rows: bf16 verification passes of 2 positions 1.07-1.13 -> 1.00-1.02 steps, verify_pass_bench).
  constexpr int MR = NR == 1 ? (F == WeightFormat::BF16 ? 1 : 2) : 2;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile16<F, MR, NR>(dot, ldd, x, ldx, X, n0, A, m, m0);
  for (; m < m1; m++) tile16<F, 1, NR>(dot, ldd, x, ldx, X, n0, A, m, m0);
}

// Lane permutation spreading 16 block scales to pair j (blocks 2j, 2j+1), j < 8.
KILN_VNNI inline __m512i pair_index(int j) {
  return _mm512_inserti32x8(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
}

// q8_0: per pair of blocks one vpdpbusd (weights u8, x s8, started at −128·Σx per lane: exactly Σ q·qx), its
// int32 lanes to fp32 times d·dx of their block (16 blocks' products made once, spread by a permute), into two
// accumulators (even and odd pairs, in pair order: the same value whatever MR and NR are). MR rows of the matrix at
// a time (each x vector loaded once for them; see rows_q8_vnni for MR); a whole group of 16
// blocks is unrolled so that the permute indices and the accumulators stay in registers (the loop over a runtime
// pair index kept them on the stack: 0.71 of the streaming read at one thread).
template <int MR, int NR>
KILN_VNNI void tile_q8(float* dot, int64_t ldd, const XQ& X, const NarrowMatrix& A, int64_t n0, int64_t m,
                       int64_t m0) {
  const int64_t ld = A.ld, nb = X.nb, np = X.np;
  const uint8_t* w[MR];
  const uint16_t* d[MR];
  for (int i = 0; i < MR; i++) {
    w[i] = static_cast<const uint8_t*>(A.q) + (m + i) * ld;
    d[i] = A.d + (m + i) * nb;
  }
  __m512 acc[MR][NR][2];
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) acc[i][n][0] = acc[i][n][1] = _mm512_setzero_ps();
  // One pair p of every (row, x row): j is p's place in its group of 16 blocks (p's parity is j's).
  auto pair = [&](int64_t p, __m512i idx, const __m512 (&s16)[MR][NR], bool full, int par) __attribute__((
                  always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma"))) {
    const int64_t off = p * 64;
    __m512i xv[NR], st[NR];
    for (int n = 0; n < NR; n++) {
      st[n] = _mm512_loadu_si512(X.start.data() + ((n0 + n) * np + p) * 16);
      xv[n] = _mm512_loadu_si512(X.qx.data() + (n0 + n) * X.ldq + off);
    }
    for (int i = 0; i < MR; i++) {
      _mm_prefetch(reinterpret_cast<const char*>(w[i] + off) + kPrefetchBytes, kPrefetchHint);
      const __m512i wv = full ? _mm512_loadu_si512(w[i] + off)
                              : _mm512_maskz_loadu_epi8(__mmask64(0xffffffffull), w[i] + off);
      for (int n = 0; n < NR; n++) {
        const __m512i t = _mm512_dpbusd_epi32(st[n], wv, xv[n]);
        acc[i][n][par] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx, s16[i][n]), acc[i][n][par]);
      }
    }
  };
  for (int64_t g = 0; g < nb; g += 16) {  // 16 blocks (8 pairs) share one load of the scales
    const int64_t gb = std::min<int64_t>(16, nb - g);
    __m512 s16[MR][NR];
    for (int i = 0; i < MR; i++) {
      // The scales are a stream of their own (2 bytes per 32 weights): prefetched as far ahead as the weights.
      _mm_prefetch(reinterpret_cast<const char*>(d[i] + g) + kPrefetchBytes / 16, kPrefetchHint);
      const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << gb) - 1), d[i] + g));
      for (int n = 0; n < NR; n++) s16[i][n] = _mm512_mul_ps(dw, _mm512_loadu_ps(X.dx.data() + (n0 + n) * X.ldd + g));
    }
    if (gb == 16) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) pair(g / 2 + j, pair_index(j), s16, true, j & 1);
    } else {
      for (int64_t j = 0; j < (gb + 1) / 2; j++) {
        const int64_t p = g / 2 + j;
        const __m512i idx = pair_index(int(j));
        if (j & 1)
          pair(p, idx, s16, 2 * p + 1 < nb, 1);
        else
          pair(p, idx, s16, 2 * p + 1 < nb, 0);
      }
    }
  }
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++)
      dot[n * ldd + (m + i - m0)] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][n][0], acc[i][n][1]));
}

template <int NR>
KILN_VNNI void rows_q8_vnni(float* dot, int64_t ldd, const XQ& X, const NarrowMatrix& A, int64_t n0, int64_t m0,
                            int64_t m1) {
  // One matrix row at one x row (two streams, weights and scales), two at two x rows, one past that (the
  // accumulators: 2·MR·NR, MR·NR scale vectors, 8 indices). Four rows at one x row kept eight streams in flight,
  // more than a Sapphire Rapids core follows (decode_bandwidth_bench --formats q8_0, alternating builds: 1 thread
  // 0.85 -> 0.89-0.95 of the read, 2 threads 0.78-0.81 -> 0.83-0.89 with two rows); on a Zen 4 core one row
  // against two: 0.80 -> 0.87 at 1 thread, 0.79 -> 0.83 at 2.
  constexpr int MR = NR == 2 ? 2 : 1;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile_q8<MR, NR>(dot, ldd, X, A, n0, m, m0);
  for (; m < m1; m++) tile_q8<1, NR>(dot, ldd, X, A, n0, m, m0);
}

template <int NR>
void rows_simd(float* dot, int64_t ldd, const float* x, int64_t ldx, const NarrowMatrix& A, const XQ& X, int64_t n0,
               int64_t m0, int64_t m1) {
  switch (A.fmt) {
    case WeightFormat::BF16: return rows16<WeightFormat::BF16, NR>(dot, ldd, x, ldx, X, n0, A, m0, m1);
    case WeightFormat::F16: return rows16<WeightFormat::F16, NR>(dot, ldd, x, ldx, X, n0, A, m0, m1);
    case WeightFormat::Q8_0: return rows_q8_vnni<NR>(dot, ldd, X, A, n0, m0, m1);
    case WeightFormat::F32: return;
  }
}

// f(std::integral_constant<int, nr>{}) for nr in [1, Max], Max for any larger nr: the kernels take the number of
// x rows as a template parameter.
template <int Max, class F>
void with_rows(int64_t nr, const F& f) {
  if constexpr (Max > 1)
    if (nr < Max) return with_rows<Max - 1>(nr, f);
  f(std::integral_constant<int, Max>{});
}

void rows_group(float* dot, int64_t ldd, const float* x, int64_t ldx, int64_t nr, const NarrowMatrix& A,
                const XQ& X, int64_t n0, int64_t m0, int64_t m1) {
  with_rows<8>(nr, [&](auto NR) { rows_simd<decltype(NR)::value>(dot, ldd, x, ldx, A, X, n0, m0, m1); });
}

// ---- AVX2 kernels (CPUs without AVX-512: Zen 2, Haswell to Alder Lake) ----
// The same structure as the AVX-512 ones at half the width: each (row, x row) pair has two accumulators (the
// 16-bit formats: columns k..k+7 and k+8..k+15 of each 16; q8_0: even and odd blocks), summed in the same order
// whatever MR and NR are, so a row's value does not depend on the group it is computed in.
#define KILN_AVX2 __attribute__((target("avx2,fma,f16c")))

KILN_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 weights from w as fp32.
template <WeightFormat F>
KILN_AVX2 inline __m256 widen8(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  if constexpr (F == WeightFormat::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// dot[n][m - m0] for NR rows of x against MR rows of a 16-bit matrix from row m: 16 columns a step, the last
// K % 8 columns in scalar (added after the vector sum).
template <WeightFormat F, int MR, int NR>
KILN_AVX2 void tile16_avx2(float* dot, int64_t ldd, const float* x, int64_t ldx, int64_t n0, const NarrowMatrix& A,
                           int64_t m, int64_t m0) {
  const int64_t K = A.K;
  const uint16_t* w[MR];
  for (int i = 0; i < MR; i++) w[i] = static_cast<const uint16_t*>(A.q) + (m + i) * A.ld;
  __m256 a0[MR][NR], a1[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) a0[i][n] = a1[i][n] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m256 e[MR], o[MR];
    for (int i = 0; i < MR; i++) {
      if ((k & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[i] + k) + kPrefetchBytes, kPrefetchHint);
      e[i] = widen8<F>(w[i] + k);
      o[i] = widen8<F>(w[i] + k + 8);
    }
    for (int n = 0; n < NR; n++) {
      const float* xr = x + (n0 + n) * ldx + k;
      const __m256 xe = _mm256_loadu_ps(xr), xo = _mm256_loadu_ps(xr + 8);
      for (int i = 0; i < MR; i++) {
        a0[i][n] = _mm256_fmadd_ps(e[i], xe, a0[i][n]);
        a1[i][n] = _mm256_fmadd_ps(o[i], xo, a1[i][n]);
      }
    }
  }
  for (; k + 8 <= K; k += 8)
    for (int i = 0; i < MR; i++) {
      const __m256 e = widen8<F>(w[i] + k);
      for (int n = 0; n < NR; n++) a0[i][n] = _mm256_fmadd_ps(e, _mm256_loadu_ps(x + (n0 + n) * ldx + k), a0[i][n]);
    }
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) {
      float s = hsum8(_mm256_add_ps(a0[i][n], a1[i][n]));
      const float* xr = x + (n0 + n) * ldx;
      for (int64_t c = k; c < K; c++)
        s += (F == WeightFormat::BF16 ? bf16_to_f32(w[i][c]) : f16_to_f32(w[i][c])) * xr[c];
      dot[n * ldd + (m + i - m0)] = s;
    }
}

template <WeightFormat F, int NR>
KILN_AVX2 void rows16_avx2(float* dot, int64_t ldd, const float* x, int64_t ldx, int64_t n0, const NarrowMatrix& A,
                           int64_t m0, int64_t m1) {
  constexpr int MR = NR == 1 ? 4 : 2;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile16_avx2<F, MR, NR>(dot, ldd, x, ldx, n0, A, m, m0);
  for (; m < m1; m++) tile16_avx2<F, 1, NR>(dot, ldd, x, ldx, n0, A, m, m0);
}

// q8_0: per block, the signed weights (u − 128: the stored bytes with the top bit flipped) against qx by
// vpmaddubsw on |qx| and the weights carrying qx's sign (llama.cpp's AVX2 trick: both in [−127, 127], so the
// 16-bit pair sums cannot saturate), vpmaddwd to int32 (exact), then fp32 times d·dx of the block into the even or
// odd blocks' accumulator: blocks go in pairs, so each accumulator is a register (the same value whatever MR and
// NR are). The products d·dx are made 8 blocks at a time as one vector and spread to each block by a permute (a
// scalar product and broadcast per block had cost as much as the block's integer work). x is quantized by
// quantize_x (the portable rule).
template <int MR, int NR>
KILN_AVX2 void tile_q8_avx2(float* dot, int64_t ldd, const XQ& X, const NarrowMatrix& A, int64_t n0, int64_t m,
                            int64_t m0) {
  const int64_t ld = A.ld, nb = X.nb;
  const uint8_t* w[MR];
  const uint16_t* d[MR];
  for (int i = 0; i < MR; i++) {
    w[i] = static_cast<const uint8_t*>(A.q) + (m + i) * ld;
    d[i] = A.d + (m + i) * nb;
  }
  __m256 acc[MR][NR][2];
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) acc[i][n][0] = acc[i][n][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(int8_t(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  auto block = [&](int64_t blk, int j, const __m256 (&s8)[MR][NR])
                   __attribute__((always_inline, target("avx2,fma,f16c"))) {
    const int64_t off = blk * kQ8Block;
    const __m256i idx = _mm256_set1_epi32(j);
    __m256i ax[NR], sx[NR];
    for (int n = 0; n < NR; n++) {
      sx[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X.qx.data() + (n0 + n) * X.ldq + off));
      ax[n] = _mm256_sign_epi8(sx[n], sx[n]);
    }
    for (int i = 0; i < MR; i++) {
      if ((j & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[i] + off) + kPrefetchBytes, kPrefetchHint);
      const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + off)), flip);
      for (int n = 0; n < NR; n++) {
        const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(ax[n], _mm256_sign_epi8(q, sx[n])), ones);
        acc[i][n][j & 1] =
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_permutevar8x32_ps(s8[i][n], idx), acc[i][n][j & 1]);
      }
    }
  };
  for (int64_t g = 0; g < nb; g += 8) {  // 8 blocks share one vector of d·dx per (row, x row)
    const int64_t gb = std::min<int64_t>(8, nb - g);
    __m256 s8[MR][NR];
    for (int i = 0; i < MR; i++) {
      if ((g & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(d[i] + g) + kPrefetchBytes / 16, kPrefetchHint);
      __m128i h;
      if (gb == 8) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(d[i] + g));
      } else {
        alignas(16) uint16_t part[8] = {};
        std::memcpy(part, d[i] + g, size_t(gb) * sizeof(uint16_t));
        h = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
      }
      const __m256 dw = _mm256_cvtph_ps(h);  // dx is zero-padded past nb (XQ::ldd)
      for (int n = 0; n < NR; n++) s8[i][n] = _mm256_mul_ps(dw, _mm256_loadu_ps(X.dx.data() + (n0 + n) * X.ldd + g));
    }
    if (gb == 8) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) block(g + j, j, s8);
    } else {
      for (int j = 0; j < int(gb); j++) block(g + j, j, s8);
    }
  }
  for (int i = 0; i < MR; i++)
    for (int n = 0; n < NR; n++) dot[n * ldd + (m + i - m0)] = hsum8(_mm256_add_ps(acc[i][n][0], acc[i][n][1]));
}

template <int NR>
KILN_AVX2 void rows_q8_avx2(float* dot, int64_t ldd, const XQ& X, const NarrowMatrix& A, int64_t n0, int64_t m0,
                            int64_t m1) {
  constexpr int MR = NR == 1 ? 4 : NR == 2 ? 2 : 1;
  int64_t m = m0;
  for (; m + MR <= m1; m += MR) tile_q8_avx2<MR, NR>(dot, ldd, X, A, n0, m, m0);
  for (; m < m1; m++) tile_q8_avx2<1, NR>(dot, ldd, X, A, n0, m, m0);
}

template <int NR>
void rows_avx2(float* dot, int64_t ldd, const float* x, int64_t ldx, const NarrowMatrix& A, const XQ& X, int64_t n0,
               int64_t m0, int64_t m1) {
  switch (A.fmt) {
    case WeightFormat::BF16: return rows16_avx2<WeightFormat::BF16, NR>(dot, ldd, x, ldx, n0, A, m0, m1);
    case WeightFormat::F16: return rows16_avx2<WeightFormat::F16, NR>(dot, ldd, x, ldx, n0, A, m0, m1);
    case WeightFormat::Q8_0: return rows_q8_avx2<NR>(dot, ldd, X, A, n0, m0, m1);
    case WeightFormat::F32: return;
  }
}

void rows_group_avx2(float* dot, int64_t ldd, const float* x, int64_t ldx, int64_t nr, const NarrowMatrix& A,
                     const XQ& X, int64_t n0, int64_t m0, int64_t m1) {
  with_rows<4>(nr, [&](auto NR) { rows_avx2<decltype(NR)::value>(dot, ldd, x, ldx, A, X, n0, m0, m1); });
}

// The kernels a format runs on this CPU, at most g_limit.
NarrowIsa isa(WeightFormat f) {
  if (g_limit == NarrowIsa::Avx512 && (f == WeightFormat::Q8_0 ? has_vnni() : has_avx512())) return NarrowIsa::Avx512;
  if (g_limit != NarrowIsa::Portable && has_avx2()) return NarrowIsa::Avx2;
  return NarrowIsa::Portable;
}

// Rows of the matrix a thread takes at a time (its slice is contiguous; partial dots for them live on its stack).
constexpr int64_t kRowChunk = 64;

void narrow_direct(float* y, int64_t ldy, const float* x, int64_t ldx, int64_t N, const NarrowMatrix& A,
                   const float* bias, bool accumulate) {
  // The caller's thread quantizes x once; the team reads it through this reference (not its own thread_local).
  thread_local XQ xq;
  XQ& X = xq;
  const NarrowIsa level = isa(A.fmt);
  if (A.fmt == WeightFormat::Q8_0) {
    if (level == NarrowIsa::Avx512)
      quantize_x_simd(X, x, ldx, N, A.K, A.ld);
    else
      quantize_x(X, x, ldx, N, A.K, A.ld);
  }
  if (A.fmt == WeightFormat::BF16 && level == NarrowIsa::Avx512) split_x(X, x, ldx, N, A.K);
  // x rows per pass over the matrix: as many as the registers hold accumulators for (16-bit AVX-512: 6 x rows
  // against 2 matrix rows, 24 accumulators; against 2 x rows at a time 5 rows took 1.5x as long, the matrix
  // passing 3 times, build/verify_pass_bench --gemm 2560,640).
  const bool avx512 = level == NarrowIsa::Avx512;
  const int64_t group = A.fmt == WeightFormat::Q8_0 ? (avx512 ? 8 : 4) : (avx512 ? 6 : 2);
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
      for (int64_t n0 = 0; n0 < N; n0 += group) {
        const int64_t nr = std::min<int64_t>(group, N - n0);
        if (level == NarrowIsa::Avx512)
          rows_group(dot, mt, x, ldx, nr, A, X, n0, m0, m1);
        else if (level == NarrowIsa::Avx2)
          rows_group_avx2(dot, mt, x, ldx, nr, A, X, n0, m0, m1);
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

// Widens rows [m0, m0 + mt) of A into tile [mt][K] fp32 (the same values as narrow_at), one loop per format
// that the compiler vectorises: narrow_at's switch per weight made the widening cost more than the sgemm.
void widen_tile(float* tile, const NarrowMatrix& A, int64_t m0, int64_t mt) {
  const int64_t K = A.K, ld = A.ld, nb = ld / kQ8Block;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < mt; i++) {
    float* t = tile + i * K;
    const int64_t m = m0 + i;
    if (A.fmt == WeightFormat::BF16) {
      const uint16_t* w = static_cast<const uint16_t*>(A.q) + m * ld;
      for (int64_t k = 0; k < K; k++) {
        const uint32_t bits = uint32_t(w[k]) << 16;
        std::memcpy(t + k, &bits, sizeof(float));
      }
    } else if (A.fmt == WeightFormat::F16) {
      const uint16_t* w = static_cast<const uint16_t*>(A.q) + m * ld;
      for (int64_t k = 0; k < K; k++) t[k] = f16_to_f32(w[k]);
    } else {
      const uint8_t* w = static_cast<const uint8_t*>(A.q) + m * ld;
      for (int64_t b = 0; b < nb; b++) {
        const float d = f16_to_f32(A.d[m * nb + b]);
        const int64_t k1 = std::min(K, (b + 1) * kQ8Block);
        for (int64_t k = b * kQ8Block; k < k1; k++) t[k] = d * float(int(w[k]) - 128);
      }
    }
  }
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
  switch (isa(f)) {
    case NarrowIsa::Avx512: return f == WeightFormat::Q8_0 ? "avx512-vnni" : "avx512";
    case NarrowIsa::Avx2: return "avx2";
    case NarrowIsa::Portable: break;
  }
  return "portable";
}

void narrow_limit_isa(NarrowIsa max) { g_limit = max; }

}  // namespace cpu
}  // namespace kiln
